/**
 * Puts raw Ethernet frames on a lab interface through an AF_PACKET socket,
 * for frames no stack would send: forged markers, truncated headers, odd
 * fragments. The socket is opened inside the interface's netns (a socket
 * belongs to the namespace it was created in) and used from here.
 */
import koffi from 'koffi';
import { withNetns } from '../dataplane/libbpf.ts';

const AF_PACKET = 17;
const SOCK_RAW = 3;
const ETH_P_ALL_BE = 0x0300; // htons(ETH_P_ALL)

const libc = koffi.load('libc.so.6');
const socket = libc.func('int socket(int domain, int type, int protocol)');
const bind = libc.func('int bind(int fd, void *addr, uint32 len)');
const send = libc.func('intptr_t send(int fd, void *buf, size_t len, int flags)');
const close = libc.func('int close(int fd)');
const ifNameToIndex = libc.func('uint32 if_nametoindex(const char *name)');

/** Sends each frame once out of ifname in the netns at nsPath; returns how many went out. */
export function injectFrames(nsPath: string, ifname: string, frames: readonly Uint8Array[]): number {
  const { fd, ifindex } = withNetns(nsPath, () => ({
    fd: socket(AF_PACKET, SOCK_RAW, ETH_P_ALL_BE) as number,
    ifindex: ifNameToIndex(ifname) as number,
  }));
  if (fd < 0) throw new Error(`AF_PACKET socket in ${nsPath} failed (errno ${koffi.errno()}): are you root?`);
  try {
    if (!ifindex) throw new Error(`no interface "${ifname}" in ${nsPath}`);
    // struct sockaddr_ll: family, protocol (be16), ifindex, hatype, pkttype, halen, addr[8].
    const sll = Buffer.alloc(20);
    sll.writeUInt16LE(AF_PACKET, 0);
    sll.writeUInt16LE(ETH_P_ALL_BE, 2);
    sll.writeInt32LE(ifindex, 4);
    if (bind(fd, sll, sll.length) !== 0) throw new Error(`binding the AF_PACKET socket to ${ifname} failed (errno ${koffi.errno()})`);
    let sent = 0;
    for (const f of frames) {
      const n = Number(send(fd, Buffer.from(f), f.length, 0));
      if (n !== f.length) throw new Error(`sending a ${f.length}-byte frame on ${ifname} failed (errno ${koffi.errno()})`);
      sent++;
    }
    return sent;
  } finally {
    close(fd);
  }
}
