/**
 * `npm run bench:prog -- --profile`: where a row's nanoseconds go. While bench:prog runs
 * every row once more (RowWindow), `perf record -e cpu-clock -g` samples this process; each
 * sample inside BPF_PROG_TEST_RUN goes to its row by time, and within the row to what the
 * innermost BPF frame of its call chain was doing: its own instructions, or the helper,
 * kfunc or map operation it called (and everything under it). Samples in the test run
 * outside any program are the harness's loop. Per packet: samples / frequency / packets.
 *
 * This VM has no PMU, so cpu-clock it is: the figures are sampled, a few percent apart
 * from the timed ones, and say where the time goes, not to the nanosecond.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { Readable } from 'node:stream';
import type { RowWindow } from './programs.ts';

export const PROFILE_FREQ = 20_000;

/**
 * What a program's callee is, by the name of the first non-BPF frame under the program's
 * frame; the first pattern that matches wins. Anything not listed is shown by its own name.
 */
const CALLEES: [what: string, sym: RegExp][] = [
  ['hash map lookup', /^(__htab_map_lookup_elem|htab_map_lookup_elem|htab_lru_map_lookup_elem|htab_map_hash|lookup_nulls_elem_raw)$/],
  ['hash map update', /^(htab_map_update_elem|htab_lru_map_update_elem|bpf_map_update_elem)$/],
  ['LPM trie lookup', /^trie_lookup_elem$/],
  ['checksum helpers', /^(bpf_l4_csum_replace|bpf_l3_csum_replace|bpf_csum_diff|inet_proto_csum_replace\w*)$/],
  ['packet bytes (store, load, pull)', /^(bpf_skb_store_bytes|bpf_skb_load_bytes|bpf_skb_pull_data|__pi_memcpy|skb_ensure_writable)$/],
  ['clock (ktime coarse)', /^(bpf_ktime_get_coarse_ns|ktime_get_coarse_ts64|set_normalized_timespec64)$/],
  ['conntrack kfuncs', /^(bpf_skb_ct_lookup|bpf_ct_release|__bpf_nf_ct_lookup|nf_conntrack_find_get)$/],
  ['redirect', /^(bpf_redirect|bpf_redirect_peer|bpf_redirect_neigh)$/],
  // Spectre/SRSO mitigations: every return and indirect call of the kernel goes through these.
  ['return/indirect thunks (mitigations)', /^(srso_\w*return_thunk|__x86_return_thunk|__x86_indirect_thunk_\w+)$/],
];
export const OWN = 'program\'s own instructions';
export const HARNESS = 'test-run loop (outside programs)';

const BPF_FRAME = /^bpf_prog_[0-9a-f]{16}_/;

/** One sample: its time (ns, the recording's clock) and its call chain, leaf first. */
export interface Sample { ns: bigint; frames: string[] }

/** One block of `perf script -F time,ip,sym` output (a sample's header line, then its frames) as a sample. */
function parseBlock(lines: readonly string[]): Sample | undefined {
  if (!lines.length) return undefined;
  const t = /^\s*(\d+)\.(\d+):/.exec(lines[0]);
  if (!t) return undefined;
  const ns = BigInt(t[1]) * 1_000_000_000n + BigInt(t[2].padEnd(9, '0').slice(0, 9));
  return { ns, frames: lines.slice(1).map((l) => (l.trim().split(/\s+/, 2)[1] ?? '').replace(/\+0x[0-9a-f]+$/, '')) };
}

/** `perf script -F time,ip,sym` output as samples. */
export function parseScript(script: string): Sample[] {
  const out: Sample[] = [];
  for (const block of script.split(/\n\s*\n/)) {
    const s = parseBlock(block.split('\n').filter((l) => l.trim()));
    if (s) out.push(s);
  }
  return out;
}

/**
 * The same, read from perf script's output as it comes: a recording of a whole
 * default run (1,000,000 packets a row, call chains of ~20 frames) prints more
 * than the longest string V8 makes (~512 MiB).
 */
async function parseStream(input: Readable): Promise<Sample[]> {
  const out: Sample[] = [];
  let block: string[] = [];
  for await (const line of createInterface({ input, crlfDelay: Infinity })) {
    if (line.trim()) {
      block.push(line);
      continue;
    }
    const s = parseBlock(block);
    if (s) out.push(s);
    block = [];
  }
  const s = parseBlock(block);
  if (s) out.push(s);
  return out;
}

/** Where a sample of a test run goes; undefined for a sample outside BPF_PROG_TEST_RUN. */
export function classify(frames: readonly string[]): string | undefined {
  if (!frames.includes('bpf_test_run')) return undefined;
  const inner = frames.findIndex((f) => BPF_FRAME.test(f));
  if (inner < 0) return HARNESS;
  if (inner === 0) return OWN;
  const callee = frames[inner - 1];
  return CALLEES.find(([, re]) => re.test(callee))?.[0] ?? callee;
}

