/**
 * xmasq-agent: owns the datapath of one host. Loads the programs with their
 * maps pinned, attaches them at the NIC and at each pod, serves the pod and
 * policy protocol on a unix socket, expires idle cache entries, and exports
 * metrics.
 */
import type { Server } from 'node:http';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { macToBytes } from '../layout.ts';
import { NO_HOST_NETNS, podInfo, podIp } from '../maps.ts';
import { hostNetnsSeenFrom, type HostNetns } from '../netlink.ts';
import { dumpEgress, dumpIngress, expire, purgePod, countEntries, nodeWords, sweepNodes, type NodeWords } from './caches.ts';
import { ConfigError, checkObject, parseCidr, type AgentConfig } from './config.ts';
import { CT_DRAIN_INTERVAL_MS, ConntrackDrain } from './conntrack.ts';
import { Datapath, describe, unpinAll } from './datapath.ts';
import { rebuildEgressFilter } from './filter.ts';
import type { Log } from './log.ts';
import { renderMetrics, startHttp } from './metrics.ts';
import { NodeSet } from './nodes.ts';
import { ifIndexToName, ifNameToIndex, monotonicCoarseNs } from './native.ts';
import { ClockKeeper } from './clock.ts';
import { BpfMap, haveTcx, withNetns } from '../libbpf.ts';
import { PolicyTable, describeRule } from './policy.ts';
import {
  OPS, PROTOCOL_VERSION, type AgentStatus, type AttachKind, type Attachment, type DiscoveryStatus, type Mode, type Op, type PodRecord, type PodSpec, type Purged,
  type ReplyMap,
} from './protocol.ts';
import { planDiscovery, survey, type FoundPod } from './discovery.ts';
import { DEPTH_LIMIT, LINE_LIMIT, SocketServer } from './server.ts';
import { StateDir } from './state.ts';
import { bpffsProblem, capabilityProblem, clsactProblem, defaultNic, kernelHasRpeer, linkByIndex, overlayDevice, tunnelPorts, type OverlayDevice } from './system.ts';

interface Pod {
  record: PodRecord;
  masq?: Attachment;
}

/** The node set follows the overlay device's FDB at most this often (on expiry scans). */
const NODE_SYNC_MS = 1000;

/**
 * After a DEL, discovery leaves the pod's address alone this long: the DEL
 * comes first in the runtime's teardown (the xmasq plugin is last in the
 * chain, so it is the first to get DEL), and the pod's veth, with the address
 * on its peer, stays until the plugins after it have run.
 */
const DEL_GUARD_MS = 10_000;

/** A request the client got wrong: the reply says so, nothing is logged as an agent failure. */
class RequestError extends Error {}

const isIpv4 = (s: unknown): s is string =>
  typeof s === 'string' && /^\d{1,3}(\.\d{1,3}){3}$/.test(s) && s.split('.').every((p) => Number(p) <= 255 && String(Number(p)) === p);

export class Agent {
  private dp: Datapath | undefined;
  /** The clock map's keeper (clock.ts): calibrated at start, re-based at every scan. */
  private clock: ClockKeeper | undefined;
  private policy: PolicyTable | undefined;
  private readonly pods = new Map<string, Pod>();
  private nic = { name: '', ifindex: 0 };
  private overlay: OverlayDevice | undefined;
  private mode: Mode = 'veth';
  private modeReason = '';
  private attachKind: AttachKind = 'cls_bpf';
  private attachReason = '';
  private objectPath = '';
  private nicFilters: Attachment[] = [];
  private sock: SocketServer | undefined;
  private http: Server | undefined;
  private timer: NodeJS.Timeout | undefined;
  private ctTimer: NodeJS.Timeout | undefined;
  private ctDrain: ConntrackDrain | undefined;
  private nodes: NodeSet | undefined;
  private lastNodeSync = 0;
  /** The node set changed at the last sync: the next one sweeps the caches again (syncNodes). */
  private nodeSweepDue = false;
  /** Egress entries deleted since egress_filter was last rebuilt: each may have left a bit of no entry. */
  private egressGone = 0;
  /** A rebuild failed at start: the next scan rebuilds whatever went. */
  private filterDue = false;
  private discoveryTimer: NodeJS.Timeout | undefined;
  private discovering = false;
  /** Pods a DEL removed, by IP: when, and the veth they were on (discovery leaves them alone). */
  private readonly deleted = new Map<string, { at: number; veth?: { ifindex: number; name: string } }>();
  /** What discovery last said about each veth it did not serve a pod on, so that each change is logged once. */
  private discoveryNotes = new Map<string, string>();
  private readonly discoveryStats = {
    rounds: 0,
    lastRoundAt: undefined as string | undefined,
    notServed: [] as DiscoveryStatus['notServed'],
    failing: undefined as { since: string; error: string } | undefined,
  };
  private ready = false;
  private stopping = false;
  private readonly state: StateDir;
  private readonly startedAt = new Date();
  private readonly stats = {
    expired: { egress: 0, ingress: 0 },
    scans: 0,
    lastScanSeconds: 0,
    lastScanAt: undefined as string | undefined,
    /** Why the last scan failed, and since when; undefined once one succeeds. */
    scanFailing: undefined as { since: string; error: string } | undefined,
    scanFailures: 0,
    requests: Object.fromEntries(OPS.map((o) => [o, 0])) as Record<string, number>,
  };

  constructor(readonly cfg: AgentConfig, private readonly log: Log) {
    this.state = new StateDir(cfg.stateDir);
  }

  // -------------------------------------------------------------------------
  // start / stop
  // -------------------------------------------------------------------------

