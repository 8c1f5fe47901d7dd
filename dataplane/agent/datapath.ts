/**
 * The kernel side of the agent: the object loaded with its maps pinned (or
 * reused from their pins), and the programs it attached to TC hooks, as
 * cls_bpf filters or tcx links, so that every one of them can be taken off
 * again.
 */
import { existsSync, mkdirSync, readdirSync, rmdirSync, statSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import {
  BpfMap, BpfObject, LibbpfError, closeLink, openPinnedLink, pinLink, tcAttach, tcDetach, tcQuery, tcxAttach, tcxLinkDetach, tcxLinkInfo, tcxLinkUpdate, withNetns,
  type BpfProgram, type TcHookPoint,
} from '../libbpf.ts';
import {
  COUNTER_COUNT, COUNTER_NAMES, ConfigFlag, MAPS, MAX_ENTRIES, NO_OVERLAY, NO_SERVICES, WIDE_KEY_MIN, arrayIndex, config, counterValue, ingressKey,
  path, type CounterName,
} from '../maps.ts';
import type { ObjectMapName, ProgramName } from '../generated/objects.ts';
import { activeHalf, fillEgressFilter } from './filter.ts';
import type { Log } from './log.ts';
import type { AttachKind, Attachment, Mode } from './protocol.ts';

/**
 * Every filter of ours sits at this handle ('XM') and priority, so the agent
 * (or `cleanup` after a crash) finds exactly its own filters and never
 * touches another tool's.
 */
export const TC_HANDLE = 0x584d;
export const TC_PRIORITY = 1;

/**
 * A tcx link lives while an fd or a pin holds it, so each of ours is pinned
 * beside the maps, named after its hook: the next agent (after a hand-over,
 * a crash, or a SIGTERM that left restore) finds it there and swaps the
 * program in place (BPF_LINK_UPDATE), and `cleanup` finds every one. No map
 * name starts with this.
 */
export const LINK_PIN_PREFIX = 'tcx_';

/** The pin of our link at ifindex/where (of netns's device when given: ifindexes repeat across namespaces). */
export function linkPinName(ifindex: number, where: TcHookPoint, netns?: string): string {
  return `${LINK_PIN_PREFIX}${where}_${ifindex}${netns ? `_ns${statSync(netns).ino}` : ''}`;
}

/**
 * The maps the agent pins; the test build's redirect_trace never reaches an
 * agent. ct_recent, each CPU's first-level admission cache, is not pinned:
 * every load starts with its own, empty, and no slot answers past the
 * admission it copies (bpf/maps.h), so the next agent has nothing to reuse;
 * cleanup still removes a pin of that name (unpinAll: every map's name).
 */
export const PINNED_MAPS = [
  'pod_info', 'egress_cache', 'egress_filter', 'ingress_cache', 'config', 'policy_table', 'policy_start', 'ct_pending', 'ct_admitted', 'nodes', 'clock', 'counters',
] as const satisfies readonly ObjectMapName<'production'>[];
export type PinnedMap = (typeof PINNED_MAPS)[number];
/**
 * Maps earlier versions pinned and this one no longer has (the policy's hash
 * per mask, then its LPM classifier, before the tables): removed once this
 * version's datapath is loaded, and by cleanup, so an upgraded node keeps no
 * orphan pins. The earlier programs, attached until this version's replace
 * them, keep their own maps whole meanwhile: new names, not new contents.
 */
export const RETIRED_MAPS = ['policy_rules', 'policy_masks', 'policy_trie', 'policy_root'] as const;
/**
 * Pinned maps an earlier version created with other flags: the pod pairs'
 * caches were preallocated (bpf/maps.h says why they are not now). libbpf
 * reuses no pin whose flags differ, so load() moves their entries into this
 * version's maps (takeReflagged, putBack) instead of refusing to start.
 */
export const REFLAGGED_MAPS = ['egress_cache', 'ingress_cache'] as const satisfies readonly PinnedMap[];

/** A pinned map of an earlier version's flags, its pin removed, its entries read. */
interface Reflagged { name: PinnedMap; path: string; old: BpfMap; entries: Array<[Buffer, Buffer]>; flags: number }

/**
 * The REFLAGGED_MAPS pinned with the shape of the object's map but other
 * flags: their entries are read and their pins removed, so that the load
 * creates this version's maps in their place. Each is pushed to `out` as soon
 * as its pin is gone, so that a failure at the next one still puts it back
 * (putBack). A map of another shape is left pinned: libbpf refuses it, with
 * load()'s message. The earlier programs still attached keep the old map
 * until they are replaced; what they learn meanwhile is learnt again from the
 * overlay.
 */
function takeReflagged(obj: BpfObject, pinDir: string, out: Reflagged[]): void {
  for (const name of REFLAGGED_MAPS) {
    const path = join(pinDir, name);
    if (!existsSync(path)) continue;
    const old = BpfMap.fromPinned(path);
    const want = obj.map(name);
    if (old.type !== want.type || old.keySize !== want.keySize || old.valueSize !== want.valueSize ||
        old.maxEntries !== want.maxEntries || old.mapFlags === want.mapFlags) {
      old.close();
      continue;
    }
    try {
      const entries = old.lookupBatch();
      unlinkSync(path);
      out.push({ name, path, old, entries, flags: old.mapFlags });
    } catch (e) {
      old.close();
      throw e;
    }
  }
}

/** After a failed load: the earlier maps pinned back where they were, entries and all. */
function putBack(taken: Reflagged[], log: Log): void {
  for (const t of taken) {
    try {
      if (!existsSync(t.path)) t.old.pin(t.path);
    } catch (e) {
      log.warn(`could not pin ${t.name} of the earlier version back at ${t.path}: ${(e as Error).message}`);
    }
    t.old.close();
  }
}

const ZERO = arrayIndex.encode({ index: 0 });

export class Datapath {
  private readonly attachments: Attachment[] = [];
  /** The fds of the tcx links this agent holds, by pin path. */
  private readonly links = new Map<string, number>();

  private constructor(
    private readonly obj: BpfObject,
    readonly mode: Mode,
    readonly attachKind: AttachKind,
    readonly pinDir: string,
    readonly maps: Record<PinnedMap, BpfMap>,
    /** Maps found pinned and reused; the rest were created and pinned now. */
    readonly reused: PinnedMap[],
    private readonly log: Log,
  ) {}

  /**
   * Opens and loads the object with every map's pin path set: libbpf reuses
   * each map already pinned there, keeping its entries, and creates and pins
   * the others. A failed load unpins what it pinned, so nothing is left half made.
   */
  static load(objectPath: string, mode: Mode, attachKind: AttachKind, pinDir: string, log: Log): Datapath {
    const existed = PINNED_MAPS.filter((m) => existsSync(join(pinDir, m)));
    const madeDir = !existsSync(pinDir);
    mkdirSync(pinDir, { recursive: true, mode: 0o700 });
    let obj: BpfObject | undefined;
    const taken: Reflagged[] = [];
    try {
      obj = BpfObject.open(objectPath);
      const programs = obj.programs();
      const need: ProgramName<'rpeer'>[] = ['init', 'restore', mode === 'rpeer' ? 'masq_rpeer' : 'masq', 'clock_probe'];
      const missing = need.filter((p) => !programs.includes(p));
      if (missing.length) throw new Error(`${objectPath} has no program ${missing.join(', ')} (it has ${programs.join(', ')}): ${mode === 'rpeer' ? 'point --rpeer-object at xmasq.rpeer.bpf.o' : 'point --object at xmasq.bpf.o'}`);
      const maps = obj.maps();
      const absent = PINNED_MAPS.filter((m) => !maps.includes(m));
      if (absent.length) throw new Error(`${objectPath} has no map ${absent.join(', ')}: it is not an XMasq datapath object of this version`);
      for (const m of PINNED_MAPS) obj.map(m).setPinPath(join(pinDir, m));
      takeReflagged(obj, pinDir, taken);
      try {
        obj.load();
      } catch (e) {
        const log = e instanceof LibbpfError ? e.log : '';
        const bad = /couldn't reuse pinned map at '([^']+)'/.exec(log)?.[1];
        if (bad) {
          throw new Error(`the map pinned at ${bad} does not match ${objectPath} (another build, or other map sizes): remove the old pins with 'xmasq-agent cleanup --pin-dir ${pinDir}' (cached flows fall back to the overlay and relearn)\n${(e as Error).message}`);
        }
        throw e;
      }
      const m = Object.fromEntries(PINNED_MAPS.map((n) => [n, obj!.map(n)])) as Record<PinnedMap, BpfMap>;
      for (const t of taken.splice(0)) {
        let refused = 0;
        for (const [k, v] of t.entries) {
          try {
            m[t.name].update(k, v, 'noexist');
          } catch {
            refused++; // the new map is as large as the old: only a failed allocation; the pair relearns
          }
        }
        t.old.close();
        log.info(`moved ${t.entries.length - refused} of ${t.entries.length} ${t.name} entries pinned by an earlier version (map flags ${t.flags}) into this version's map (flags ${m[t.name].mapFlags})`);
      }
      for (const n of PINNED_MAPS) {
        if (!m[n].isPinned) throw new Error(`libbpf did not pin map ${n} at ${join(pinDir, n)}`);
      }
      for (const r of RETIRED_MAPS) {
        const p = join(pinDir, r);
        if (!existsSync(p)) continue;
        // the programs of the earlier version still hold it until they are replaced; the pin is all we drop
        unlinkSync(p);
        log.info(`removed ${p}, pinned by an earlier version (its rules are in the state file and now in policy_table)`);
      }
      if (!existed.includes('egress_filter') && existed.includes('egress_cache')) {
        // An upgrade from a version without the filter: its programs, still
        // attached, never touch the new map, so both halves are written plainly.
        const bits = fillEgressFilter(m.egress_cache, m.egress_filter);
        log.info(`filled egress_filter (new in this version) from the pinned egress entries: ${bits} bit(s)`);
      }
      if (m.pod_info.maxEntries === MAX_ENTRIES.test.pods) {
        log.warn(`${objectPath} is the test build (pod_info holds ${MAX_ENTRIES.test.pods} pods): use bpf/build/xmasq.bpf.o in production`);
      }
      return new Datapath(obj, mode, attachKind, pinDir, m, existed, log);
    } catch (e) {
      obj?.close();
      putBack(taken, log);
      if (madeDir) {
        try {
          rmdirSync(pinDir);
        } catch {
          // libbpf left something we did not expect; cleanup will list it
        }
      }
      throw e;
    }
  }

  /**
   * Points masq at the NIC and the Service range (if any), tells init whether
   * to draw wide keys, all three the overlay's UDP ports, and restore where to
   * hand what the host stack must see (the overlay device, if any). The half
   * of egress_filter masq reads stays the one the pinned config names: the
   * other may be stale (filter.ts).
   */
  writeConfig(nicIfindex: number, wideKeys: boolean, ports: { vxlan: number; geneve: number }, overlay?: { ifindex: number; mac: string }, services?: { net: string; mask: string }): void {
    const half = activeHalf(this.maps.config) ? ConfigFlag.FILTER_HALF1 : 0;
    this.maps.config.update(ZERO, config.encode({
      nic_ifindex: nicIfindex, flags: (wideKeys ? ConfigFlag.WIDE_KEYS : 0) | half,
      ...(overlay ? { overlay_ifindex: overlay.ifindex, overlay_mac: overlay.mac } : NO_OVERLAY),
      ...(services ? { service_net: services.net, service_mask: services.mask } : NO_SERVICES),
      vxlan_port: ports.vxlan, geneve_port: ports.geneve,
    }));
  }

  /**
   * With wide keys turned off (the underlay rewrites their carrier), the pairs
   * that hold one must learn a narrow key: their ingress entries and our
   * egress entries that name them go, so the pairs cross the overlay again,
   * where init draws a narrow key and signals it. Returns how many went.
   */
  /** clock_probe, never attached: the agent runs it to calibrate the clock map (clock.ts). */
  clockProbe(): BpfProgram {
    return this.obj.program('clock_probe');
  }

  dropWideKeys(): number {
    let n = 0;
    for (const [k] of this.maps.ingress_cache.entries()) {
      if (ingressKey.decode(k).key >= WIDE_KEY_MIN && this.maps.ingress_cache.delete(k)) n++;
    }
    for (const [k, v] of this.maps.egress_cache.entries()) {
      if (path.decode(v).local_key >= WIDE_KEY_MIN && this.maps.egress_cache.delete(k)) n++;
    }
    return n;
  }

  counters(): Record<string, number> {
    const out: Record<string, number> = {};
    for (let i = 0; i < COUNTER_COUNT; i++) {
      const per = this.maps.counters.lookupPerCpu(arrayIndex.encode({ index: i })) ?? [];
      let sum = 0n;
      for (const v of per) sum += counterValue.decode(v).value;
      out[(COUNTER_NAMES[i] as CounterName).toLowerCase()] = Number(sum);
    }
    return out;
  }

  list(): Attachment[] {
    return this.attachments.map((a) => ({ ...a }));
  }

  /**
   * Attaches program at ifindex (inside netns when given) as this datapath's
   * kind, replacing ours left there by an earlier agent without a moment
   * where packets pass unhandled: a cls_bpf filter with BPF_TC_F_REPLACE, a
   * pinned tcx link with BPF_LINK_UPDATE. What an earlier agent left there
   * as the other kind goes once ours is attached (switching kinds between
   * runs), so the hook is never without one of the two.
   */
  attach(program: ProgramName<'rpeer'>, dev: string, ifindex: number, where: TcHookPoint, netns?: string): Attachment {
    const prog = this.obj.program(program);
    let a: Attachment;
    try {
      a = this.attachKind === 'tcx' ? this.attachLink(program, prog, dev, ifindex, where, netns) : this.attachFilter(program, prog, dev, ifindex, where, netns);
    } catch (e) {
      const at = describe({ dev, ifindex, where, netns });
      // The kernel keeps one classifier kind per priority: EINVAL here is
      // nearly always someone else's non-BPF filter at our priority.
      const hint = this.attachKind === 'cls_bpf' && e instanceof LibbpfError && e.code === 'EINVAL'
        ? `\nanother kind of filter may hold priority ${TC_PRIORITY} there: see '${netns ? `nsenter --net=${netns} ` : ''}tc filter show dev ${dev} ${where}'`
        : '';
      throw new Error(`cannot attach ${program} at ${at}: ${(e as Error).message}${hint}`);
    }
    this.attachments.push(a);
    this.log.debug(`attached ${program} at ${describe(a)} as ${describeKind(a)} (prog id ${a.progId})`);
    try {
      const other = this.attachKind === 'tcx' ? detachOurs(ifindex, where, netns) : removeLink(join(this.pinDir, linkPinName(ifindex, where, netns)));
      if (other) this.log.info(`${describe(a)}: took off the ${this.attachKind === 'tcx' ? 'cls_bpf filter' : 'tcx link'} an earlier agent left there, now that ${program} runs there as ${describeKind(a)}`);
    } catch (e) {
      this.log.warn(`${describe(a)}: could not take off what an earlier agent attached there as ${this.attachKind === 'tcx' ? 'a cls_bpf filter' : 'a tcx link'}: ${(e as Error).message}`);
    }
    return a;
  }

  private attachFilter(program: string, prog: BpfProgram, dev: string, ifindex: number, where: TcHookPoint, netns?: string): Attachment {
    const doIt = () => tcAttach(ifindex, where, prog, { handle: TC_HANDLE, priority: TC_PRIORITY, replace: true });
    const r = netns ? withNetns(netns, doIt) : doIt();
    return { program, dev, ifindex, where, kind: 'cls_bpf', progId: r.progId, ...(netns ? { netns } : {}) };
  }

  /**
   * The link pinned for this hook gets the program in place if it still
   * holds the hook; else (none, or defunct: its device went, and an ifindex
   * may come back on another device) a new link goes in front of the hook's
   * programs and is pinned.
   */
  private attachLink(program: string, prog: BpfProgram, dev: string, ifindex: number, where: TcHookPoint, netns?: string): Attachment {
    const pin = join(this.pinDir, linkPinName(ifindex, where, netns));
    const held = this.links.get(pin) ?? openPinnedLink(pin);
    if (held !== undefined) {
      this.links.set(pin, held);
      let info: ReturnType<typeof tcxLinkInfo> | undefined;
      try {
        info = tcxLinkInfo(held, pin);
      } catch {
        // not a tcx link: the pin goes below
      }
      if (info && info.ifindex === ifindex && info.where === where) {
        tcxLinkUpdate(held, prog, pin);
        return { program, dev, ifindex, where, kind: 'tcx', progId: prog.id, linkId: info.id, pin, ...(netns ? { netns } : {}) };
      }
      this.links.delete(pin);
      removeLink(pin, held);
    }
    const doIt = () => tcxAttach(ifindex, where, prog);
    const fd = netns ? withNetns(netns, doIt) : doIt();
    try {
      pinLink(fd, pin);
    } catch (e) {
      closeLink(fd);
      throw e;
    }
    this.links.set(pin, fd);
    return { program, dev, ifindex, where, kind: 'tcx', progId: prog.id, linkId: tcxLinkInfo(fd, pin).id, pin, ...(netns ? { netns } : {}) };
  }

  /**
   * Takes a program off, if it is still the one we attached: a device that
   * disappeared took its filters along (a tcx link stays, defunct, until
   * its pin goes), and a program some other agent put in our place is not
   * ours to remove. Returns whether a program was taken off a hook.
   */
  detach(a: Attachment): boolean {
    const i = this.attachments.indexOf(a);
    if (i >= 0) this.attachments.splice(i, 1);
    const removed = a.kind === 'tcx' ? this.detachLink(a) : this.detachFilter(a);
    if (removed) this.log.debug(`detached ${a.program} from ${describe(a)}`);
    return removed;
  }

  private detachFilter(a: Attachment): boolean {
    const doIt = (): boolean => {
      let id: number | undefined;
      try {
        id = tcQuery(a.ifindex, a.where, TC_HANDLE, TC_PRIORITY);
      } catch (e) {
        if (e instanceof LibbpfError && e.code === 'ENODEV') return false;
        throw e;
      }
      if (id === undefined) return false;
      if (id !== a.progId) {
        this.log.warn(`${describe(a)} holds program id ${id}, not our ${a.progId}: left alone`);
        return false;
      }
      tcDetach(a.ifindex, a.where, TC_HANDLE, TC_PRIORITY);
      return true;
    };
    if (a.netns && !existsSync(a.netns)) return false; // the pod's namespace is gone, and its filters with it
    return a.netns ? withNetns(a.netns, doIt) : doIt();
  }

  /** A link's fd works from any namespace: no need to enter the pod's. */
  private detachLink(a: Attachment): boolean {
    const pin = a.pin!;
    const fd = this.links.get(pin) ?? openPinnedLink(pin);
    this.links.delete(pin);
    if (fd === undefined) return false;
    let info: ReturnType<typeof tcxLinkInfo> | undefined;
    try {
      info = tcxLinkInfo(fd, pin);
    } catch {
      // not a link of ours: its pin goes all the same, below
    }
    if (info && info.ifindex !== 0 && info.progId !== a.progId) {
      this.log.warn(`${describe(a)}: the link pinned at ${pin} holds program id ${info.progId}, not our ${a.progId}: left alone`);
      closeLink(fd);
      return false;
    }
    return removeLink(pin, fd);
  }

  /** Drops a record without touching the kernel: a replacing attach() took the hook over. */
  forget(a: Attachment): void {
    const i = this.attachments.indexOf(a);
    if (i >= 0) this.attachments.splice(i, 1);
  }

  /**
   * Detaches everything but keep, last attached first; returns the failures
   * instead of stopping at the first.
   */
  detachAll(keep: readonly Attachment[] = []): string[] {
    const errors: string[] = [];
    for (const a of [...this.attachments].reverse()) {
      if (keep.includes(a)) continue;
      try {
        this.detach(a);
      } catch (e) {
        errors.push(`${describe(a)}: ${(e as Error).message}`);
      }
    }
    return errors;
  }

  /**
   * Removes the links pinned in pinDir that no attachment of this agent
   * holds: those of pods dropped at start, and defunct ones whose device is
   * gone (a link outlives its device while pinned). Returns how many went.
   */
  sweepLinks(): number {
    const ours = new Set(this.attachments.map((a) => a.pin).filter((p): p is string => p !== undefined));
    let n = 0;
    for (const name of existsSync(this.pinDir) ? readdirSync(this.pinDir) : []) {
      const pin = join(this.pinDir, name);
      if (!name.startsWith(LINK_PIN_PREFIX) || ours.has(pin)) continue;
      const fd = this.links.get(pin);
      this.links.delete(pin);
      removeLink(pin, fd);
      n++;
    }
    return n;
  }

  /** Whether the hook at a still runs the program we attached. */
  isAttached(a: Attachment): boolean {
    try {
      if (a.kind === 'tcx') {
        const fd = this.links.get(a.pin!);
        if (fd === undefined) return false;
        const info = tcxLinkInfo(fd, a.pin);
        return info.ifindex === a.ifindex && info.progId === a.progId;
      }
      const q = () => tcQuery(a.ifindex, a.where, TC_HANDLE, TC_PRIORITY);
      return (a.netns ? withNetns(a.netns, q) : q()) === a.progId;
    } catch {
      return false;
    }
  }

  /** Closes the object and our fds of the links: their pins keep the links, and the programs on the hooks. */
  close(): void {
    for (const fd of this.links.values()) closeLink(fd);
    this.links.clear();
    this.obj.close();
  }
}

export function describe(a: Pick<Attachment, 'dev' | 'ifindex' | 'where' | 'netns'>): string {
  return `${a.dev} (ifindex ${a.ifindex}) ${a.where}${a.netns ? ` in ${a.netns}` : ''}`;
}

function describeKind(a: Attachment): string {
  return a.kind === 'tcx' ? `tcx link ${a.linkId}` : 'cls_bpf filter';
}

/**
 * Takes the link pinned at pin off its hook (BPF_LINK_DETACH: at once,
 * whoever else holds it) and removes the pin; fd, when given, is an open fd
 * of that link, closed here. Returns whether a program left a hook (false
 * when nothing was pinned, or the link was defunct already).
 */
export function removeLink(pin: string, fd?: number): boolean {
  const f = fd ?? openPinnedLink(pin);
  if (f === undefined) return false;
  try {
    let live = false;
    try {
      live = tcxLinkInfo(f, pin).ifindex !== 0;
    } catch {
      // not a tcx link (a file of another kind under our name): only unpinned
    }
    if (live) tcxLinkDetach(f, pin);
    unlinkSync(pin);
    return live;
  } finally {
    closeLink(f);
  }
}

/** Every link pinned in pinDir taken off its hook and unpinned (`cleanup`); returns how many were on a hook. */
export function removeLinks(pinDir: string): number {
  let n = 0;
  for (const name of existsSync(pinDir) ? readdirSync(pinDir) : []) {
    if (name.startsWith(LINK_PIN_PREFIX) && removeLink(join(pinDir, name))) n++;
  }
  return n;
}

/**
 * Detaches whatever cls_bpf filter of ours sits at ifindex/where, without
 * knowing which program it runs: for `cleanup` after an agent died without
 * detaching, and for an agent on tcx replacing an earlier agent's filters.
 */
export function detachOurs(ifindex: number, where: TcHookPoint, netns?: string): boolean {
  const doIt = () => {
    if (tcQuery(ifindex, where, TC_HANDLE, TC_PRIORITY) === undefined) return false;
    tcDetach(ifindex, where, TC_HANDLE, TC_PRIORITY);
    return true;
  };
  if (netns && !existsSync(netns)) return false;
  try {
    return netns ? withNetns(netns, doIt) : doIt();
  } catch (e) {
    if (e instanceof LibbpfError && e.code === 'ENODEV') return false;
    throw e;
  }
}

/**
 * Removes the pins of every XMasq map and link in pinDir, and pinDir when
 * that empties it; a pinned link is taken off its hook first. Only names
 * XMasq declares are touched, so a mistyped --pin-dir cannot wipe another
 * tool's pins. The maps live on while a program still holds them.
 * removed lists every pin removed, the links' included; linksDetached counts
 * the links that were still on a hook.
 */
export function unpinAll(pinDir: string): { removed: string[]; leftover: string[]; linksDetached: number } {
  const removed: string[] = [];
  if (!existsSync(pinDir)) return { removed, leftover: [], linksDetached: 0 };
  const links = readdirSync(pinDir).filter((n) => n.startsWith(LINK_PIN_PREFIX)).map((n) => join(pinDir, n));
  const linksDetached = removeLinks(pinDir);
  removed.push(...links);
  for (const name of [...Object.keys(MAPS), ...RETIRED_MAPS]) {
    const p = join(pinDir, name);
    if (existsSync(p)) {
      unlinkSync(p);
      removed.push(p);
    }
  }
  const leftover = readdirSync(pinDir);
  if (leftover.length === 0) rmdirSync(pinDir);
  return { removed, leftover, linksDetached };
}

/** Opens pinned maps without loading anything (the CLI's offline dump). Close them when done. */
export function openPinned<N extends PinnedMap>(pinDir: string, names: readonly N[]): Record<N, BpfMap> {
  const out = {} as Record<N, BpfMap>;
  try {
    for (const n of names) out[n] = BpfMap.fromPinned(join(pinDir, n));
  } catch (e) {
    for (const m of Object.values<BpfMap>(out)) m.close();
    throw e;
  }
  return out;
}