/** ns per packet of each row, by where it went. */
export function breakdown(samples: readonly Sample[], windows: readonly RowWindow[], freq = PROFILE_FREQ): Map<string, Map<string, number>> {
  const counts = new Map<string, Map<string, number>>(windows.map((w) => [w.name, new Map()]));
  for (const s of samples) {
    const w = windows.find((x) => s.ns >= x.startNs && s.ns <= x.endNs);
    if (!w) continue;
    const what = classify(s.frames);
    if (!what) continue;
    const m = counts.get(w.name)!;
    m.set(what, (m.get(what) ?? 0) + 1);
  }
  const out = new Map<string, Map<string, number>>();
  for (const w of windows) {
    const ns = new Map<string, number>();
    for (const [what, n] of counts.get(w.name)!) ns.set(what, (n / freq) * 1e9 / w.packets);
    out.set(w.name, ns);
  }
  return out;
}

/** A markdown table: a row per bench row, a column per place, the biggest places first. */
export function renderBreakdown(ns: Map<string, Map<string, number>>, windows: readonly RowWindow[]): string {
  const totals = new Map<string, number>();
  for (const m of ns.values()) for (const [what, x] of m) totals.set(what, (totals.get(what) ?? 0) + x);
  // Places that never reach 1 ns in any row go to "other".
  const shown = [...totals.keys()].filter((what) => [...ns.values()].some((m) => (m.get(what) ?? 0) >= 1))
    .sort((a, b) => totals.get(b)! - totals.get(a)!);
  const head = ['row', 'sampled ns', ...shown, 'other'];
  const lines = [`| ${head.join(' | ')} |`, `|${head.map((_, i) => (i ? '---:' : '---')).join('|')}|`];
  for (const w of windows) {
    const m = ns.get(w.name)!;
    const total = [...m.values()].reduce((a, b) => a + b, 0);
    const other = [...m].filter(([what]) => !shown.includes(what)).reduce((a, [, x]) => a + x, 0);
    const cell = (x: number) => (x >= 0.5 ? x.toFixed(0) : '');
    lines.push(`| ${[w.name, total.toFixed(0), ...shown.map((what) => cell(m.get(what) ?? 0)), cell(other)].join(' | ')} |`);
  }
  return lines.join('\n');
}

/** A perf recording of this process, started before the rows run and stopped after. */
export class Recording {
  private readonly dir = mkdtempSync(join(tmpdir(), 'xmasq-prog-profile-'));
  private readonly file = join(this.dir, 'perf.data');
  private readonly child: ChildProcess;
  private readonly exited: Promise<number | null>;
  private stderr = '';

  private constructor(freq: number) {
    this.child = spawn('perf', ['record', '-q', '-k', 'CLOCK_MONOTONIC', '-e', 'cpu-clock', '-F', String(freq), '-g',
      '-p', String(process.pid), '-o', this.file], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.child.stderr!.on('data', (d: Buffer) => { this.stderr += d.toString(); });
    this.exited = new Promise((resolve) => {
      this.child.on('error', (e) => { this.stderr += e.message; resolve(-1); });
      this.child.on('exit', (code) => resolve(code));
    });
  }

  /** Starts perf; throws with perf's own words if it is missing or refuses. */
  static async start(freq = PROFILE_FREQ): Promise<Recording> {
    const r = new Recording(freq);
    // perf has no "attached" message: give it time to open its events, and see it did not die.
    const died = await Promise.race([r.exited.then(() => true), new Promise<false>((ok) => setTimeout(() => ok(false), 1500))]);
    if (died) {
      r.cleanup();
      throw new Error(`perf record did not start: ${r.stderr.trim() || 'it exited'} (Debian: apt install linux-perf)`);
    }
    return r;
  }

  /** Stops perf and gives the samples. */
  async stop(): Promise<Sample[]> {
    try {
      this.child.kill('SIGINT');
      await this.exited;
      const script = spawn('perf', ['script', '-i', this.file, '-F', 'time,ip,sym'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let err = '';
      script.stderr!.on('data', (d: Buffer) => { if (err.length < 65536) err += d.toString(); });
      const exited = new Promise<number | null>((resolve) => {
        script.on('error', (e) => { err += e.message; resolve(-1); });
        script.on('close', (code) => resolve(code));
      });
      const samples = await parseStream(script.stdout!);
      if ((await exited) !== 0) throw new Error(`perf script failed: ${err.trim()}`);
      return samples;
    } finally {
      this.cleanup();
    }
  }

  private cleanup(): void {
    rmSync(this.dir, { recursive: true, force: true });
  }
}