  /** Checks everything it can first; on any failure undoes what it did and throws. */
  async start(): Promise<void> {
    const cfg = this.cfg;
    const cap = capabilityProblem();
    if (cap) throw new ConfigError(cap);
    this.nic = resolveNic(cfg);
    this.overlay = this.resolveOverlay();
    const fsProblem = bpffsProblem(cfg.pinDir);
    if (fsProblem) throw new ConfigError(fsProblem);
    this.decideAttach();
    this.decideMode();
    const storedPods = this.state.readPods(cfg.pinDir);
    const storedRules = this.state.readPolicy(cfg.pinDir);
    this.log.info(`nic ${this.nic.name} (ifindex ${this.nic.ifindex}), mode ${this.mode} (${this.modeReason}), attach ${this.attachKind} (${this.attachReason}), pins ${cfg.pinDir}`);

    try {
      this.sock = await SocketServer.listen(cfg.socket, (line) => this.handleLine(line), this.log, {
        maxLineBytes: LINE_LIMIT, maxDepth: DEPTH_LIMIT, maxConnections: cfg.socketMaxConns, idleSeconds: cfg.socketIdleSeconds,
      });
      if (cfg.metricsListen !== 'off') {
        this.http = await startHttp(cfg.metricsListen, {
          metrics: () => this.metrics(), health: () => this.health(),
          error: (e) => this.log.warn(`metrics endpoint: ${e.message} (it goes on serving)`),
        });
      }
      // From here to the end of the block nothing awaits: no request is served
      // before the datapath is complete, and a failure undoes all of it.
      this.startDatapath(storedPods, storedRules);
    } catch (e) {
      await this.closeEndpoints();
      throw e;
    }
    // Now that our init and restore are attached, every new entry sets its bit:
    // the entries pinned before (an earlier version's among them) get theirs here.
    try {
      this.rebuildFilter();
    } catch (e) {
      this.log.warn(`egress_filter not rebuilt at start (${(e as Error).message}): the first expiry scan tries again`);
      this.filterDue = true;
    }
    this.timer = setInterval(() => this.scan(), cfg.scanIntervalSeconds * 1000);
    // Flows masq and restore queued for a liberal conntrack entry (bpf/conntrack.h).
    const drain = new ConntrackDrain(this.dp!.maps.ct_pending, this.dp!.maps.ct_admitted, this.log);
    this.ctDrain = drain;
    this.ctTimer = setInterval(() => drain.drain(), CT_DRAIN_INTERVAL_MS);
    if (cfg.discoverPods) {
      // The pods already on the host are served before the first request is.
      await this.discover();
      this.scheduleDiscovery();
    }
    this.ready = true;
    this.log.info(`ready: ${this.pods.size} pod(s), ${this.policy!.list().length} rule(s); socket ${cfg.socket}${this.http ? `, metrics http://${cfg.metricsListen}/metrics` : ''}`);
  }

  /** The overlay device restore hands what the host stack must see to (system.ts overlayDevice). */
  private resolveOverlay(): OverlayDevice | undefined {
    let found: ReturnType<typeof overlayDevice>;
    try {
      found = overlayDevice(this.nic.name, this.cfg.overlayDev);
    } catch (e) {
      throw new ConfigError((e as Error).message);
    }
    if (found.dev) this.log.info(`overlay device ${found.dev.name} (ifindex ${found.dev.ifindex}, ${found.why}): restored packets the host stack must handle are received there`);
    else this.log.warn(`no overlay device (${found.why}): restored packets the host stack must handle go up the stack at ${this.nic.name}, where a strict rp_filter (net.ipv4.conf.${this.nic.name}.rp_filter=1) would drop them`);
    return found.dev;
  }

  /**
   * tcx links where the kernel has them (a probe of lo's tcx hook, not the
   * version string: a backport counts, a kernel built without it does not),
   * else cls_bpf filters. Decided before anything is attached.
   */
  private decideAttach(): void {
    const setting = this.cfg.attach;
    const tcx = haveTcx();
    if (setting === 'tcx' && !tcx) {
      throw new ConfigError('--attach (attach) = "tcx": this kernel has no tcx links (Linux 6.6+; querying lo\'s tcx ingress failed): use --attach cls_bpf, or auto');
    }
    this.attachKind = setting === 'auto' ? (tcx ? 'tcx' : 'cls_bpf') : setting;
    this.attachReason = setting !== 'auto' ? 'set by --attach' : tcx ? 'auto: the kernel has tcx links' : 'auto: the kernel has no tcx links';
    if (this.attachKind === 'cls_bpf') {
      const tc = clsactProblem();
      if (tc) throw new ConfigError(tc);
    }
  }

  private decideMode(): void {
    const cfg = this.cfg;
    if (cfg.mode === 'veth') {
      this.mode = 'veth';
      this.modeReason = 'set by --mode';
    } else {
      const k = kernelHasRpeer();
      if (cfg.mode === 'rpeer') {
        if (!k.present) throw new ConfigError(`--mode (mode) = "rpeer": ${k.why}; use --mode veth, or auto`);
        this.mode = 'rpeer';
        this.modeReason = `set by --mode; ${k.why}`;
      } else if (k.present && existsSync(cfg.rpeerObject)) {
        this.mode = 'rpeer';
        this.modeReason = `auto: ${k.why}`;
      } else {
        this.mode = 'veth';
        this.modeReason = k.present ? `auto: the kernel has bpf_redirect_rpeer but ${cfg.rpeerObject} is missing` : `auto: ${k.why}`;
      }
    }
    this.objectPath = this.mode === 'rpeer' ? cfg.rpeerObject : cfg.object;
    checkObject(this.mode === 'rpeer' ? 'rpeerObject' : 'object', this.objectPath);
  }

  private loadDatapath(): Datapath {
    try {
      return Datapath.load(this.objectPath, this.mode, this.attachKind, this.cfg.pinDir, this.log);
    } catch (e) {
      if (this.mode !== 'rpeer' || this.cfg.mode === 'rpeer') throw e;
      // auto: a kernel that names the kfunc but refuses the program is a stock kernel for us.
      this.log.warn(`${this.objectPath} did not load (${(e as Error).message.split('\n')[0]}): falling back to veth mode`);
      this.mode = 'veth';
      this.modeReason = 'auto: the rpeer object failed to load';
      this.objectPath = this.cfg.object;
      checkObject('object', this.objectPath);
      return Datapath.load(this.objectPath, this.mode, this.attachKind, this.cfg.pinDir, this.log);
    }
  }

  private startDatapath(storedPods: PodRecord[] | undefined, storedRules: ReturnType<StateDir['readPolicy']>): void {
    const cfg = this.cfg;
    // The rules cannot be read back from the pins: without the state file,
    // starting would drop deny rules that they still enforce. The version
    // before the tables kept its starts in policy_root (the same two words),
    // which loading this version's datapath unpins: look first.
    const retiredStart = join(cfg.pinDir, 'policy_root');
    if (storedRules === undefined && existsSync(retiredStart)) {
      const m = BpfMap.fromPinned(retiredStart);
      try {
        if (PolicyTable.holdsRules(m)) throw this.rulesUnreadable(`the pinned ${retiredStart} of an earlier version`);
      } finally {
        m.close();
      }
    }
    const dp = this.loadDatapath();
    this.dp = dp;
    const created = dp.reused.length === 0;
    this.log.info(created
      ? `created and pinned the maps in ${cfg.pinDir}`
      : `reused the maps pinned in ${cfg.pinDir} (${countEntries(dp.maps.egress_cache)} egress, ${countEntries(dp.maps.ingress_cache)} ingress entries kept)`);
    try {
      // The nodes before any program: init learns only towards them, restore listens only to them.
      const nodes = new NodeSet(dp.maps.nodes, this.nic.name, cfg.overlayDev, cfg.nodes, this.log);
      try {
        nodes.resolve();
      } catch (e) {
        throw new ConfigError(`--overlay-dev (overlayDev) = ${JSON.stringify(cfg.overlayDev)}: ${(e as Error).message}`);
      }
      let ports: ReturnType<typeof tunnelPorts>;
      try {
        ports = tunnelPorts(nodes.tunnels, { vxlan: cfg.vxlanPort, geneve: cfg.genevePort });
      } catch (e) {
        throw new ConfigError((e as Error).message);
      }
      this.log.info(`tunnel ports: ${ports.why}`);
      dp.writeConfig(this.nic.ifindex, cfg.wideKeys, ports, this.overlay, cfg.serviceCidr === 'none' ? undefined : parseCidr(cfg.serviceCidr));
      // Before any program of ours: the full paths read it (or, with tick_ns 0, the coarse clock).
      this.clock = new ClockKeeper(dp.maps.clock, dp.clockProbe(), this.log);
      this.clock.calibrate();
      // Pinned caches were kept by an earlier agent, maybe of an earlier version, against
      // an earlier node set: held to this one before our programs rely on it. (New maps:
      // no program used them before the set was written, none raced its change.)
      const sweep = this.syncNodes(nodes, !created);
      if (sweep) this.swept(sweepNodes(dp.maps.egress_cache, dp.maps.ingress_cache, sweep, monotonicCoarseNs()));
      this.nodes = nodes;
      const ns = nodes.snapshot();
      this.log.info(`nodes: ${ns.peers.length} peer(s) from ${ns.overlayDevices.join(', ') || 'no overlay device'}${cfg.nodes.length ? ` and --nodes` : ''}; this host is ${ns.self.join(', ')}`);
      if (!cfg.wideKeys) {
        const dropped = dp.dropWideKeys();
        this.egressGone += dropped;
        if (dropped) this.log.info(`wide keys off: dropped ${dropped} cache entries holding a wide key; their pairs learn narrow keys over the overlay`);
      }

      if (storedRules === undefined && PolicyTable.holdsRules(dp.maps.policy_start)) {
        throw this.rulesUnreadable('the pinned policy_table');
      }
      this.policy = new PolicyTable(dp.maps.policy_table, dp.maps.policy_start, storedRules ?? []);
      const synced = this.policy.sync();
      if (synced.removed) this.log.info(`policy: wrote the rules' ${synced.written} table(s) anew and zeroed the ${synced.removed} an earlier agent's walks reached`);
      this.state.writePolicy(cfg.pinDir, this.policy.list());

      // restore before init: once init signals keys, the replies must be restorable.
      this.nicFilters.push(dp.attach('restore', this.nic.name, this.nic.ifindex, 'ingress'));
      this.nicFilters.push(dp.attach('init', this.nic.name, this.nic.ifindex, 'egress'));
      this.log.info(`attached restore at ${this.nic.name} ingress and init at ${this.nic.name} egress as ${this.attachKind === 'tcx' ? 'tcx links' : 'cls_bpf filters'}`);

      this.reconcilePods(storedPods);
      this.savePods();
      const swept = dp.sweepLinks();
      if (swept) this.log.info(`removed ${swept} pinned tcx link(s) no pod of this agent holds (pods gone while no agent ran, or their veths)`);
    } catch (e) {
      const errors = dp.detachAll();
      for (const err of errors) this.log.error(`while undoing the start: ${err}`);
      this.nicFilters = [];
      this.pods.clear();
      if (created) unpinAll(cfg.pinDir);
      dp.close();
      this.dp = undefined;
      throw e;
    }
  }

  /**
   * The pods of the state file whose veth is still there get their masq back;
   * the rest are dropped with their cache entries, since their IPs may come
   * back on other pods. Without a state file, pod_info is the record.
   */
  private reconcilePods(stored: PodRecord[] | undefined): void {
    const dp = this.dp!;
    const inMap = new Map<string, { ifindex: number; mac: string }>();
    for (const [k, v] of dp.maps.pod_info.lookupBatch()) inMap.set(podIp.decode(k).ip, podInfo.decode(v));
    let records = stored;
    if (records === undefined) {
      records = [];
      for (const [ip, info] of inMap) {
        const name = ifIndexToName(info.ifindex);
        if (name && this.mode === 'veth') {
          // No add backs them: discovery confirms them against the host, or drops them.
          records.push({ ip, mac: info.mac, hostVethIfindex: info.ifindex, hostVeth: name, addedAt: new Date().toISOString(), attached: false, discovered: true });
        }
      }
      if (records.length) this.log.warn(`${this.state.podsFile} is missing: adopted ${records.length} pod(s) from the pinned pod_info`);
    }
    const keep = new Set<string>();
    for (const r of records) {
      const gone = this.podGone(r);
      if (gone) {
        const purged = this.forgetPod(r.ip);
        this.log.info(`dropped pod ${r.ip}: ${gone}; purged ${purged.egress} egress and ${purged.ingress} ingress entries`);
        continue;
      }
      keep.add(r.ip);
      const pod: Pod = { record: { ...r, attached: false } };
      this.pods.set(r.ip, pod);
      dp.maps.pod_info.update(podIp.encode({ ip: r.ip }), podInfo.encode({ ifindex: r.hostVethIfindex, mac: r.mac, ...this.hostNetnsFor(r) }));
      this.attachMasq(pod);
    }
    for (const ip of inMap.keys()) {
      if (keep.has(ip)) continue;
      const purged = this.forgetPod(ip);
      this.log.info(`dropped pod ${ip} found only in the pinned pod_info; purged ${purged.egress} egress and ${purged.ingress} ingress entries`);
    }
    if (this.pods.size) this.log.info(`re-attached masq for ${this.pods.size} pod(s)`);
  }

  /** Why the pod no longer exists, or undefined if it does. */
  private podGone(r: PodRecord): string | undefined {
    const name = ifIndexToName(r.hostVethIfindex);
    if (name === undefined) return `its veth ${r.hostVeth} (ifindex ${r.hostVethIfindex}) is gone`;
    if (name !== r.hostVeth) return `ifindex ${r.hostVethIfindex} is now ${name}, not its veth ${r.hostVeth}`;
    if (r.netns && !existsSync(r.netns)) return `its netns ${r.netns} is gone`;
    return undefined;
  }

  private async closeEndpoints(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    if (this.discoveryTimer) clearTimeout(this.discoveryTimer);
    this.discoveryTimer = undefined;
    if (this.ctTimer) clearInterval(this.ctTimer);
    this.ctDrain?.close();
    this.timer = undefined;
    const sock = this.sock;
    this.sock = undefined;
    await sock?.close();
    const http = this.http;
    this.http = undefined;
    if (http) {
      http.closeAllConnections();
      await new Promise<void>((resolve) => http.close(() => resolve()));
    }
  }

  /**
   * Detaches every filter, closes the endpoints. The maps stay pinned unless
   * cleanup is asked for, so the next agent resumes every learned flow.
   * handover leaves the filters attached instead: their programs keep running
   * on the pinned maps until the next agent replaces them in place (its
   * attach uses BPF_TC_F_REPLACE), so an upgrade loses no packet.
   */
  async stop(opts: { cleanup?: boolean; handover?: boolean } = {}): Promise<{ errors: string[] }> {
    if (this.stopping) return { errors: [] };
    this.stopping = true;
    this.ready = false;
    await this.closeEndpoints();
    const errors: string[] = [];
    const dp = this.dp;
    if (dp && opts.handover) {
      this.log.info(`handover: left ${dp.list().length} program(s) attached (${this.attachKind === 'tcx' ? 'on tcx links, pinned' : 'as cls_bpf filters'}) for the next agent, which replaces them in place`);
      dp.close();
      this.dp = undefined;
    } else if (dp) {
      // restore stays unless everything goes (--cleanup): peers keep masquerading to
      // this host until they retire the pairs, and restore is what keeps those marked
      // packets from the host stack (README "Threat model"). masq and init go, so no
      // pair is masqueraded or learned from here on; the next agent replaces restore
      // in place, `xmasq-agent cleanup` removes it.
      const uninstall = opts.cleanup ?? this.cfg.cleanupOnExit;
      const keep = uninstall ? [] : this.nicFilters.filter((a) => a.program === 'restore');
      const n = dp.list().length - keep.length;
      errors.push(...dp.detachAll(keep));
      this.log.info(`detached ${n - errors.length} program(s)${errors.length ? `; ${errors.length} failed` : ''}${keep.length ? `; left restore attached at ${this.nic.name} ingress, so that what peers still masquerade to this host never reaches its stack (the next agent replaces it; 'xmasq-agent cleanup' removes it)` : ''}`);
      dp.close();
      this.dp = undefined;
    }
    if (opts.cleanup ?? this.cfg.cleanupOnExit) {
      const { removed, leftover } = unpinAll(this.cfg.pinDir);
      const files = this.state.remove();
      this.log.info(`cleanup: removed ${removed.length} pin(s) and ${files.length} state file(s)${leftover.length ? `; ${this.cfg.pinDir} still holds ${leftover.join(', ')}` : ''}`);
    } else {
      this.log.info(`maps stay pinned in ${this.cfg.pinDir}: a restart resumes every cached flow`);
    }
    for (const e of errors) this.log.error(e);
    return { errors };
  }

  // -------------------------------------------------------------------------
  // pods
  // -------------------------------------------------------------------------

  private attachMasq(pod: Pod): void {
    const dp = this.dp!;
    const r = pod.record;
    if (this.mode === 'veth') {
      pod.masq = dp.attach('masq', r.hostVeth, r.hostVethIfindex, 'ingress');
    } else {
      const ifname = r.ifname ?? 'eth0';
      const idx = withNetns(r.netns!, () => ifNameToIndex(ifname));
      if (!idx) throw new RequestError(`pod ${r.ip}: no device ${ifname} in netns ${r.netns}; set pod.ifname`);
      pod.masq = dp.attach('masq_rpeer', ifname, idx, 'egress', r.netns);
    }
    r.attached = true;
    r.attachKind = pod.masq.kind;
  }

  /**
   * pod_info's host namespace fields. rpeer mode: masq_rpeer runs in the
   * pod's namespace and consults the host's conntrack by the id the pod's
   * namespace gives the host's (bpf/xmasq.h). veth mode: unread.
   */
  private hostNetnsFor(p: { ip: string; netns?: string }): HostNetns {
    if (this.mode === 'veth') return NO_HOST_NETNS;
    try {
      return hostNetnsSeenFrom(p.netns!);
    } catch (e) {
      throw new RequestError(`pod ${p.ip}: cannot learn the id its netns ${p.netns} gives the host's (${(e as Error).message}); masq_rpeer needs it to consult the host's conntrack`);
    }
  }

  /** Removes the pod's pod_info entry, then every cache entry that serves it. */
  private forgetPod(ip: string): Purged {
    const m = this.dp!.maps;
    m.pod_info.delete(podIp.encode({ ip }));
    const purged = purgePod(m.egress_cache, m.ingress_cache, ip, monotonicCoarseNs());
    this.egressGone += purged.egress;
    return purged;
  }

  private savePods(): void {
    this.state.writePods(this.cfg.pinDir, [...this.pods.values()].map((p) => p.record));
  }

  private validatePod(spec: unknown): PodSpec & { hostVeth: string } {
    if (!spec || typeof spec !== 'object' || Array.isArray(spec)) throw new RequestError('"pod" must be an object like {"ip":"10.244.1.5","mac":"0a:58:0a:f4:01:05","hostVethIfindex":7}');
    const s = spec as Record<string, unknown>;
    for (const k of Object.keys(s)) {
      if (!['ip', 'mac', 'hostVethIfindex', 'netns', 'ifname'].includes(k)) throw new RequestError(`pod.${k} is not a field; the fields are ip, mac, hostVethIfindex, netns, ifname`);
    }
    if (!isIpv4(s.ip) || s.ip === '0.0.0.0') throw new RequestError(`pod.ip = ${JSON.stringify(s.ip)}: must be the pod's IPv4 address, like 10.244.1.5`);
    try {
      macToBytes(String(s.mac), Buffer.alloc(6), 0);
    } catch {
      throw new RequestError(`pod.mac = ${JSON.stringify(s.mac)}: must be the MAC of the pod's eth0, like 0a:58:0a:f4:01:05`);
    }
    const mac = String(s.mac).toLowerCase();
    const idx = s.hostVethIfindex;
    if (!Number.isInteger(idx) || (idx as number) <= 0) throw new RequestError(`pod.hostVethIfindex = ${JSON.stringify(idx)}: must be the ifindex (a positive integer) of the pod's veth end in the host netns`);
    const hostVeth = ifIndexToName(idx as number);
    if (!hostVeth) throw new RequestError(`pod.hostVethIfindex = ${idx}: no such device in the agent's network namespace; pass the ifindex of the pod's veth end on the host side ('ip -o link')`);
    if (idx === this.nic.ifindex) throw new RequestError(`pod.hostVethIfindex = ${idx} is the NIC ${this.nic.name}, not a pod's veth`);
    const kind = linkByIndex(idx as number)?.linkinfo?.info_kind;
    if (kind !== 'veth') throw new RequestError(`pod.hostVethIfindex = ${idx} is ${hostVeth}, a ${kind ?? 'plain'} device, not a veth: pass the host end of the pod's veth pair`);
    if (s.netns !== undefined && (typeof s.netns !== 'string' || !s.netns.startsWith('/') || !existsSync(s.netns))) {
      throw new RequestError(`pod.netns = ${JSON.stringify(s.netns)}: must be the path of the pod's network namespace (e.g. /run/netns/<name> or /proc/<pid>/ns/net), and exist`);
    }
    if (this.mode === 'rpeer' && s.netns === undefined) throw new RequestError('pod.netns is required in rpeer mode: masq is attached at the pod\'s eth0, inside its namespace');
    if (s.ifname !== undefined && (typeof s.ifname !== 'string' || !/^[^\s/:]{1,15}$/.test(s.ifname))) throw new RequestError(`pod.ifname = ${JSON.stringify(s.ifname)}: must be an interface name like eth0`);
    return {
      ip: s.ip, mac, hostVethIfindex: idx as number, hostVeth,
      ...(s.netns !== undefined ? { netns: s.netns as string } : {}),
      ...(s.ifname !== undefined ? { ifname: s.ifname as string } : {}),
    };
  }

  private addPod(spec: unknown): ReplyMap['add'] {
    const p = this.validatePod(spec);
    this.deleted.delete(p.ip);
    return this.servePod(p, false);
  }

  /**
   * Serves a pod an `add` gave, or discovery found: writes pod_info and
   * attaches masq, replacing (and purging) a different pod that held its IP.
   */
  private servePod(p: PodSpec & { hostVeth: string }, discovered: boolean): ReplyMap['add'] {
    const dp = this.dp!;
    this.vethFree(p);
    const old = this.pods.get(p.ip);
    // A pod is its veth and its MAC; the netns path may be spelt differently
    // by different callers (/run/netns/x, /proc/<pid>/ns/net) for the same pod.
    const same = old && old.record.mac === p.mac && old.record.hostVethIfindex === p.hostVethIfindex && old.record.hostVeth === p.hostVeth;
    const sameAttach = same && old.record.ifname === (p.ifname ?? old.record.ifname) && (this.mode === 'veth' || old.record.netns === (p.netns ?? old.record.netns));
    if (sameAttach && old.masq && dp.isAttached(old.masq)) {
      if (!discovered && old.record.discovered) {
        // The CNI plugin confirms a pod discovery found first: from now on it is the plugin's.
        delete old.record.discovered;
        this.savePods();
      }
      return { pod: { ...old.record }, replaced: false, purged: { egress: 0, ingress: 0 } };
    }
    if (!old && this.pods.size >= dp.maps.pod_info.maxEntries) {
      throw new RequestError(`pod_info is full (${dp.maps.pod_info.maxEntries} pods): this host serves as many pods as the datapath holds`);
    }
    let purged: Purged = { egress: 0, ingress: 0 };
    if (!same) {
      // A new pod on this IP (or a pod whose DEL we never saw): nothing the
      // old one learned may serve it.
      if (old?.masq) dp.detach(old.masq);
      this.pods.delete(p.ip);
      purged = this.forgetPod(p.ip);
    }
    const pod: Pod = {
      record: same
        ? { ...old.record, ...p, attached: false }
        : { ...p, addedAt: new Date().toISOString(), attached: false },
    };
    if (discovered) pod.record.discovered = true;
    else delete pod.record.discovered;
    const key = podIp.encode({ ip: p.ip });
    dp.maps.pod_info.update(key, podInfo.encode({ ifindex: p.hostVethIfindex, mac: p.mac, ...this.hostNetnsFor(p) }));
    try {
      this.attachMasq(pod);
      // The same pod: attachMasq replaced its filter in place, so the old record describes nothing.
      if (old?.masq && same) dp.forget(old.masq);
      this.pods.set(p.ip, pod);
      this.savePods();
    } catch (e) {
      if (pod.masq) dp.detach(pod.masq);
      if (old?.masq && same) dp.detach(old.masq);
      this.pods.delete(p.ip);
      // With its cache entries: masq holds a pair's source to the veth its
      // egress entry records, which must not outlive the pod_info entry.
      try {
        this.forgetPod(p.ip);
      } catch (purge) {
        this.log.error(`pod ${p.ip}: purging its entries after the failed attach: ${(purge as Error).message}`);
      }
      throw e;
    }
    this.log.info(`pod ${p.ip} ${discovered ? 'found on this host' : 'added'}: ${p.mac} on ${p.hostVeth} (ifindex ${p.hostVethIfindex})${discovered ? `, netns ${p.netns}, ${p.ifname}` : ''}${old && !same ? ', replacing the pod that held this IP' : ''}${purged.egress + purged.ingress ? `; purged ${purged.egress} egress and ${purged.ingress} ingress entries` : ''}`);
    return { pod: { ...pod.record }, replaced: !!old && !same, purged };
  }

  /**
   * A veth belongs to one pod: a second pod on it would share its masq filter,
   * and the second pod's DEL would take the first one's filter away. A holder
   * whose veth is gone (its ifindex now names another device) is dropped
   * first, as the next scan would.
   */
  private vethFree(p: PodSpec & { hostVeth: string }): void {
    const holder = [...this.pods.values()].find((q) => q.record.ip !== p.ip && q.record.hostVethIfindex === p.hostVethIfindex);
    if (!holder) return;
    if (this.podGone(holder.record)) {
      this.collectGonePods();
      return;
    }
    const h = holder.record.ip;
    if (holder.record.discovered) {
      // Discovery's view of the veth is older than this pod's: the pod is what holds it now.
      const purged = this.dropPod(holder);
      this.log.info(`dropped pod ${h}, which discovery had found on ${holder.record.hostVeth}: that veth is pod ${p.ip}'s now; purged ${purged.egress} egress and ${purged.ingress} ingress entries`);
      return;
    }
    throw new RequestError(`pod.hostVethIfindex = ${p.hostVethIfindex}: ${p.hostVeth} already belongs to pod ${h}, and a veth serves one pod; if ${h} is gone, delete it first ({"op":"del","ip":"${h}"})`);
  }

  private delPod(ip: unknown): ReplyMap['del'] {
    if (!isIpv4(ip)) throw new RequestError(`"ip" = ${JSON.stringify(ip)}: must be the pod's IPv4 address`);
    const pod = this.pods.get(ip);
    if (this.cfg.discoverPods) this.deleted.set(ip, { at: Date.now(), ...(pod ? { veth: { ifindex: pod.record.hostVethIfindex, name: pod.record.hostVeth } } : {}) });
    const detached = pod?.masq ? this.dp!.detach(pod.masq) : false;
    const purged = this.forgetPod(ip);
    if (pod) {
      this.pods.delete(ip);
      this.savePods();
    }
    this.log.info(`pod ${ip} deleted${pod ? '' : ' (unknown to the agent)'}: purged ${purged.egress} egress and ${purged.ingress} ingress entries`);
    return { known: !!pod, detached, purged };
  }

  /** Detaches the pod's masq, purges its pod_info and cache entries, and forgets it. */
  private dropPod(pod: Pod): Purged {
    // Records adopted from pod_info (no state file) may share a veth, and so its one filter:
    // the one that stays keeps it.
    const r = pod.record;
    const shared = [...this.pods.values()].some((q) => q !== pod && q.record.hostVethIfindex === r.hostVethIfindex && q.record.hostVeth === r.hostVeth);
    if (pod.masq && shared) this.dp!.forget(pod.masq);
    else if (pod.masq) this.dp!.detach(pod.masq);
    const purged = this.forgetPod(pod.record.ip);
    // The pod leaves memory only once the state file no longer holds it: a
    // failed write fails this scan and the next ones (so /healthz says so)
    // instead of once, and both steps above are safe to repeat.
    this.state.writePods(this.cfg.pinDir, [...this.pods.values()].filter((p) => p !== pod).map((p) => p.record));
    this.pods.delete(pod.record.ip);
    return purged;
  }

  /** Pods whose veth vanished without a DEL are dropped like a DEL would. */
  private collectGonePods(): void {
    for (const pod of [...this.pods.values()]) {
      const gone = this.podGone(pod.record);
      if (!gone) continue;
      const purged = this.dropPod(pod);
      this.log.info(`dropped pod ${pod.record.ip}: ${gone} (no DEL came); purged ${purged.egress} egress and ${purged.ingress} ingress entries`);
    }
  }

  // -------------------------------------------------------------------------
  // expiry
  // -------------------------------------------------------------------------

  private scan(): void {
    if (!this.ready || !this.dp) return;
    const t0 = process.hrtime.bigint();
    try {
      const m = this.dp.maps;
      // Before the expiry compares the programs' stamps with the coarse clock.
      this.clock?.rebase();
      // Nodes come and go with the overlay device's FDB: the set at most once a second,
      // written before the caches are read, so that a sweep its change needs is this
      // scan's read of them, not a second one.
      const sweep = this.nodes && Date.now() - this.lastNodeSync >= NODE_SYNC_MS ? this.syncNodes(this.nodes, false) : undefined;
      const r = expire(m.egress_cache, m.ingress_cache, monotonicCoarseNs(),
        BigInt(Math.round(this.cfg.egressIdleSeconds * 1e9)), BigInt(Math.round(this.cfg.ingressIdleSeconds * 1e9)), sweep);
      this.stats.expired.egress += r.egress.deleted;
      this.stats.expired.ingress += r.ingress.deleted;
      this.egressGone += r.egress.deleted;
      this.swept(r.swept);
      if (r.egress.deleted || r.ingress.deleted) {
        this.log.debug(`expired ${r.egress.deleted} egress${r.egress.unanswered ? ` (${r.egress.unanswered} unanswered by the peer)` : ''} and ${r.ingress.deleted} ingress entries (${r.egress.remaining} and ${r.ingress.remaining} left) in ${(Number(process.hrtime.bigint() - t0) / 1e6).toFixed(1)} ms`);
      }
      this.collectGonePods();
      // Once a quarter of the entries' worth went (at least one), the bits they left.
      if (this.filterDue || (this.egressGone > 0 && this.egressGone * 4 >= r.egress.remaining)) this.rebuildFilter();
      if (this.stats.scanFailing) this.log.info(`expiry scans work again (failing since ${this.stats.scanFailing.since})`);
      this.stats.scanFailing = undefined;
    } catch (e) {
      const error = (e as Error).message;
      this.stats.scanFailures++;
      // Logged when the failure starts or changes, not on every scan of a lasting one.
      if (this.stats.scanFailing?.error !== error) this.log.warn(`expiry scan failed: ${error}`);
      this.stats.scanFailing = { since: this.stats.scanFailing?.since ?? new Date().toISOString(), error };
    }
    this.stats.scans++;
    this.stats.lastScanSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
    this.stats.lastScanAt = new Date().toISOString();
  }

  /**
   * Writes the node set as the overlay has it now, and returns it when the caches
   * must be held to it (caches.ts sweepNodes), else undefined. init and restore take
   * a learned pair's entries for proof that its addresses passed the node checks
   * (bpf/init.h, restore.h), so entries the set no longer vouches for go right after
   * the map is written: in the caller's read of the caches. Only a node that left or
   * changed role can make an entry stray (NodeChanges.lost); a new one makes none.
   * Once more at the next sync after such a change: a program that passed a node
   * check just before the map changed may create its entry after the sweep read the
   * caches. force: sweep even if nothing changed (the agent's start over pinned caches).
   */
  private syncNodes(nodes: NodeSet, force: boolean): NodeWords | undefined {
    const changes = nodes.sync();
    this.lastNodeSync = Date.now();
    const lost = changes.lost.length > 0;
    if (!lost && !this.nodeSweepDue && !force) return undefined;
    this.nodeSweepDue = lost;
    const set = nodes.snapshot();
    return nodeWords(set.self, set.peers);
  }

  private swept(swept: Purged): void {
    this.egressGone += swept.egress;
    if (swept.egress || swept.ingress) {
      this.log.info(`node set: tombstoned ${swept.ingress} ingress entries from hosts that are no peer node; deleted ${swept.egress} egress entries towards such a host or from an address no longer ours`);
    }
  }

  /** Pinned deny rules with no policy.json to read them from: starting would drop them. */
  private rulesUnreadable(where: string): Error {
    return new Error(`${this.state.policyFile} is missing but ${where} holds deny rules, which cannot be read back from it: put the file back, or run 'xmasq-agent cleanup' to start without rules`);
  }

  /**
   * egress_filter's half masq does not read, rebuilt from the live entries,
   * and masq switched to it (filter.ts). Throws only what a map access
   * throws; the half masq reads is whole either way.
   */
  private rebuildFilter(): void {
    const m = this.dp!.maps;
    const gone = this.egressGone;
    const r = rebuildEgressFilter(m.egress_cache, m.egress_filter, m.config);
    this.log.debug(r.switched
      ? `egress_filter: masq reads half ${r.half} now, ${r.bits} bit(s) for the live entries (the other half had ${r.bitsBefore}; ${gone} entries went since the last rebuild${r.retries ? `; ${r.retries} scan(s) found a bit of an entry created meanwhile` : ''})`
      : `egress_filter: kept half ${r.half} (entries were created during each of ${r.retries} scans); the next rebuild tries again`);
    if (r.switched) this.egressGone = 0;
    this.filterDue = false;
  }

  // -------------------------------------------------------------------------
  // pod discovery (discovery.ts)
  // -------------------------------------------------------------------------

  /** The next round, --discover-interval after the last one ended (rounds never overlap). */
  private scheduleDiscovery(): void {
    this.discoveryTimer = setTimeout(() => {
      void this.discover().finally(() => {
        if (!this.stopping) this.scheduleDiscovery();
      });
    }, this.cfg.discoverIntervalSeconds * 1000);
  }

  /**
   * One round: surveys the host's veths, serves the pods found, drops the
   * discovered pods whose veth no longer holds them. Never throws: a failed
   * round is logged (once per distinct error) and the next one tries again.
   */
  private async discover(): Promise<void> {
    if (this.discovering || !this.dp) return;
    this.discovering = true;
    const first = this.discoveryStats.rounds === 0;
    try {
      const findings = await survey({ nicIfindex: this.nic.ifindex });
      if (this.stopping || !this.dp) return;
      // From here on nothing awaits: the plan is made and carried out on the pods as they are now.
      this.collectGonePods();
      for (const [ip, d] of this.deleted) {
        if (Date.now() - d.at >= DEL_GUARD_MS && !(d.veth && ifIndexToName(d.veth.ifindex) === d.veth.name)) this.deleted.delete(ip);
      }
      const held = [...this.pods.values()].map((p) => ({ ...p.record, discovered: p.record.discovered === true }));
      const plan = planDiscovery(findings, held, (p) => this.deletedWhy(p));
      for (const d of plan.drop) {
        const pod = this.pods.get(d.ip);
        if (!pod) continue;
        const purged = this.dropPod(pod);
        this.log.info(`dropped pod ${d.ip}, which discovery had found on ${d.hostVeth}: ${d.why}; purged ${purged.egress} egress and ${purged.ingress} ingress entries`);
      }
      let served = 0;
      for (const p of plan.serve) {
        try {
          this.servePod(p, true);
          served++;
        } catch (e) {
          this.log.warn(`discovery: cannot serve pod ${p.ip} on ${p.hostVeth}: ${(e as Error).message}`);
        }
      }
      const notServed: DiscoveryStatus['notServed'] = [];
      for (const f of findings) {
        if ('skipped' in f || 'unreadable' in f) notServed.push({ hostVeth: f.veth.name, hostVethIfindex: f.veth.ifindex, why: 'skipped' in f ? f.skipped : `not read: ${f.unreadable}` });
      }
      for (const { pod, why } of plan.ignored) notServed.push({ hostVeth: pod.hostVeth, hostVethIfindex: pod.hostVethIfindex, why: `not served: ${why}` });
      this.noteNotServed(notServed);
      const found = findings.filter((f) => 'pod' in f).length;
      const summary = `discovery: ${found} pod(s) on this host's veths: ${served} served now, ${plan.drop.length} dropped, ${notServed.length} veth(s) with no pod to serve`;
      if (first) this.log.info(summary);
      else this.log.debug(summary);
      this.discoveryStats.notServed = notServed;
      if (this.discoveryStats.failing) this.log.info(`pod discovery works again (failing since ${this.discoveryStats.failing.since})`);
      this.discoveryStats.failing = undefined;
    } catch (e) {
      const error = (e as Error).message;
      if (this.discoveryStats.failing?.error !== error) this.log.warn(`pod discovery failed: ${error} (the pods the CNI plugin adds are served all the same)`);
      this.discoveryStats.failing = { since: this.discoveryStats.failing?.since ?? new Date().toISOString(), error };
    } finally {
      this.discovering = false;
      this.discoveryStats.rounds++;
      this.discoveryStats.lastRoundAt = new Date().toISOString();
    }
  }

  /** Why discovery must leave a pod a DEL removed alone, or undefined. */
  private deletedWhy(p: FoundPod): string | undefined {
    const d = this.deleted.get(p.ip);
    if (!d) return undefined;
    if (d.veth?.ifindex === p.hostVethIfindex && d.veth.name === p.hostVeth) return `a DEL removed pod ${p.ip} from ${p.hostVeth}: its runtime is tearing it down`;
    const ago = Date.now() - d.at;
    return ago < DEL_GUARD_MS ? `a DEL removed pod ${p.ip} ${(ago / 1000).toFixed(1)} s ago: its runtime may still be tearing it down` : undefined;
  }

  /** Logs what is new or changed about the veths discovery serves no pod on. */
  private noteNotServed(list: DiscoveryStatus['notServed']): void {
    const notes = new Map<string, string>();
    for (const n of list) {
      const key = `${n.hostVethIfindex}/${n.hostVeth}`;
      notes.set(key, n.why);
      if (this.discoveryNotes.get(key) !== n.why) this.log.info(`discovery: ${n.hostVeth} (ifindex ${n.hostVethIfindex}): ${n.why}`);
    }
    this.discoveryNotes = notes;
  }

  // -------------------------------------------------------------------------
  // requests
  // -------------------------------------------------------------------------

  /** One request line in, one reply line out. Never throws. */
  handleLine(line: string): string {
    let req: Record<string, unknown>;
    try {
      const v = JSON.parse(line) as unknown;
      if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('not an object');
      req = v as Record<string, unknown>;
    } catch {
      return JSON.stringify({ ok: false, error: `not a JSON object: ${line.slice(0, 100)}; send one object per line like {"op":"status"}` });
    }
    // The protocol's seq is a number or a string: echoing anything else back
    // would echo whatever the client built, however deep.
    if (req.seq !== undefined && typeof req.seq !== 'number' && typeof req.seq !== 'string') {
      return JSON.stringify({ ok: false, error: `"seq" must be a number or a string, not ${Array.isArray(req.seq) ? 'an array' : typeof req.seq}` });
    }
    const seq = req.seq !== undefined ? { seq: req.seq } : {};
    try {
      const body = this.handle(req);
      return JSON.stringify({ ok: true, ...seq, ...body }, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v));
    } catch (e) {
      if (!(e instanceof RequestError)) this.log.error(`${String(req.op)} failed: ${(e as Error).message}`);
      return JSON.stringify({ ok: false, ...seq, error: (e as Error).message });
    }
  }

