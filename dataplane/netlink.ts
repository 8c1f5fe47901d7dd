/**
 * A netlink socket through libc via koffi (Node has none of its own), for
 * the few kernel requests that iproute2 cannot make for us: ctnetlink
 * (dataplane/conntrack.ts) and rtnetlink's RTM_GETNSID/RTM_NEWNSID (NetnsIds below).
 *
 * Messages are built by hand: nlmsghdr, the family's fixed header, then
 * attributes (Attrs). Every request carries NLM_F_ACK and waits for the
 * kernel's answer, so an error comes back to the caller that caused it.
 */
import { closeSync, openSync, statSync } from 'node:fs';
import koffi from 'koffi';
import { ipv4ToBytes } from './layout.ts';
import { withNetns } from './libbpf.ts';

interface Libc {
  socket(domain: number, type: number, protocol: number): number;
  bind(fd: number, addr: Buffer, len: number): number;
  send(fd: number, buf: Buffer, len: number, flags: number): number;
  recv(fd: number, buf: Buffer, len: number, flags: number): number;
  setsockopt(fd: number, level: number, name: number, value: Buffer, len: number): number;
  close(fd: number): number;
  unshare(flags: number): number;
}

let libc: Libc | undefined;
export function netlinkLibc(): Libc {
  if (libc) return libc;
  const l = koffi.load('libc.so.6');
  libc = {
    socket: l.func('int socket(int domain, int type, int protocol)'),
    bind: l.func('int bind(int fd, void *addr, uint32_t len)'),
    send: l.func('intptr_t send(int fd, void *buf, size_t len, int flags)'),
    recv: l.func('intptr_t recv(int fd, void *buf, size_t len, int flags)'),
    setsockopt: l.func('int setsockopt(int fd, int level, int name, void *value, uint32_t len)'),
    close: l.func('int close(int fd)'),
    unshare: l.func('int unshare(int flags)'),
  } as unknown as Libc;
  return libc;
}

const AF_NETLINK = 16;
const SOCK_RAW = 3;
const SOCK_CLOEXEC = 0o2000000;
export const NETLINK_ROUTE = 0;
export const NETLINK_NETFILTER = 12;
const SOL_SOCKET = 1;
const SO_RCVTIMEO = 20;

export const NLM_F_REQUEST = 0x1;
export const NLM_F_ACK = 0x4;
const NLMSG_ERROR = 2;
const NLA_F_NESTED = 0x8000;
/** sizeof(struct nlmsghdr). */
export const NLMSG_HDRLEN = 16;

/** Netlink attributes, appended in order; nest() wraps what its callback adds. */
export class Attrs {
  private readonly parts: Buffer[] = [];
  private put(type: number, payload: Buffer): this {
    const len = 4 + payload.length;
    const b = Buffer.alloc((len + 3) & ~3);
    b.writeUInt16LE(len, 0);
    b.writeUInt16LE(type, 2);
    payload.copy(b, 4);
    this.parts.push(b);
    return this;
  }
  u8(type: number, v: number): this { return this.put(type, Buffer.from([v])); }
  /** In host (little-endian) order, as rtnetlink's own attributes are. */
  u32(type: number, v: number): this { const b = Buffer.alloc(4); b.writeUInt32LE(v >>> 0); return this.put(type, b); }
  be16(type: number, v: number): this { const b = Buffer.alloc(2); b.writeUInt16BE(v); return this.put(type, b); }
  be32(type: number, v: number): this { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return this.put(type, b); }
  ipv4(type: number, ip: string): this { const b = Buffer.alloc(4); ipv4ToBytes(ip, b, 0); return this.put(type, b); }
  bytes(type: number, b: Buffer): this { return this.put(type, b); }
  nest(type: number, fill: (a: Attrs) => void): this {
    const inner = new Attrs();
    fill(inner);
    return this.put(type | NLA_F_NESTED, inner.buffer());
  }
  buffer(): Buffer { return Buffer.concat(this.parts); }
}

/** Walks the attributes in b[from, to): type (nested flag cleared) -> payload. */
export function parseAttrs(b: Buffer, from = 0, to = b.length): Map<number, Buffer> {
  const out = new Map<number, Buffer>();
  let off = from;
  while (off + 4 <= to) {
    const len = b.readUInt16LE(off);
    if (len < 4 || off + len > to) break;
    out.set(b.readUInt16LE(off + 2) & ~NLA_F_NESTED, b.subarray(off + 4, off + len));
    off += (len + 3) & ~3;
  }
  return out;
}

/** How a caller names a failed request: (what was being done, errno) -> the error to throw. */
export type NetlinkFailure = (what: string, errno: number) => Error;

/**
 * One netlink socket in the network namespace of the thread that opened it
 * (a namespace keeps its sockets: later setns calls do not move it).
 */
export class NetlinkSocket {
  private fd: number;
  private seq = 1;
  private readonly rx = Buffer.alloc(64 * 1024);

