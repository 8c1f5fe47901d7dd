/**
 * The real programs, run by the kernel with BPF_PROG_TEST_RUN, with their
 * maps loaded from and read back into the model's state shape. Everything
 * is encoded and decoded through dataplane/maps.ts.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BpfObject, type BpfMap, type BpfProgram, possibleCpus, skbCtx } from '../../dataplane/libbpf.ts';
import {
  COUNTER_COUNT, COUNTER_NAMES, MAX_ENTRIES, RedirectKind, arrayIndex, clock, config, counterValue,
  policySlot, policyStart, redirectTrace,
  type CounterName, type RedirectKindName,
} from '../../dataplane/maps.ts';
import { ctRecentCodec, emptyState, type DatapathState, type RunEffects } from '../model/index.ts';
import { Conntrack, unshareNetns } from '../../dataplane/conntrack.ts';
import { probeClock, type ClockSample } from '../../dataplane/agent/clock.ts';
import type { ConntrackSpec, ProgramName, SkbContext } from './statespec.ts';

export const TEST_OBJECT = fileURLToPath(new URL('../../bpf/build/xmasq.test.bpf.o', import.meta.url));

/**
 * BPF_PROG_TEST_RUN refuses (EINVAL) a frame whose ethertype announces IPv4 or
 * IPv6 but which is too short for the fixed header. Shorter frames cannot be
 * run in the kernel; model.test.ts checks the model passes them untouched.
 */
export function minTestRunLength(frame: Uint8Array): number {
  const type = frame.length >= 14 ? (frame[12] << 8) | frame[13] : 0;
  return type === 0x0800 ? 14 + 20 : type === 0x86dd ? 14 + 40 : 14;
}

export interface KernelRun {
  verdict: number;
  packet: Buffer;
  effects: RunEffects;
  state: DatapathState;
  /**
   * The clocks during the run: bpf_ktime_get_coarse_ns() and bpf_jiffies64(),
   * each the same read by clock_probe just before and just after it.
   */
  clock: ClockSample;
  /**
   * The CPUs whose ct_recent slots the run changed (state.ct_recent is the
   * first one's, or the input's when none): a run takes one CPU, so more than
   * one is a mismatch whatever the model says.
   */
  recentCpusChanged: number[];
}

const ZERO = arrayIndex.encode({ index: 0 });
/** Offset of gso_size in the uapi struct __sk_buff (skbCtx leaves it 0). */
const SK_BUFF_GSO_SIZE = 176;

export class KernelDatapath {
  private readonly obj: BpfObject;
  private readonly maps: Record<string, BpfMap>;
  private readonly ct: Conntrack;
  /** policy_table's every index, and every value as the kernel holds it (load). */
  private policyKeys: Buffer | undefined;
  private policyValues = Buffer.alloc(0);
  /** Whether the state loaded last has rules: a walk is how the programs reach policy_table. */
  private policyWalked = false;
  private readonly devices = new Set<number>();
  /** ct_recent's keys 0..N-1, and every CPU's slots as the kernel holds them (after the last load or run). */
  private readonly recentKeys: Buffer;
  private recentAll = Buffer.alloc(0);
  /** One CPU's slots as the state loaded last gave them: what every CPU held before the run. */
  private recentLoaded = Buffer.alloc(0);

  constructor(objectPath = TEST_OBJECT) {
    if (process.getuid?.() !== 0) {
      throw new Error('the differential tests run the real programs in the kernel: run them as root (CAP_BPF + CAP_NET_ADMIN)');
    }
    if (!existsSync(objectPath)) {
      throw new Error(`${objectPath} is missing: build it with 'make -C bpf' (npm test does this first)`);
    }
    // The programs consult the conntrack table of the namespace they run in:
    // a new one of this thread's own, so that the cases never see (or flush)
    // the host's flows.
    unshareNetns();
    this.ct = new Conntrack();
    this.obj = BpfObject.open(objectPath);
    this.obj.load();
    this.maps = {};
    for (const name of ['pod_info', 'egress_cache', 'egress_filter', 'ingress_cache', 'config', 'policy_table', 'policy_start', 'ct_pending', 'ct_admitted', 'ct_recent', 'nodes', 'clock', 'counters', 'redirect_trace']) {
      this.maps[name] = this.obj.map(name);
    }
    const want = MAX_ENTRIES.test;
    const got = { pods: this.maps.pod_info.maxEntries, paths: this.maps.egress_cache.maxEntries, policySlots: this.maps.policy_table.maxEntries,
      ctPending: this.maps.ct_pending.maxEntries, ctAdmitted: this.maps.ct_admitted.maxEntries, ctRecentSlots: this.maps.ct_recent.maxEntries,
      nodes: this.maps.nodes.maxEntries, filterBlocks: this.maps.egress_filter.maxEntries };
    if ((Object.keys(want) as Array<keyof typeof want>).some((k) => got[k] !== want[k])) {
      throw new Error(`${objectPath} has map sizes ${JSON.stringify(got)}, dataplane/maps.ts says ${JSON.stringify(want)}`);
    }
    this.recentKeys = Buffer.concat(Array.from({ length: got.ctRecentSlots }, (_, i) => arrayIndex.encode({ index: i })));
  }