  private handle(req: Record<string, unknown>): object {
    const op = req.op as Op;
    if (!OPS.includes(op)) throw new RequestError(`unknown op ${JSON.stringify(req.op)}; the ops are ${OPS.join(', ')}`);
    if (!this.ready || !this.dp) throw new RequestError(this.stopping ? 'the agent is shutting down' : 'the agent is still starting: retry in a moment');
    this.stats.requests[op]++;
    switch (op) {
      case 'add': return this.addPod(req.pod);
      case 'del': return this.delPod(req.ip);
      case 'list': return { pods: this.podList() } satisfies ReplyMap['list'];
      case 'status': return { status: this.status() } satisfies ReplyMap['status'];
      case 'policy-add': {
        const rule = this.policyChange(() => this.policy!.add(req.rule));
        this.log.info(`policy: added ${describeRule(rule)}`);
        return { rule, entries: this.policy!.entries() } satisfies ReplyMap['policy-add'];
      }
      case 'policy-del': {
        if (!Number.isInteger(req.id)) throw new RequestError(`"id" = ${JSON.stringify(req.id)}: must be the id of a rule (see policy-list)`);
        const rule = this.policyChange(() => this.policy!.remove(req.id as number));
        this.log.info(`policy: deleted ${describeRule(rule)}`);
        return { rule, entries: this.policy!.entries() } satisfies ReplyMap['policy-del'];
      }
      case 'policy-list': return { rules: this.policy!.list(), entries: this.policy!.entries() } satisfies ReplyMap['policy-list'];
      case 'cache-dump': {
        const which = req.cache ?? 'both';
        if (which !== 'egress' && which !== 'ingress' && which !== 'both') throw new RequestError(`"cache" = ${JSON.stringify(which)}: must be egress, ingress or both`);
        const now = monotonicCoarseNs();
        const m = this.dp.maps;
        return {
          now: now.toString(),
          ...(which !== 'ingress' ? { egress: dumpEgress(m.egress_cache, now) } : {}),
          ...(which !== 'egress' ? { ingress: dumpIngress(m.ingress_cache, now) } : {}),
        } satisfies ReplyMap['cache-dump'];
      }
    }
  }

