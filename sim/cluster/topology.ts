/**
 * Addresses of the simulated cluster, laid out as lab/lab.ts lays out the
 * real one: host h (from 0) is 172.31.250.<h+1> on the underlay, owns pod
 * subnet 10.244.<h+1>.0/24 with the cni0 gateway at .1, and a flannel.1
 * VXLAN device (VNI 1, port 8472) whose MAC the other hosts hold in their
 * neighbour and FDB tables.
 */
export const NIC_IFINDEX = 2;
export const VXLAN_PORT = 8472;
export const VXLAN_VNI = 1;
/** The first ifindex handed to a pod's host-side veth (1 is lo, 2 the NIC, 3 cni0, 4 flannel.1). */
export const FIRST_VETH_IFINDEX = 10;
/** host-local hands out .2 .. .254 of the /24. */
export const FIRST_POD_HOST_BYTE = 2;
export const LAST_POD_HOST_BYTE = 254;

const hex2 = (n: number) => (n & 0xff).toString(16).padStart(2, '0');

export function u32ToIp(n: number): string {
  return `${n >>> 24}.${(n >>> 16) & 0xff}.${(n >>> 8) & 0xff}.${n & 0xff}`;
}

export function ipToU32(ip: string): number {
  const p = ip.split('.');
  return ((+p[0] << 24) | (+p[1] << 16) | (+p[2] << 8) | +p[3]) >>> 0;
}

export function macBytes(mac: string): Buffer {
  return Buffer.from(mac.split(':').map((x) => Number.parseInt(x, 16)));
}

export interface HostAddresses {
  ip: string;
  nicMac: string;
  vtepMac: string;
  cniMac: string;
  /** 10.244.<h+1>.0 as a number; the /24 is subnet .. subnet + 255. */
  subnet: number;
}

export function hostAddresses(h: number): HostAddresses {
  const n = h + 1;
  return {
    ip: `172.31.250.${n}`,
    nicMac: `02:00:ac:1f:fa:${hex2(n)}`,
    vtepMac: `0e:00:00:00:00:${hex2(n)}`,
    cniMac: `0a:58:0a:f4:${hex2(n)}:01`,
    subnet: ipToU32(`10.244.${n}.0`),
  };
}

/** The host whose pod subnet holds ip, or -1. */
export function subnetHost(ip: number, hosts: number): number {
  if ((ip >>> 16) !== ((10 << 8) | 244)) return -1;
  const h = ((ip >>> 8) & 0xff) - 1;
  return h >= 0 && h < hosts ? h : -1;
}

/** A pod's MAC, distinct for every pod ever created (uid), so a stale MAC is visible. */
export function podMac(uid: number): string {
  return `0a:58:${hex2(uid >>> 24)}:${hex2(uid >>> 16)}:${hex2(uid >>> 8)}:${hex2(uid)}`;
}
