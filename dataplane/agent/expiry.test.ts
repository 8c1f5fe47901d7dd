/**
 * caches.ts reads whole caches as raw 32- and 16-bit words at offsets of
 * its own (expire, purgePod, sweepNodes, and expire with a node sweep). Here all of them are held, on the kernel's own maps
 * (egress_cache and ingress_cache of the production object, loaded and not
 * attached), to the rules as the agent states them, applied to every entry
 * decoded through maps.ts's codecs with BigInt arithmetic: which entries
 * go, which stay, which become tombstones, and the counts reported.
 */
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BpfObject, type BpfMap } from '../libbpf.ts';
import { egressKey, ingressKey, path, type Path } from '../maps.ts';
import { expire, nodeWords, purgePod, sweepNodes } from './caches.ts';
import { requireRoot } from '../../testing/privileges.ts';

requireRoot(import.meta.url, 'BPF maps: CAP_BPF');

const OBJECT = fileURLToPath(new URL('../../bpf/build/xmasq.bpf.o', import.meta.url));

// Few addresses and keys, so that peers match, half match and miss.
const LOCAL_PODS = ['10.244.1.2', '10.244.1.3', '10.244.1.4'];
const REMOTE_PODS = ['10.244.2.2', '10.244.2.3'];
const HOSTS = ['172.16.0.2', '172.16.0.3'];
const U64_MAX = (1n << 64n) - 1n;

interface Scene {
  now: bigint;
  egressIdle: bigint;
  ingressIdle: bigint;
  egress: Array<{ local_pod: string; remote_pod: string; value: Path }>;
  ingress: Array<{ remote_host: string; key: number; value: Path }>;
}

/** A stamp at one of the edges that matter: either side of each idle bound, the clock, 0, the far past and future. */
const stamp = (now: bigint, egressIdle: bigint, ingressIdle: bigint) => fc.oneof(
  fc.constantFrom(0n, now, now + 1n, U64_MAX),
  fc.bigInt({ min: -2n, max: 2n }).map((d) => now - egressIdle + d),
  fc.bigInt({ min: -2n, max: 2n }).map((d) => now - ingressIdle + d),
  fc.bigInt({ min: 0n, max: now }),
).map((s) => (s < 0n ? 0n : s > U64_MAX ? U64_MAX : s));

const value = (now: bigint, egressIdle: bigint, ingressIdle: bigint, localIps: string[], remoteIps: string[]) => fc.record({
  last_seen: stamp(now, egressIdle, ingressIdle),
  local_mac: fc.constant('02:00:ac:1f:fa:01'),
  remote_mac: fc.constant('02:00:ac:1f:fa:02'),
  local_ip: fc.constantFrom(...localIps),
  remote_ip: fc.constantFrom(...remoteIps),
  ifindex: fc.constantFrom(0, 5, 0xffffffff),
  local_key: fc.constantFrom(0, 1, 2, 3, 0xffff),
  remote_key: fc.constantFrom(0, 1, 9, 0xffff),
  remote_ready: fc.constantFrom(0, 1),
}) as fc.Arbitrary<Path>;

// Clocks past 2^32 and past 2^53, so that both words of a stamp decide.
const scene: fc.Arbitrary<Scene> = fc.record({
  now: fc.bigInt({ min: 1n << 33n, max: 1n << 60n }),
  egressIdle: fc.constantFrom(20_000_000_000n, 1n, (1n << 32n) + 7n),
  ingressIdle: fc.constantFrom(40_000_000_000n, 2n, (1n << 33n) + 3n),
}).chain(({ now, egressIdle, ingressIdle }) => fc.record({
  now: fc.constant(now),
  egressIdle: fc.constant(egressIdle),
  ingressIdle: fc.constant(ingressIdle),
  egress: fc.uniqueArray(fc.record({
    local_pod: fc.constantFrom(...LOCAL_PODS),
    remote_pod: fc.constantFrom(...REMOTE_PODS),
    // 0.0.0.0: an address not learned yet (an entry a first signal made has no local one).
    value: value(now, egressIdle, ingressIdle, ['172.16.0.1', '0.0.0.0'], [...HOSTS, '0.0.0.0']),
  }), { selector: (e) => `${e.local_pod} ${e.remote_pod}`, maxLength: LOCAL_PODS.length * REMOTE_PODS.length }),
  ingress: fc.uniqueArray(fc.record({
    remote_host: fc.constantFrom(...HOSTS),
    key: fc.constantFrom(0, 1, 2, 3, 0xffff),
    value: value(now, egressIdle, ingressIdle, LOCAL_PODS, REMOTE_PODS),
  }), { selector: (e) => `${e.remote_host} ${e.key}`, maxLength: HOSTS.length * 5 }),
}));