  /** Runs a policy change and persists it; the client's mistakes come back as RequestError. */
  private policyChange<T>(fn: () => T): T {
    let r: T;
    try {
      r = fn();
    } catch (e) {
      throw new RequestError((e as Error).message);
    }
    this.state.writePolicy(this.cfg.pinDir, this.policy!.list());
    return r;
  }

  private podList(): PodRecord[] {
    return [...this.pods.values()].map((p) => ({ ...p.record })).sort((a, b) => ipOrder(a.ip) - ipOrder(b.ip));
  }

  status(): AgentStatus {
    const dp = this.dp!;
    const cfg = this.cfg;
    return {
      version: PROTOCOL_VERSION,
      pid: process.pid,
      mode: this.mode,
      modeReason: this.modeReason,
      attach: this.attachKind,
      attachReason: this.attachReason,
      wideKeys: cfg.wideKeys,
      nic: this.nic.name,
      nicIfindex: this.nic.ifindex,
      pinDir: cfg.pinDir,
      object: this.objectPath,
      socket: cfg.socket,
      stateDir: cfg.stateDir,
      metricsListen: cfg.metricsListen,
      startedAt: this.startedAt.toISOString(),
      pinsReused: dp.reused.length > 0,
      pods: this.pods.size,
      caches: {
        egress: { entries: countEntries(dp.maps.egress_cache), capacity: dp.maps.egress_cache.maxEntries },
        ingress: { entries: countEntries(dp.maps.ingress_cache), capacity: dp.maps.ingress_cache.maxEntries },
      },
      policy: { rules: this.policy!.list().length, entries: this.policy!.entries() },
      counters: dp.counters(),
      expiry: {
        egressIdleSeconds: cfg.egressIdleSeconds,
        ingressIdleSeconds: cfg.ingressIdleSeconds,
        scanIntervalSeconds: cfg.scanIntervalSeconds,
        expired: { ...this.stats.expired },
        ...(this.stats.lastScanAt ? { lastScanAt: this.stats.lastScanAt } : {}),
      },
      attachments: dp.list(),
      nodes: this.nodes?.snapshot() ?? { overlayDevices: [], self: [], peers: [] },
      discovery: {
        enabled: cfg.discoverPods,
        intervalSeconds: cfg.discoverIntervalSeconds,
        rounds: this.discoveryStats.rounds,
        ...(this.discoveryStats.lastRoundAt ? { lastRoundAt: this.discoveryStats.lastRoundAt } : {}),
        discoveredPods: [...this.pods.values()].filter((p) => p.record.discovered).length,
        notServed: this.discoveryStats.notServed.map((n) => ({ ...n })),
        ...(this.discoveryStats.failing ? { failing: { ...this.discoveryStats.failing } } : {}),
      },
      ...(this.clock ? { clock: this.clock.status() } : {}),
    };
  }