  close(): void {
    this.ct.close();
    this.obj.close();
  }

  /** Replaces every map's content with s. */
  load(s: DatapathState): void {
    for (const m of ['pod_info', 'egress_cache', 'ingress_cache', 'ct_pending', 'ct_admitted', 'nodes']) this.maps[m].clear();
    // The model's tables give their entries as the kernel's bytes (the layouts of maps.ts).
    for (const [k, v] of s.pod_info.entriesBytes()) this.maps.pod_info.update(k, v, 'noexist');
    for (const [k, v] of s.egress_cache.entriesBytes()) this.maps.egress_cache.update(k, v, 'noexist');
    for (const [k, v] of s.ingress_cache.entriesBytes()) this.maps.ingress_cache.update(k, v, 'noexist');
    // policy_table, an array of 8,192 slots, whole in one syscall when it changes: the model's slots, zeros elsewhere
    const slots = this.maps.policy_table.maxEntries;
    if (!this.policyKeys) {
      this.policyKeys = Buffer.concat(Array.from({ length: slots }, (_, i) => arrayIndex.encode({ index: i })));
      this.policyValues = Buffer.alloc(slots * policySlot.size);
    }
    const values = Buffer.alloc(slots * policySlot.size);
    for (const [i, next] of s.policy_table.entries()) policySlot.encode({ next }).copy(values, i * policySlot.size);
    if (!values.equals(this.policyValues)) {
      this.maps.policy_table.updateBatch(this.policyKeys, values, slots);
      this.policyValues = values;
    }
    this.policyWalked = s.policy_start.egress !== 0 || s.policy_start.ingress !== 0;
    for (const [k, v] of s.ct_pending.entriesBytes()) this.maps.ct_pending.update(k, v, 'noexist');
    for (const [k, v] of s.ct_admitted.entriesBytes()) this.maps.ct_admitted.update(k, v, 'noexist');
    for (const [k, v] of s.nodes.entriesBytes()) this.maps.nodes.update(k, v, 'noexist');
    // The filter's blocks are the model's u32 words, byte for byte.
    const words = Buffer.from(s.egress_filter.buffer, s.egress_filter.byteOffset, s.egress_filter.byteLength);
    const bs = this.maps.egress_filter.valueSize;
    for (let i = 0; i < this.maps.egress_filter.maxEntries; i++) this.maps.egress_filter.update(arrayIndex.encode({ index: i }), words.subarray(i * bs, (i + 1) * bs));
    // ct_recent: every CPU the model's one CPU's slots, so that the run's answer does not
    // depend on the CPU it takes; one batch write of the whole map, only when it differs.
    const vs = ctRecentCodec.struct.size;
    const stride = (vs + 7) & ~7;
    const recentSlots = s.ct_recent.length;
    const one = Buffer.alloc(recentSlots * vs);
    s.ct_recent.forEach((r, i) => ctRecentCodec.writeBytes(one.subarray(i * vs, (i + 1) * vs), r));
    const cpus = possibleCpus();
    const all = Buffer.alloc(recentSlots * cpus * stride);
    for (let i = 0; i < recentSlots; i++) for (let c = 0; c < cpus; c++) one.copy(all, (i * cpus + c) * stride, i * vs, (i + 1) * vs);
    if (!all.equals(this.recentAll)) {
      this.maps.ct_recent.updateBatch(this.recentKeys, all, recentSlots);
      this.recentAll = all;
    }
    this.recentLoaded = one;
    this.maps.config.update(ZERO, config.encode(s.config));
    this.maps.policy_start.update(ZERO, policyStart.encode(s.policy_start));
    this.maps.clock.update(ZERO, clock.encode(s.clock));
    this.maps.redirect_trace.update(ZERO, redirectTrace.encode({ ifindex: 0, kind: 0 }));
  }