/** The rules as the agent states them (caches.ts judgeEgress, expire), entry by entry. */
function expected(s: Scene) {
  const idle = (lastSeen: bigint, limit: bigint) => s.now - lastSeen > limit;
  const peers = new Map(s.ingress.map((e) => [`${e.remote_host} ${e.key}`, e.value]));
  let unanswered = 0;
  const egressLeft = s.egress.filter((e) => {
    if (idle(e.value.last_seen, s.egressIdle)) return false;
    if (e.value.local_key === 0 || e.value.remote_key === 0) return true;
    const peer = peers.get(`${e.value.remote_ip} ${e.value.local_key}`);
    const answered = peer !== undefined && peer.ifindex !== 0 && peer.local_ip === e.local_pod && peer.remote_ip === e.remote_pod
      && !idle(peer.last_seen, s.egressIdle);
    if (!answered) unanswered++;
    return answered;
  });
  const ingressLeft = s.ingress.filter((e) => !idle(e.value.last_seen, s.ingressIdle));
  return { egressLeft, ingressLeft, unanswered };
}

/** Which of the scene's hosts are still peers, which of our addresses still ours; a host may have become ours. */
const nodeSets = fc.record({
  peers: fc.subarray(HOSTS),
  self: fc.subarray(['172.16.0.1', '172.16.0.2']),
});
type NodeSets = { peers: string[]; self: string[] };
/** An address both ways is ours (nodes.ts). */
const peersOf = (n: NodeSets) => n.peers.filter((h) => !n.self.includes(h));

/** The sweep's rules as the agent states them (caches.ts sweepNodes): the scene it leaves, and its counts. */
function sweptScene(s: Scene, n: NodeSets): { scene: Scene; swept: { egress: number; ingress: number } } {
  const peers = peersOf(n);
  const stray = (v: Path) => (v.remote_ip !== '0.0.0.0' && !peers.includes(v.remote_ip)) || (v.local_ip !== '0.0.0.0' && !n.self.includes(v.local_ip));
  const dead = (e: Scene['ingress'][number]) => !peers.includes(e.remote_host) && e.value.ifindex !== 0;
  const egress = s.egress.filter((e) => !stray(e.value));
  const ingress = s.ingress.map((e) => ({ remote_host: e.remote_host, key: e.key, value: dead(e) ? { ...e.value, ifindex: 0, last_seen: s.now } : e.value }));
  return { scene: { ...s, egress, ingress }, swept: { egress: s.egress.length - egress.length, ingress: s.ingress.filter(dead).length } };
}

let obj: BpfObject;
let egress: BpfMap;
let ingress: BpfMap;

function plant(s: Scene): void {
  egress.clear();
  ingress.clear();
  for (const e of s.egress) egress.update(egressKey.encode(e), path.encode(e.value));
  for (const e of s.ingress) ingress.update(ingressKey.encode(e), path.encode(e.value));
}

const egressHeld = () => egress.entries().map(([k, v]) => ({ ...egressKey.decode(k), value: path.decode(v) }));
const ingressHeld = () => ingress.entries().map(([k, v]) => ({ ...ingressKey.decode(k), value: path.decode(v) }));
const byEgressKey = (a: { local_pod: string; remote_pod: string }, b: { local_pod: string; remote_pod: string }) =>
  a.local_pod.localeCompare(b.local_pod) || a.remote_pod.localeCompare(b.remote_pod);
const byIngressKey = (a: { remote_host: string; key: number }, b: { remote_host: string; key: number }) =>
  a.remote_host.localeCompare(b.remote_host) || a.key - b.key;

beforeAll(() => {
  obj = BpfObject.open(OBJECT);
  obj.load();
  egress = obj.map('egress_cache');
  ingress = obj.map('ingress_cache');
});

afterAll(() => obj?.close());

