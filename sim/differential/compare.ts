/**
 * Runs one case on the model and on the kernel and lists every difference:
 * verdict, redirect, counters, the output packet (decoded, field by field)
 * and every map entry (decoded, field by field).
 */
import { COUNTER_NAMES, KEY_MAX, KEY_MIN, WIDE_KEY_MIN } from '../../dataplane/maps.ts';
import { diffFrames } from '../../testing/packet/diff.ts';
import { init } from '../model/init.ts';
import { masq } from '../model/masq.ts';
import { restore } from '../model/restore.ts';
import { cloneState, type DatapathState, type Env, type HashTable, type RunResult } from '../model/index.ts';
import type { KernelDatapath, KernelRun } from './kernel.ts';
import type { ClockSample } from '../../dataplane/agent/clock.ts';
import { modelConntrack, type ConntrackSpec, type ProgramName, type SkbContext } from './statespec.ts';

export interface Case {
  name: string;
  program: ProgramName;
  packet: Buffer;
  state: DatapathState;
  ctx?: SkbContext;
  /** The host's conntrack entries when the program runs (none: an empty table). */
  conntrack?: ConntrackSpec;
}

/** A model of one program; the mutation check swaps these for planted bugs. */
export type ModelProgram = (pkt: Buffer, s: DatapathState, env: Env) => RunResult;
export const MODEL: Record<ProgramName, ModelProgram> = { init, restore, masq: (p, s, e) => masq(p, s, e, 'EGRESS') };

export interface Outcome {
  mismatches: string[];
  kernel: KernelRun;
  model: RunResult & { state: DatapathState };
}

export function runCase(k: KernelDatapath, c: Case, model: Record<ProgramName, ModelProgram> = MODEL): Outcome {
  const kernel = k.run(c.program, c.packet, c.state, c.ctx, c.conntrack);
  const env = oracleEnv(c, kernel.state, kernel.clock);
  const ms = cloneState(c.state);
  const m = model[c.program](c.packet, ms, env);
  return { mismatches: compare(m, ms, kernel), kernel, model: { ...m, state: ms } };
}

/**
 * The clock and the random draws are the kernel's to choose: the clock as the
 * harness read it around the run (kernel.ts), and the key from the entry init
 * created. Everything else the model must reproduce on its own: a key the
 * kernel chose that was not free makes the model's BPF_NOEXIST insert fail, a
 * mismatch.
 */
export function oracleEnv(c: Case, after: DatapathState, clock: ClockSample): Env {
  const before = c.state;

  // The draws that give the kernel's outcome: the key it kept, as an offset in
  // its class (narrow or wide), or, when it gave up, the narrow keys already
  // taken for that host (each draw collided). A wide class gives up only on a
  // full table, where any draw fails: 9 draws colliding among at most the
  // table's 64 entries in 16,320 keys does not happen.
  const draws: number[] = [];
  if (c.program === 'init') {
    const newKeys = after.ingress_cache.entries().filter(([key]) => !before.ingress_cache.lookup(key));
    if (newKeys.length > 0) {
      const k = newKeys[0][0].key;
      draws.push(k >= WIDE_KEY_MIN ? k - WIDE_KEY_MIN : k - KEY_MIN);
    } else {
      const dst = outerDst(c.packet);
      for (const [key] of before.ingress_cache.entries()) {
        if (key.remote_host === dst && key.key >= KEY_MIN && key.key <= KEY_MAX) draws.push(key.key - KEY_MIN);
      }
    }
  }
  let i = 0;
  return {
    now: clock.coarseNs,
    jiffies: clock.jiffies,
    random: () => (draws.length ? draws[i++ % draws.length] : 0),
    gsoSize: c.ctx?.gso_size,
    conntrack: modelConntrack(c.conntrack ?? []),
    ingressIfindex: c.ctx?.ingress_ifindex,
    ifindex: c.ctx?.ifindex,
  };
}

function outerDst(pkt: Buffer): string {
  return pkt.length >= 34 ? `${pkt[30]}.${pkt[31]}.${pkt[32]}.${pkt[33]}` : '';
}

const VERDICTS: Record<number, string> = { [-1]: 'TC_ACT_UNSPEC', 0: 'TC_ACT_OK', 2: 'TC_ACT_SHOT', 7: 'TC_ACT_REDIRECT' };
const verdictName = (v: number) => VERDICTS[v] ?? `verdict ${v}`;