  /**
   * Every CPU's ct_recent slots, one Buffer of slots after another per CPU,
   * and which CPUs' differ from what load() wrote to all.
   */
  private readRecent(): { cpus: Buffer[]; changed: number[] } {
    const snap = this.maps.ct_recent.readAll();
    const vs = ctRecentCodec.struct.size;
    const stride = (vs + 7) & ~7;
    const ncpu = possibleCpus();
    this.recentAll = Buffer.from(snap.values.subarray(0, snap.count * snap.valueSize));
    const cpus = Array.from({ length: ncpu }, () => Buffer.alloc(snap.count * vs));
    for (let i = 0; i < snap.count; i++) {
      const slot = snap.keys.readUInt32LE(i * snap.keySize);
      for (let c = 0; c < ncpu; c++) snap.values.copy(cpus[c], slot * vs, i * snap.valueSize + c * stride, i * snap.valueSize + c * stride + vs);
    }
    const changed = cpus.flatMap((b, c) => (b.equals(this.recentLoaded) ? [] : [c]));
    return { cpus, changed };
  }

  /** Reads every map back; ct_recent as the CPU that changed it holds it (readRecent). */
  read(): DatapathState & { recentCpusChanged: number[] } {
    const s = emptyState(MAX_ENTRIES.test);
    for (const [k, v] of this.maps.pod_info.entries()) s.pod_info.updateBytes(k, v);
    for (const [k, v] of this.maps.egress_cache.entries()) s.egress_cache.updateBytes(k, v);
    for (const [k, v] of this.maps.ingress_cache.entries()) s.ingress_cache.updateBytes(k, v);
    // Read back only after a state with rules: without, no program looks a slot up (policy.h), so none can write one.
    const slots = this.policyWalked ? this.maps.policy_table.readAll() : { count: 0, keys: Buffer.alloc(0), values: Buffer.alloc(0), keySize: 4, valueSize: 4 };
    for (let i = 0; i < slots.count; i++) {
      // most of the 8,192 slots are unwritten, all zero bytes: the model keeps only the others
      if (slots.values.readUInt32LE(i * slots.valueSize) === 0) continue;
      s.policy_table.updateBytes(slots.keys.subarray(i * slots.keySize, (i + 1) * slots.keySize), slots.values.subarray(i * slots.valueSize, (i + 1) * slots.valueSize));
    }
    for (const [k, v] of this.maps.ct_pending.entries()) s.ct_pending.updateBytes(k, v);
    for (const [k, v] of this.maps.ct_admitted.entries()) s.ct_admitted.updateBytes(k, v);
    for (const [k, v] of this.maps.nodes.entries()) s.nodes.updateBytes(k, v);
    const words = Buffer.from(s.egress_filter.buffer, s.egress_filter.byteOffset, s.egress_filter.byteLength);
    const bs = this.maps.egress_filter.valueSize;
    for (let i = 0; i < this.maps.egress_filter.maxEntries; i++) this.maps.egress_filter.lookup(arrayIndex.encode({ index: i }))!.copy(words, i * bs);
    s.config = config.decode(this.maps.config.lookup(ZERO)!);
    s.policy_start = policyStart.decode(this.maps.policy_start.lookup(ZERO)!);
    s.clock = clock.decode(this.maps.clock.lookup(ZERO)!);
    const recent = this.readRecent();
    const mine = recent.changed.length ? recent.cpus[recent.changed[0]] : this.recentLoaded;
    const vs = ctRecentCodec.struct.size;
    s.ct_recent = s.ct_recent.map((_, i) => ctRecentCodec.fromBytes(mine.subarray(i * vs, (i + 1) * vs)));
    return Object.assign(s, { recentCpusChanged: recent.changed });
  }