describe('agent caches on the kernel\'s maps: the raw-word scans decide as the stated rules', () => {
  it('expire deletes exactly the idle entries and the egress entries whose peer stopped answering, and counts them', () => {
    fc.assert(fc.property(scene, (s) => {
      plant(s);
      const want = expected(s);
      const r = expire(egress, ingress, s.now, s.egressIdle, s.ingressIdle);
      expect(egressHeld().sort(byEgressKey)).toEqual(want.egressLeft.map((e) => ({ local_pod: e.local_pod, remote_pod: e.remote_pod, value: e.value })).sort(byEgressKey));
      expect(ingressHeld().map((e) => ({ remote_host: e.remote_host, key: e.key, value: e.value })).sort(byIngressKey))
        .toEqual(want.ingressLeft.map((e) => ({ remote_host: e.remote_host, key: e.key, value: e.value })).sort(byIngressKey));
      expect(r).toEqual({
        egress: { deleted: s.egress.length - want.egressLeft.length, remaining: want.egressLeft.length, unanswered: want.unanswered },
        ingress: { deleted: s.ingress.length - want.ingressLeft.length, remaining: want.ingressLeft.length },
        swept: { egress: 0, ingress: 0 },
      });
    }), { numRuns: 400 });
  });

  it('keeps every live pair of full caches and retires them all once their peers fall silent', () => {
    // 2 × 65,536 entries: the scans' snapshot buffers and the peer index at the maps' size.
    const n = Math.min(egress.maxEntries, ingress.maxEntries);
    const now = 1n << 40n;
    egress.clear();
    ingress.clear();
    const ip = (a: number, b: number, c: number) => `${a}.${b}.${(c >>> 8) & 255}.${c & 255}`;
    for (let i = 0; i < n; i++) {
      const local = ip(10, 244, i % 64), remote = ip(10, 245, i), host = ip(172, 16, Math.floor(i / 63)), key = (i % 63) + 1;
      const common = { last_seen: now - BigInt(i), local_mac: '02:00:ac:1f:fa:01', remote_mac: '02:00:ac:1f:fa:02', ifindex: 5, local_key: key, remote_key: 9, remote_ready: 1 };
      ingress.update(ingressKey.encode({ remote_host: host, key }), path.encode({ ...common, local_ip: local, remote_ip: remote }));
      egress.update(egressKey.encode({ local_pod: local, remote_pod: remote }), path.encode({ ...common, local_ip: '172.16.255.1', remote_ip: host }));
    }
    expect(expire(egress, ingress, now, 20_000_000_000n, 40_000_000_000n)).toEqual({
      egress: { deleted: 0, remaining: n, unanswered: 0 }, ingress: { deleted: 0, remaining: n }, swept: { egress: 0, ingress: 0 },
    });
    // The stamps were now - i: with an idle limit of n / 2 ns, the older half of each map is idle.
    const half = BigInt(n / 2);
    const r = expire(egress, ingress, now, half, half);
    // Egress entry i goes when idle (i > n/2) or when its peer, ingress entry i, is (the same i): the older half.
    expect(r).toEqual({ egress: { deleted: n / 2 - 1, remaining: n / 2 + 1, unanswered: 0 }, ingress: { deleted: n / 2 - 1, remaining: n / 2 + 1 }, swept: { egress: 0, ingress: 0 } });
    ingress.clear();
    expect(expire(egress, ingress, now, 20_000_000_000n, 40_000_000_000n)).toEqual({
      egress: { deleted: n / 2 + 1, remaining: 0, unanswered: n / 2 + 1 }, ingress: { deleted: 0, remaining: 0 }, swept: { egress: 0, ingress: 0 },
    });
  });

  it('purgePod deletes the pod\'s egress entries and turns the ingress entries restoring into it into tombstones stamped now', () => {
    fc.assert(fc.property(scene, fc.constantFrom(...LOCAL_PODS), (s, pod) => {
      plant(s);
      const r = purgePod(egress, ingress, pod, s.now);
      const egressWant = s.egress.filter((e) => e.local_pod !== pod);
      const dead = (v: Path) => v.local_ip === pod && v.ifindex !== 0;
      const ingressWant = s.ingress.map((e) => ({ remote_host: e.remote_host, key: e.key, value: dead(e.value) ? { ...e.value, ifindex: 0, last_seen: s.now } : e.value }));
      expect(egressHeld().sort(byEgressKey)).toEqual(egressWant.map((e) => ({ local_pod: e.local_pod, remote_pod: e.remote_pod, value: e.value })).sort(byEgressKey));
      expect(ingressHeld().sort(byIngressKey)).toEqual(ingressWant.sort(byIngressKey));
      expect(r).toEqual({ egress: s.egress.length - egressWant.length, ingress: s.ingress.filter((e) => dead(e.value)).length });
    }), { numRuns: 200 });
  });

  it('sweepNodes tombstones the ingress entries of hosts that are no peer node and deletes the egress entries towards them or from an address not ours', () => {
    fc.assert(fc.property(scene, nodeSets, (s, n) => {
      plant(s);
      const peers = peersOf(n);
      const r = sweepNodes(egress, ingress, nodeWords(n.self, peers), s.now);
      const want = sweptScene(s, n);
      expect(egressHeld().sort(byEgressKey)).toEqual(want.scene.egress.map((e) => ({ local_pod: e.local_pod, remote_pod: e.remote_pod, value: e.value })).sort(byEgressKey));
      expect(ingressHeld().sort(byIngressKey)).toEqual(want.scene.ingress.sort(byIngressKey));
      expect(r).toEqual(want.swept);
    }), { numRuns: 300 });
  });

  it('expire with a node set leaves the caches as a sweep and then an expiry scan would, in one read', () => {
    fc.assert(fc.property(scene, nodeSets, (s, n) => {
      plant(s);
      const r = expire(egress, ingress, s.now, s.egressIdle, s.ingressIdle, nodeWords(n.self, peersOf(n)));
      const sw = sweptScene(s, n);
      const want = expected(sw.scene);
      expect(egressHeld().sort(byEgressKey)).toEqual(want.egressLeft.map((e) => ({ local_pod: e.local_pod, remote_pod: e.remote_pod, value: e.value })).sort(byEgressKey));
      expect(ingressHeld().map((e) => ({ remote_host: e.remote_host, key: e.key, value: e.value })).sort(byIngressKey))
        .toEqual(want.ingressLeft.map((e) => ({ remote_host: e.remote_host, key: e.key, value: e.value })).sort(byIngressKey));
      expect(r).toEqual({
        egress: { deleted: sw.scene.egress.length - want.egressLeft.length, remaining: want.egressLeft.length, unanswered: want.unanswered },
        ingress: { deleted: sw.scene.ingress.length - want.ingressLeft.length, remaining: want.ingressLeft.length },
        swept: sw.swept,
      });
    }), { numRuns: 400 });
  });

  it('sweepNodes over full caches: a removed peer\'s entries go, every other entry stays as it was', () => {
    const n = Math.min(egress.maxEntries, ingress.maxEntries);
    const now = 1n << 40n;
    egress.clear();
    ingress.clear();
    const ip = (a: number, b: number, c: number) => `${a}.${b}.${(c >>> 8) & 255}.${c & 255}`;
    // 1,041 peers of 63 keys each; the first peer's entries, and those of every 7th, are from peers that left.
    const host = (i: number) => ip(172, 16, Math.floor(i / 63) + 2);
    const gone = (i: number) => Math.floor(i / 63) % 7 === 0;
    const common = { last_seen: 5n, local_mac: '02:00:ac:1f:fa:01', remote_mac: '02:00:ac:1f:fa:02', ifindex: 5, remote_key: 9, remote_ready: 1 };
    for (let i = 0; i < n; i++) {
      const local = ip(10, 244, i % 64), remote = ip(10, 245, i), key = (i % 63) + 1;
      ingress.update(ingressKey.encode({ remote_host: host(i), key }), path.encode({ ...common, local_key: key, local_ip: local, remote_ip: remote }));
      egress.update(egressKey.encode({ local_pod: local, remote_pod: remote }), path.encode({ ...common, local_key: key, local_ip: '172.16.0.1', remote_ip: host(i) }));
    }
    const peers = [...new Set(Array.from({ length: n }, (_, i) => i).filter((i) => !gone(i)).map(host))];
    const leaving = Array.from({ length: n }, (_, i) => i).filter(gone).length;
    const r = sweepNodes(egress, ingress, nodeWords(['172.16.0.1'], peers), now);
    expect(r).toEqual({ egress: leaving, ingress: leaving });
    expect(egress.entries().length).toBe(n - leaving);
    const held = ingress.entries().map(([k, v]) => ({ k: ingressKey.decode(k), v: path.decode(v) }));
    expect(held.length).toBe(n);
    for (const { k, v } of held) {
      const [, , hi, lo] = k.remote_host.split('.').map(Number);
      const i = (hi * 256 + lo - 2) * 63 + k.key - 1;
      const planted = { ...common, local_key: k.key, local_ip: ip(10, 244, i % 64), remote_ip: ip(10, 245, i) };
      expect(v).toEqual(gone(i) ? { ...planted, ifindex: 0, last_seen: now } : planted);
    }
    // A second sweep against the same set finds nothing more: tombstones are not stamped again.
    expect(sweepNodes(egress, ingress, nodeWords(['172.16.0.1'], peers), now + 1n)).toEqual({ egress: 0, ingress: 0 });
  });
});
