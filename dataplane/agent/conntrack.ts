/**
 * The agent's half of flow admission (bpf/conntrack.h): masq and restore
 * queue established TCP flows whose conntrack entry still tracks windows in
 * ct_pending; the agent makes each entry liberal over ctnetlink, after which
 * the flow's packets may take the fast path. Until then they cross the host
 * stack, which is always correct, only slower.
 */
import type { MapOps } from '../map-ops.ts';
import { Conntrack } from '../conntrack.ts';
import { CT_RECHECK_NS, ctAdmission, ctTuple } from '../maps.ts';
import type { Log } from './log.ts';
import { monotonicCoarseNs } from './native.ts';

/**
 * How often the queue is drained: a new TCP connection's first ~10 ms cross the stack.
 * Short connections are most of a microservice's: in the cluster simulator's traffic a
 * 100 ms drain left 48% of packets on the fast path, 10 ms 69%, 1 ms 74% (each wake-up
 * of an empty queue is one map read).
 */
export const CT_DRAIN_INTERVAL_MS = 10;
/** How often ct_admitted loses its entries past the recheck time. */
const ADMITTED_SWEEP_NS = 2_000_000_000n;

export interface CtDrainStats {
  /** Entries made liberal. */
  liberal: number;
  /** Queued flows that had no entry any more (closed, timed out). */
  gone: number;
  /** Drains that failed (ctnetlink refused, or the map could not be read). */
  failures: number;
  /** ct_admitted entries deleted as past their recheck time. */
  admittedSwept: number;
}

/** The part of the conntrack table the drain uses (dataplane/conntrack.ts Conntrack; the cluster simulator gives its hosts' tables). */
export type LiberalTable = Pick<Conntrack, 'makeLiberal' | 'close'>;

export class ConntrackDrain {
  readonly stats: CtDrainStats = { liberal: 0, gone: 0, failures: 0, admittedSwept: 0 };
  private ct: LiberalTable | undefined;
  private lastError = '';
  private lastSweep = 0n;

  /** open and now: the host's conntrack and clock (the cluster simulator gives its own). */
  constructor(
    private readonly pending: MapOps,
    private readonly admitted: MapOps,
    private readonly log: Log,
    private readonly open: () => LiberalTable = () => new Conntrack(),
    private readonly now: () => bigint = monotonicCoarseNs,
  ) {}

  /**
   * Empties ct_pending once, and now and then sweeps ct_admitted. Never throws:
   * a failure is counted and logged when it changes.
   */
  drain(): void {
    try {
      const t = this.now();
      if (t - this.lastSweep >= ADMITTED_SWEEP_NS) {
        this.lastSweep = t;
        this.sweepAdmitted();
      }
      const queued = this.pending.entries();
      if (queued.length === 0) return;
      this.ct ??= this.open();
      for (const [key] of queued) {
        const t = ctTuple.decode(key);
        const found = this.ct.makeLiberal({ src: t.saddr, dst: t.daddr, sport: t.sport, dport: t.dport, proto: t.protocol });
        if (found) this.stats.liberal++;
        else this.stats.gone++;
        // Deleted after the update: a packet that queues it again meanwhile finds it liberal next time.
        this.pending.delete(key);
      }
      if (this.lastError) this.log.info('conntrack: entries are made liberal again');
      this.lastError = '';
    } catch (e) {
      this.stats.failures++;
      const msg = (e as Error).message;
      if (msg !== this.lastError) this.log.warn(`conntrack: cannot make queued flows liberal (they stay on the host stack): ${msg}`);
      this.lastError = msg;
      this.ct?.close();
      this.ct = undefined;
    }
  }

  /**
   * A cached admission past XMASQ_CT_RECHECK_NS is never used again (the next packet looks
   * its flow up anew and rewrites it); deleting those keeps room for new flows.
   */
  private sweepAdmitted(): void {
    const bound = this.now() - CT_RECHECK_NS;
    const old: Buffer[] = [];
    for (const [k, v] of this.admitted.lookupBatch()) {
      if (ctAdmission.decode(v).checked < bound) old.push(Buffer.from(k));
    }
    if (old.length) this.stats.admittedSwept += this.admitted.deleteBatch(old);
  }

  close(): void {
    this.ct?.close();
    this.ct = undefined;
  }
}