  constructor(protocol: number, private readonly failure: NetlinkFailure, family = 'netlink') {
    const fd = netlinkLibc().socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, protocol);
    if (fd < 0) throw failure(`opening a ${family} socket`, koffi.errno());
    const addr = Buffer.alloc(12);
    addr.writeUInt16LE(AF_NETLINK, 0);
    if (netlinkLibc().bind(fd, addr, addr.length) < 0) {
      const e = koffi.errno();
      netlinkLibc().close(fd);
      throw failure('binding the netlink socket', e);
    }
    // A kernel that never answers must not hang the caller: 2 s, then an error.
    const tv = Buffer.alloc(16);
    tv.writeBigInt64LE(2n, 0);
    netlinkLibc().setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, tv, tv.length);
    this.fd = fd;
  }

  close(): void {
    if (this.fd >= 0) netlinkLibc().close(this.fd);
    this.fd = -1;
  }

  /**
   * Sends one request (the family's fixed header, then its attributes) with
   * NLM_F_ACK and returns the kernel's data answer, whole with its nlmsghdr
   * (a GET's object), or the empty buffer of a bare ACK; an error answer throws.
   */
  request(msgType: number, flags: number, header: Buffer, attrs: Attrs, what: string): Buffer {
    if (this.fd < 0) throw new Error(`netlink: the socket is closed (${what})`);
    const body = attrs.buffer();
    const seq = this.seq++;
    const fixed = (header.length + 3) & ~3;
    const m = Buffer.alloc(NLMSG_HDRLEN + fixed + body.length);
    m.writeUInt32LE(m.length, 0);
    m.writeUInt16LE(msgType, 4);
    m.writeUInt16LE(NLM_F_REQUEST | NLM_F_ACK | flags, 6);
    m.writeUInt32LE(seq, 8);
    header.copy(m, NLMSG_HDRLEN);
    body.copy(m, NLMSG_HDRLEN + fixed);
    if (netlinkLibc().send(this.fd, m, m.length, 0) !== m.length) throw this.failure(what, koffi.errno());

    let data = Buffer.alloc(0);
    for (;;) {
      const n = netlinkLibc().recv(this.fd, this.rx, this.rx.length, 0);
      if (n < 0) throw this.failure(`${what} (no answer)`, koffi.errno());
      for (let off = 0; off + NLMSG_HDRLEN <= n;) {
        const len = this.rx.readUInt32LE(off);
        if (len < NLMSG_HDRLEN || off + len > n) break;
        const type = this.rx.readUInt16LE(off + 4);
        if (this.rx.readUInt32LE(off + 8) === seq) {
          if (type === NLMSG_ERROR) {
            const err = -this.rx.readInt32LE(off + NLMSG_HDRLEN);
            if (err !== 0) throw this.failure(what, err);
            return data; // the ACK ends the exchange
          }
          data = Buffer.from(this.rx.subarray(off, off + len));
        }
        off += (len + 3) & ~3;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// rtnetlink: the id this network namespace gives another one.
// ---------------------------------------------------------------------------

const RTM_NEWNSID = 88;
const RTM_GETNSID = 90;
const NETNSA_NSID = 1;
const NETNSA_FD = 3;
/** struct rtgenmsg: the family byte (AF_UNSPEC), padded to 4 by NetlinkSocket. */
const RTGENMSG = Buffer.alloc(1);

export class NetnsIdError extends Error {
  constructor(what: string, readonly errno: number) {
    super(`rtnetlink: ${what}: errno ${errno}${errno === 1 ? ' (EPERM: run as root, it needs CAP_NET_ADMIN)' : ''}`);
    this.name = 'NetnsIdError';
  }
}

/**
 * The calling thread's network namespace's ids of other namespaces
 * (RTM_GETNSID with NETNSA_FD): the same numbers `ip -d link` shows as a
 * veth's link_netnsid. The kernel gives the id, so no name or path a pod
 * controls can pass for another namespace.
 */
export class NetnsIds {
  private readonly sock = new NetlinkSocket(NETLINK_ROUTE, (what, errno) => new NetnsIdError(what, errno), 'rtnetlink');

  /** The id of the namespace open as fd, or -1 when this namespace has given it none. */
  of(fd: number): number {
    const msg = this.sock.request(RTM_GETNSID, 0, RTGENMSG, new Attrs().u32(NETNSA_FD, fd), 'asking a network namespace\'s id');
    const nsid = parseAttrs(msg, NLMSG_HDRLEN + 4).get(NETNSA_NSID);
    return nsid && nsid.length >= 4 ? nsid.readInt32LE(0) : -1;
  }

  /** Gives the namespace open as fd an id of the kernel's choosing; EEXIST (it has one already) is no error. */
  assign(fd: number): void {
    try {
      // NETNSA_NSID -1 (as u32): any free id.
      this.sock.request(RTM_NEWNSID, 0, RTGENMSG, new Attrs().u32(NETNSA_FD, fd).u32(NETNSA_NSID, 0xffffffff), 'giving a network namespace an id');
    } catch (e) {
      if (!(e instanceof NetnsIdError && e.errno === 17)) throw e;
    }
  }

  close(): void {
    this.sock.close();
  }
}

/** pod_info's host_netns_id and host_netns_ino (bpf/xmasq.h). */
export interface HostNetns { host_netns_id: number; host_netns_ino: number }

/**
 * The calling thread's network namespace (the host's) as the one at podNetns
 * names it, for masq_rpeer, which consults the host's conntrack from the
 * pod's namespace: the id the pod's namespace gives it (assigned there, the
 * kernel picking the number, if it has none yet) and its inode number, which
 * the programs check the entry found against.
 */
export function hostNetnsSeenFrom(podNetns: string): HostNetns {
  const self = '/proc/thread-self/ns/net';
  const ino = statSync(self).ino;
  const fd = openSync(self, 'r');
  try {
    // The socket is the pod namespace's: its ids are the ones asked for and assigned.
    const ids = withNetns(podNetns, () => new NetnsIds());
    try {
      let id = ids.of(fd);
      if (id < 0) {
        ids.assign(fd);
        id = ids.of(fd);
      }
      if (id < 0) throw new NetnsIdError(`the network namespace ${podNetns} gives this one no id even after RTM_NEWNSID`, 0);
      return { host_netns_id: id, host_netns_ino: ino };
    } finally {
      ids.close();
    }
  } finally {
    closeSync(fd);
  }
}
