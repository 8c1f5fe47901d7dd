/**
 * The host's conntrack table over ctnetlink (NETLINK_NETFILTER), on a
 * socket of dataplane/netlink.ts: Node has no netlink sockets of its own.
 *
 * The agent uses it for one thing: to make an established TCP entry track its
 * windows liberally once its flow takes the fast path (bpf/conntrack.h says
 * why). The differential tests use it to give the programs real entries to
 * find, in a network namespace of their own.
 *
 * Messages are nlmsghdr, nfgenmsg, then nested attributes
 * (include/uapi/linux/netfilter/nfnetlink_conntrack.h). Every call waits for
 * the kernel's answer, so an error comes back to the caller that caused it.
 */
import koffi from 'koffi';
import { Attrs, NETLINK_NETFILTER, NLMSG_HDRLEN, NetlinkSocket, netlinkLibc, parseAttrs } from './netlink.ts';

const CLONE_NEWNET = 0x40000000;
const NLM_F_CREATE = 0x400;
const NLM_F_EXCL = 0x200;

const NFNL_SUBSYS_CTNETLINK = 1;
const IPCTNL_MSG_CT_NEW = 0;
const IPCTNL_MSG_CT_GET = 1;
const IPCTNL_MSG_CT_DELETE = 2;
const AF_INET = 2;
/** struct nfgenmsg: family, version 0, res_id 0. */
const NFGENMSG = Buffer.from([AF_INET, 0, 0, 0]);

const CTA_TUPLE_ORIG = 1;
const CTA_TUPLE_REPLY = 2;
const CTA_STATUS = 3;
const CTA_PROTOINFO = 4;
const CTA_NAT_SRC = 6;
const CTA_TIMEOUT = 7;
const CTA_NAT_DST = 13;
const CTA_TUPLE_IP = 1;
const CTA_TUPLE_PROTO = 2;
const CTA_IP_V4_SRC = 1;
const CTA_IP_V4_DST = 2;
const CTA_PROTO_NUM = 1;
const CTA_PROTO_SRC_PORT = 2;
const CTA_PROTO_DST_PORT = 3;
const CTA_PROTOINFO_TCP = 1;
const CTA_PROTOINFO_TCP_STATE = 1;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY = 5;
const CTA_NAT_V4_MINIP = 1;
const CTA_NAT_V4_MAXIP = 2;
const CTA_NAT_PROTO = 3;
const CTA_PROTONAT_PORT_MIN = 1;
const CTA_PROTONAT_PORT_MAX = 2;

/** include/uapi/linux/netfilter/nf_conntrack_common.h and nf_conntrack_tcp.h. */
export const IPS_SEEN_REPLY = 0x2;
const IPS_CONFIRMED = 0x8;
export const IPS_ASSURED = 0x4;
export const IPS_SRC_NAT = 0x10;
export const IPS_DST_NAT = 0x20;
export const TCP_CONNTRACK_SYN_SENT = 1;
export const TCP_CONNTRACK_ESTABLISHED = 3;
export const TCP_CONNTRACK_FIN_WAIT = 4;
export const CT_TCP_FLAG_BE_LIBERAL = 0x08;

/** A flow as conntrack keys it: addresses as dotted text, ports in host order. */
export interface CtTuple {
  src: string;
  dst: string;
  sport: number;
  dport: number;
  proto: number; // 6 TCP, 17 UDP
}

/** A new entry, as a test or a tool creates it. */
export interface CtEntrySpec {
  orig: CtTuple;
  /** IPS_SEEN_REPLY, IPS_ASSURED: the bits ctnetlink lets a creator set. */
  status: number;
  /** TCP only: the state and whether each direction (original, reply) is liberal. */
  tcpState?: number;
  liberal?: [boolean, boolean];
  /** A DNAT, as kube-proxy's for a Service: the original destination becomes this. */
  dnat?: { ip: string; port: number };
  /** An SNAT, as a masquerade's: the original source becomes this. */
  snat?: { ip: string; port: number };
  timeoutSeconds?: number;
}

/** What the programs read of an entry (bpf/conntrack.h). */
export interface CtEntryView {
  status: number;
  tcpState?: number;
  flagsOrig?: number;
  flagsReply?: number;
}