  /** Each counter summed over every CPU. */
  counters(): Record<CounterName, number> {
    const out = {} as Record<CounterName, number>;
    for (let i = 0; i < COUNTER_COUNT; i++) {
      const all = this.maps.counters.lookup(arrayIndex.encode({ index: i }))!;
      let sum = 0n;
      for (let off = 0; off < all.length; off += 8) sum += counterValue.decode(all.subarray(off, off + 8)).value;
      out[COUNTER_NAMES[i]] = Number(sum);
    }
    return out;
  }

  redirect(): { ifindex: number; kind: RedirectKindName } {
    const t = redirectTrace.decode(this.maps.redirect_trace.lookup(ZERO)!);
    const kind = (Object.keys(RedirectKind) as RedirectKindName[]).find((k) => RedirectKind[k] === t.kind);
    if (!kind) throw new Error(`redirect_trace holds unknown kind ${t.kind}`);
    return { ifindex: t.ifindex, kind };
  }

  /** Replaces the namespace's conntrack table with these entries. */
  conntrack(entries: ConntrackSpec): void {
    this.ct.flush();
    for (const e of entries) this.ct.create(e);
  }

  /** Loads s and the conntrack entries, runs the program once on packet, and reads everything back. */
  run(program: ProgramName, packet: Buffer, s: DatapathState, ctx: SkbContext = {}, conntrack: ConntrackSpec = []): KernelRun {
    if (packet.length < minTestRunLength(packet)) {
      throw new Error(`a ${packet.length}-byte frame is shorter than BPF_PROG_TEST_RUN accepts (${minTestRunLength(packet)} for its ethertype)`);
    }
    this.conntrack(conntrack);
    if (ctx.ifindex !== undefined && ctx.ifindex > 1) this.device(ctx.ifindex);
    const skb = skbCtx({ ifindex: ctx.ifindex, ingressIfindex: ctx.ingress_ifindex, mark: ctx.mark });
    skb.writeUInt32LE(ctx.gso_size ?? 0, SK_BUFF_GSO_SIZE);
    // The programs read the coarse clock or jiffies (xmasq_now; both move at the tick,
    // every few ms); a run between two probes that read the same of each saw exactly
    // those, which the model then gets. A run across a tick is run again from the same
    // state, so that the model never has to guess the time.
    for (let attempt = 0; ; attempt++) {
      this.load(s);
      const before = this.counters();
      const t0 = this.probe();
      const r = this.obj.program(program).testRun({ data: packet, ctx: skb });
      const t1 = this.probe();
      const ticked = t0.coarseNs !== t1.coarseNs || t0.jiffies !== t1.jiffies;
      if (ticked && attempt < 20) {
        // the run may have written ct_recent: load() must write it again
        this.recentAll = Buffer.alloc(0);
        continue;
      }
      if (ticked) throw new Error('the clock ticked during every one of 20 runs of one case');
      const after = this.counters();
      const counters = {} as Record<CounterName, number>;
      for (const n of COUNTER_NAMES) counters[n] = after[n] - before[n];
      const { recentCpusChanged, ...state } = this.read();
      return { verdict: r.retval, packet: r.data, effects: { counters, redirect: this.redirect() }, state, clock: t0, recentCpusChanged };
    }
  }

  /** jiffies and the coarse clock now, as the programs read them (clock_probe). */
  probe(): ClockSample {
    return probeClock(this.clockProbe());
  }

  clockProbe(): BpfProgram {
    return this.obj.program('clock_probe');
  }

  /**
   * A device with this index in the case's namespace: test_run runs a packet
   * on the device ctx.ifindex names (masq holds the packet's source to the pod
   * of that device), and refuses one that does not exist. A bridge, because
   * it needs no module beyond what the lab loads.
   */
  private device(ifindex: number): void {
    if (this.devices.has(ifindex)) return;
    try {
      execFileSync('ip', ['link', 'add', `xmdiff${ifindex}`, 'index', String(ifindex), 'type', 'bridge'], { stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (e) {
      throw new Error(`cannot create device index ${ifindex} for a case's ctx.ifindex: ${(e as { stderr?: Buffer }).stderr?.toString().trim() || (e as Error).message}`);
    }
    this.devices.add(ifindex);
  }

  /** The programs by name, for benchmarks. */
  program(name: string) {
    return this.obj.program(name);
  }
}