  private metrics(): string {
    if (!this.dp) return '';
    const s = this.status();
    return renderMetrics({
      mode: s.mode,
      nic: s.nic,
      counters: s.counters,
      caches: s.caches,
      pods: s.pods,
      podsAttached: [...this.pods.values()].filter((p) => p.masq).length,
      nodes: { self: s.nodes.self.length, peers: s.nodes.peers.length },
      policyRules: s.policy.rules,
      policyTableEntries: s.policy.entries,
      clockHz: s.clock?.hz ?? 0,
      expired: s.expiry.expired,
      lastScanSeconds: this.stats.lastScanSeconds,
      scans: this.stats.scans,
      scanFailures: this.stats.scanFailures,
      socket: this.sock?.stats() ?? { connections: 0, refused: {} },
      startTimeSeconds: Math.floor(this.startedAt.getTime() / 1000),
      requests: this.stats.requests,
    });
  }

  private health(): string[] {
    if (!this.ready || !this.dp) return ['not ready'];
    const problems: string[] = [];
    for (const a of this.nicFilters) {
      if (!this.dp.isAttached(a)) problems.push(`${a.program} is no longer attached at ${describe(a)}`);
    }
    const failing = this.stats.scanFailing;
    if (failing) problems.push(`expiry scans fail since ${failing.since}: ${failing.error}`);
    return problems;
  }
}

function ipOrder(ip: string): number {
  return ip.split('.').reduce((n, p) => n * 256 + Number(p), 0);
}

/** The NIC by name (or the default one), checked in this network namespace. */
export function resolveNic(cfg: Pick<AgentConfig, 'nic'>): { name: string; ifindex: number } {
  let name = cfg.nic;
  if (name === undefined) {
    const d = defaultNic();
    if (!d.nic) throw new ConfigError(d.problem!);
    name = d.nic;
  }
  const ifindex = ifNameToIndex(name);
  if (!ifindex) throw new ConfigError(`nic "${name}" not found in this network namespace; set --nic or check 'ip link'`);
  return { name, ifindex };
}
