/**
 * The datapath's node set (bpf/maps.h `nodes`, README "Threat model"): the
 * underlay addresses of the overlay's nodes, this host's own flagged SELF.
 * init learns only towards a peer node and only from packets sent from one of
 * our own addresses; restore takes signals and masqueraded packets only from
 * a peer node. The agent writes it before any program is attached and keeps
 * it current on its scans:
 *  - this host: the NIC's IPv4 addresses and each overlay device's `local`;
 *  - peers: the unicast destinations of each VXLAN device's FDB (flannel
 *    and Calico program one entry per node), a device's fixed `remote`, and
 *    the addresses of --nodes (for overlays without a Linux FDB, e.g. Antrea's
 *    OVS tunnel).
 * An address that is both ours and a peer's is ours.
 *
 * The programs take a learned pair's entries for proof that its addresses
 * passed these checks, so the agent holds the caches to every change of the
 * set (caches.ts sweepNodes, agent.ts syncNodes).
 */
import type { MapOps } from '../map-ops.ts';
import { NodeFlag, nodeInfo, nodeIp } from '../maps.ts';
import type { Log } from './log.ts';
import { fdbDestinations, ipv4Addresses, tunnelDevices, type TunnelDevice } from './system.ts';

export interface NodeSnapshot {
  /** The tunnel devices whose FDB gives the peers ('none': --overlay-dev none). */
  overlayDevices: string[];
  self: string[];
  peers: string[];
}

/**
 * What a sync changed. lost: the addresses that left the set or changed
 * role (peer to self or back), the changes that can make a cache entry
 * stray (caches.ts sweepNodes); a new node alone makes none.
 */
export interface NodeChanges { added: string[]; removed: string[]; lost: string[] }

export class NodeSet {
  private devices: TunnelDevice[] = [];
  private current = new Map<string, number>();
  /** Whether the last sync found a peer (the warning for none is logged once per change). */
  private hadPeer: boolean | undefined;

  /**
   * setting: --overlay-dev: a device name (its FDB, if it is a VXLAN device),
   * undefined (every VXLAN/Geneve device bound to the NIC) or 'none' (peers
   * from --nodes only).
   */
  constructor(private readonly map: MapOps, private readonly nic: string, private readonly setting: string | undefined,
    private readonly configured: readonly string[], private readonly log: Log) {}

  /** Finds the overlay devices; an error names what is wrong with the setting. */
  resolve(): void {
    this.devices = this.setting === 'none' ? [] : tunnelDevices(this.setting, this.nic);
  }

  /** The overlay devices the last resolve found. */
  get tunnels(): readonly TunnelDevice[] {
    return this.devices;
  }

  /** The set as it should be now, from the devices and the config. */
  wanted(): Map<string, number> {
    const want = new Map<string, number>();
    for (const ip of this.configured) want.set(ip, 0);
    for (const d of this.devices) {
      if (d.remote) want.set(d.remote, 0);
      if (d.kind === 'vxlan') for (const ip of fdbDestinations(d.name)) want.set(ip, 0);
    }
    for (const ip of ipv4Addresses(this.nic)) want.set(ip, NodeFlag.SELF);
    for (const d of this.devices) if (d.local) want.set(d.local, NodeFlag.SELF);
    return want;
  }

  /**
   * Makes the map hold exactly the wanted set: new and changed entries first,
   * then the ones gone, so a node that stays is never missing for a moment.
   * Entries the map holds from an earlier agent (pins) are compared too.
   */
  sync(): NodeChanges {
    const want = this.wanted();
    const have = new Map<string, number>();
    for (const [k, v] of this.map.entries()) have.set(nodeIp.decode(k).ip, nodeInfo.decode(v).flags);
    const added: string[] = [];
    const lost: string[] = [];
    for (const [ip, flags] of want) {
      if (have.get(ip) === flags) continue;
      this.map.update(nodeIp.encode({ ip }), nodeInfo.encode({ flags }));
      added.push(ip);
      if (have.has(ip)) lost.push(ip);
    }
    const removed: string[] = [];
    for (const ip of have.keys()) {
      if (want.has(ip)) continue;
      this.map.delete(nodeIp.encode({ ip }));
      removed.push(ip);
      lost.push(ip);
    }
    this.current = want;
    if (added.length || removed.length) {
      const show = (ips: string[]) => ips.map((ip) => (want.get(ip) === NodeFlag.SELF ? `${ip} (self)` : ip)).join(', ');
      this.log.info(`node set: ${[added.length ? `+ ${show(added)}` : '', removed.length ? `- ${removed.join(', ')}` : ''].filter(Boolean).join('; ')}`);
    }
    const hasPeer = [...want.values()].some((f) => f !== NodeFlag.SELF);
    if (!hasPeer && this.hadPeer !== false) {
      this.log.warn(`node set: no peer node known (overlay devices: ${this.devices.map((d) => d.name).join(', ') || 'none'}; --nodes: ${this.configured.length}): init learns nothing until one is`);
    }
    this.hadPeer = hasPeer;
    return { added, removed, lost };
  }

  snapshot(): NodeSnapshot {
    const ips = [...this.current.entries()];
    return {
      overlayDevices: this.setting === 'none' ? ['none'] : this.devices.map((d) => d.name),
      self: ips.filter(([, f]) => f === NodeFlag.SELF).map(([ip]) => ip).sort(),
      peers: ips.filter(([, f]) => f !== NodeFlag.SELF).map(([ip]) => ip).sort(),
    };
  }
}