export class ConntrackError extends Error {
  constructor(what: string, readonly errno: number) {
    super(`conntrack: ${what}: ${errnoText(errno)}`);
    this.name = 'ConntrackError';
  }
}

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM (run as root: ctnetlink needs CAP_NET_ADMIN)', 2: 'ENOENT (no such entry)', 17: 'EEXIST (the entry exists)',
  22: 'EINVAL', 93: 'EPROTONOSUPPORT (no conntrack in this kernel: load nf_conntrack)', 95: 'EOPNOTSUPP',
};
function errnoText(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

function tuple(a: Attrs, t: CtTuple): void {
  a.nest(CTA_TUPLE_IP, (ip) => ip.ipv4(CTA_IP_V4_SRC, t.src).ipv4(CTA_IP_V4_DST, t.dst));
  a.nest(CTA_TUPLE_PROTO, (p) => p.u8(CTA_PROTO_NUM, t.proto).be16(CTA_PROTO_SRC_PORT, t.sport).be16(CTA_PROTO_DST_PORT, t.dport));
}

/** The reply direction of an un-NATed flow. */
export function inverse(t: CtTuple): CtTuple {
  return { src: t.dst, dst: t.src, sport: t.dport, dport: t.sport, proto: t.proto };
}

/** Both directions liberal, and nothing else of the flags touched (mask = the bit). */
function liberalFlags(a: Attrs, liberal: [boolean, boolean]): void {
  const flags = (on: boolean) => Buffer.from([on ? CT_TCP_FLAG_BE_LIBERAL : 0, CT_TCP_FLAG_BE_LIBERAL]);
  a.bytes(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, flags(liberal[0]));
  a.bytes(CTA_PROTOINFO_TCP_FLAGS_REPLY, flags(liberal[1]));
}

/**
 * One ctnetlink socket in the network namespace of the thread that opened it
 * (a namespace keeps its sockets: later setns calls do not move it).
 */
export class Conntrack {
  private readonly sock = new NetlinkSocket(NETLINK_NETFILTER, (what, errno) => new ConntrackError(what, errno), 'netfilter netlink');

  close(): void {
    this.sock.close();
  }

  /** Creates an entry (EEXIST if the flow has one). */
  create(e: CtEntrySpec): void {
    const a = new Attrs();
    a.nest(CTA_TUPLE_ORIG, (t) => tuple(t, e.orig));
    a.nest(CTA_TUPLE_REPLY, (t) => tuple(t, inverse(e.orig)));
    // ctnetlink takes the new entry's status as a change from a confirmed one:
    // without IPS_CONFIRMED the request reads as clearing it (EBUSY).
    a.be32(CTA_STATUS, e.status | IPS_CONFIRMED);
    a.be32(CTA_TIMEOUT, e.timeoutSeconds ?? 600);
    if (e.orig.proto === 6) {
      a.nest(CTA_PROTOINFO, (p) => p.nest(CTA_PROTOINFO_TCP, (tcp) => {
        tcp.u8(CTA_PROTOINFO_TCP_STATE, e.tcpState ?? TCP_CONNTRACK_ESTABLISHED);
        liberalFlags(tcp, e.liberal ?? [false, false]);
      }));
    }
    for (const [attr, nat] of [[CTA_NAT_SRC, e.snat], [CTA_NAT_DST, e.dnat]] as const) {
      if (!nat) continue;
      const { ip, port } = nat;
      a.nest(attr, (n) => {
        n.ipv4(CTA_NAT_V4_MINIP, ip).ipv4(CTA_NAT_V4_MAXIP, ip);
        n.nest(CTA_NAT_PROTO, (p) => p.be16(CTA_PROTONAT_PORT_MIN, port).be16(CTA_PROTONAT_PORT_MAX, port));
      });
    }
    this.request(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL, a, 'creating an entry');
  }

  /**
   * Makes the TCP entry of a flow (found by either direction's tuple) track
   * both directions' windows liberally. False when the flow has no entry
   * (it ended, or timed out, since the program saw it).
   */
  makeLiberal(t: CtTuple): boolean {
    const a = new Attrs();
    a.nest(CTA_TUPLE_ORIG, (x) => tuple(x, t));
    a.nest(CTA_PROTOINFO, (p) => p.nest(CTA_PROTOINFO_TCP, (tcp) => liberalFlags(tcp, [true, true])));
    try {
      this.request(IPCTNL_MSG_CT_NEW, 0, a, 'making an entry liberal');
      return true;
    } catch (err) {
      if (err instanceof ConntrackError && err.errno === 2) return false;
      throw err;
    }
  }

  /** The entry of a flow (either direction's tuple), or undefined. */
  get(t: CtTuple): CtEntryView | undefined {
    const a = new Attrs();
    a.nest(CTA_TUPLE_ORIG, (x) => tuple(x, t));
    let msg: Buffer;
    try {
      msg = this.request(IPCTNL_MSG_CT_GET, 0, a, 'reading an entry');
    } catch (err) {
      if (err instanceof ConntrackError && err.errno === 2) return undefined;
      throw err;
    }
    const attrs = parseAttrs(msg, NLMSG_HDRLEN + NFGENMSG.length);
    const status = attrs.get(CTA_STATUS)?.readUInt32BE(0) ?? 0;
    const view: CtEntryView = { status };
    const pi = attrs.get(CTA_PROTOINFO);
    const tcp = pi && parseAttrs(pi).get(CTA_PROTOINFO_TCP);
    if (tcp) {
      const f = parseAttrs(tcp);
      view.tcpState = f.get(CTA_PROTOINFO_TCP_STATE)?.[0];
      view.flagsOrig = f.get(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL)?.[0];
      view.flagsReply = f.get(CTA_PROTOINFO_TCP_FLAGS_REPLY)?.[0];
    }
    return view;
  }

  /** Deletes every entry of this namespace's table. */
  flush(): void {
    this.request(IPCTNL_MSG_CT_DELETE, 0, new Attrs(), 'flushing the table');
  }

  /**
   * Sends one ctnetlink request (nfgenmsg: AF_INET, version 0, res_id 0) and
   * returns the kernel's data answer (a GET's entry) or the empty buffer of a
   * bare ACK; an error answer throws.
   */
  private request(msgType: number, flags: number, attrs: Attrs, what: string): Buffer {
    return this.sock.request((NFNL_SUBSYS_CTNETLINK << 8) | msgType, flags, NFGENMSG, attrs, what);
  }
}

/**
 * Moves the calling thread into a new, empty network namespace, with a
 * conntrack table of its own: for tests, which must never touch the host's.
 */
export function unshareNetns(): void {
  if (netlinkLibc().unshare(CLONE_NEWNET) !== 0) throw new ConntrackError('unshare(CLONE_NEWNET)', koffi.errno());
}