export function compare(m: RunResult, ms: DatapathState, k: KernelRun): string[] {
  const out: string[] = [];
  if (m.verdict !== k.verdict) out.push(`verdict: model ${verdictName(m.verdict)} kernel ${verdictName(k.verdict)}`);
  if (m.effects.redirect.kind !== k.effects.redirect.kind || m.effects.redirect.ifindex !== k.effects.redirect.ifindex) {
    out.push(`redirect: model ${m.effects.redirect.kind}(${m.effects.redirect.ifindex}) kernel ${k.effects.redirect.kind}(${k.effects.redirect.ifindex})`);
  }
  for (const n of COUNTER_NAMES) {
    if (m.effects.counters[n] !== k.effects.counters[n]) out.push(`counter ${n}: model +${m.effects.counters[n]} kernel +${k.effects.counters[n]}`);
  }
  if (!m.packet.equals(k.packet)) {
    out.push('packet differs (model vs kernel):');
    for (const line of diffFrames(m.packet, k.packet)) out.push(`  ${line}`);
  }
  if (k.recentCpusChanged.length > 1) out.push(`ct_recent: one run changed the slots of CPUs ${k.recentCpusChanged.join(', ')}`);
  out.push(...diffStates(ms, k.state));
  return out;
}

/** Entry-by-entry, field-by-field differences between two map states. */
export function diffStates(a: DatapathState, b: DatapathState, names = ['model', 'kernel']): string[] {
  const out: string[] = [];
  const table = <K, V>(name: string, x: HashTable<K, V>, y: HashTable<K, V>) => {
    const seen = new Set<string>();
    for (const [key, v] of x.entries()) {
      const id = JSON.stringify(key);
      seen.add(id);
      const w = y.lookup(key);
      if (!w) out.push(`${name}[${id}]: only in ${names[0]}: ${show(v)}`);
      else out.push(...fieldDiff(`${name}[${id}]`, v, w, names));
    }
    for (const [key, v] of y.entries()) {
      if (!seen.has(JSON.stringify(key))) out.push(`${name}[${JSON.stringify(key)}]: only in ${names[1]}: ${show(v)}`);
    }
  };
  table('pod_info', a.pod_info, b.pod_info);
  table('egress_cache', a.egress_cache, b.egress_cache);
  for (let i = 0; i < Math.max(a.egress_filter.length, b.egress_filter.length); i += 2) {
    const [x, y] = [filterWord(a.egress_filter, i), filterWord(b.egress_filter, i)];
    if (x !== y) out.push(`egress_filter[${i / 2}]: ${names[0]} ${x} ${names[1]} ${y}`);
  }
  table('ingress_cache', a.ingress_cache, b.ingress_cache);
  const [ta, tb] = [new Map(a.policy_table.entries()), new Map(b.policy_table.entries())];
  for (const [k, next] of ta) if (tb.get(k) !== next) out.push(`policy_table[${k}]: ${names[0]} ${next} ${names[1]} ${tb.get(k) ?? 0}`);
  for (const [k, next] of tb) if (!ta.has(k)) out.push(`policy_table[${k}]: ${names[0]} 0 ${names[1]} ${next}`);
  table('ct_pending', a.ct_pending, b.ct_pending);
  table('ct_admitted', a.ct_admitted, b.ct_admitted);
  for (let i = 0; i < Math.max(a.ct_recent.length, b.ct_recent.length); i++) {
    const [x, y] = [a.ct_recent[i], b.ct_recent[i]];
    if (!x || !y) out.push(`ct_recent[${i}]: only in ${x ? names[0] : names[1]}: ${show(x ?? y)}`);
    else out.push(...fieldDiff(`ct_recent[${i}]`, x, y, names));
  }
  table('nodes', a.nodes, b.nodes);
  out.push(...fieldDiff('config', a.config, b.config, names));
  out.push(...fieldDiff('policy_start', a.policy_start, b.policy_start, names));
  out.push(...fieldDiff('clock', a.clock, b.clock, names));
  return out;
}

/** The C's u64 word of the filter at u32 index i (its low half), in hex. */
function filterWord(w: Uint32Array, i: number): string {
  return i + 1 < w.length ? `0x${((BigInt(w[i + 1]) << 32n) | BigInt(w[i])).toString(16).padStart(16, '0')}` : 'absent';
}

function fieldDiff(where: string, x: unknown, y: unknown, names: string[]): string[] {
  const out: string[] = [];
  const xr = x as Record<string, unknown>, yr = y as Record<string, unknown>;
  for (const f of Object.keys(xr)) {
    const [a, b] = [xr[f], yr[f]];
    // A struct member (ct_recent's flow and admission): its own fields, by name.
    if (isMember(a) && isMember(b)) out.push(...fieldDiff(`${where}.${f}`, a, b, names));
    else if (show(a) !== show(b)) out.push(`${where}.${f}: ${names[0]} ${show(a)} ${names[1]} ${show(b)}`);
  }
  return out;
}

function isMember(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function show(v: unknown): string {
  return JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? x.toString() : x));
}
