/**
 * Every fixture: the model and the kernel agree on everything, and the kernel
 * shows the behaviour the fixture was written to pin down.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigFlag, KEY_MAX, KEY_MIN, WIDE_KEY_MAX, WIDE_KEY_MIN, egressFilterSlot } from '../../dataplane/maps.ts';
import { loadFixtures, type Fixture } from './fixtures.ts';
import { runCase } from './compare.ts';
import { verifyL4 } from '../../testing/packet/index.ts';
import { KernelDatapath } from './kernel.ts';

const fixtures: Fixture[] = await loadFixtures();
const kernel = new KernelDatapath();
afterAll(() => kernel.close());

/** pass: TC_ACT_UNSPEC, which lets a program behind ours run (bpf/verdict.h). */
const VERDICT = { pass: -1, drop: 2, redirect: 7 } as const;

describe('fixtures', () => {
  it('cover all three programs', () => {
    for (const p of ['init', 'restore', 'masq']) expect(fixtures.filter((f) => f.program === p).length).toBeGreaterThan(10);
  });

  it.each(fixtures.map((f) => [f.name, f] as const))('%s', (_name, f) => {
    const o = runCase(kernel, f);
    expect(o.mismatches, o.mismatches.join('\n')).toEqual([]);
    const want = f.json.expect;
    expect(o.kernel.verdict, 'verdict').toBe(VERDICT[want.verdict]);
    expect(o.kernel.effects.counters[want.counter], `counter ${want.counter}`).toBe(1);
    for (const c of want.also ?? []) expect(o.kernel.effects.counters[c], `counter ${c}`).toBe(1);
    expect(o.kernel.effects.redirect, 'redirect').toEqual(want.redirect ?? { ifindex: 0, kind: 'NONE' });
    if (want.unchanged) expect(o.kernel.packet.equals(f.packet), 'packet untouched').toBe(true);
    else if (want.verdict !== 'drop') expect(o.kernel.packet.equals(f.packet), 'packet rewritten').toBe(false);
    for (const e of want.egress ?? []) {
      const got = o.kernel.state.egress_cache.lookup(e.key);
      expect(got, `egress entry ${JSON.stringify(e.key)}`).toBeDefined();
      const picked = Object.fromEntries(Object.keys(e.has).map((k) => [k, String(got![k as keyof typeof got])]));
      expect(picked).toEqual(Object.fromEntries(Object.entries(e.has).map(([k, v]) => [k, String(v)])));
    }
    // Offsets straight from the wire format: the IPv4 header at 14, L4 after its options.
    const out = o.kernel.packet;
    const l4 = 14 + (out[14] & 0x0f) * 4;
    const urgentAt = l4 + 18;
    if (want.carrier) {
      const entry = o.kernel.state.egress_cache.lookup(want.carrier.pair);
      expect(entry, `egress entry ${JSON.stringify(want.carrier.pair)}`).toBeDefined();
      const key = entry![want.carrier.field];
      const [lo, hi] = want.carrier.wide ? [WIDE_KEY_MIN, WIDE_KEY_MAX] : [KEY_MIN, KEY_MAX];
      expect(key >= lo && key <= hi, `${want.carrier.field} ${key} is ${want.carrier.wide ? 'wide' : 'narrow'}`).toBe(true);
      expect(out.readUInt16BE(20) & 0x8000, 'RF').toBe(0x8000);
      const dscp = out[15] >> 2;
      if (want.carrier.in === 'dscp') expect(dscp, 'DSCP = key').toBe(key);
      else if (want.carrier.in === 'icmp-code') {
        expect(out[l4 + 1], 'ICMP code = high 8 bits of the key').toBe(key >> 6);
        expect(dscp, 'DSCP = low 6 bits of the key').toBe(key & 63);
      } else {
        expect(dscp, 'DSCP 0 under a wide key').toBe(0);
        if (want.carrier.in === 'ip-id') expect(out.readUInt16BE(18), 'outer IPv4 ID = key').toBe(key);
        else if (want.carrier.in === 'udp-length') expect(out.readUInt16BE(l4 + 4), 'UDP length = key').toBe(key);
        else expect(out.readUInt16BE(urgentAt), 'TCP urgent pointer = key').toBe(key);
      }
    }
    if (want.flow) {
      const dotted = (at: number) => Array.from(out.subarray(at, at + 4)).join('.');
      expect({ src: dotted(26), dst: dotted(30), sport: out.readUInt16BE(l4), dport: out.readUInt16BE(l4 + 2) }, 'addresses and ports').toEqual(want.flow);
      expect(verifyL4(out, 14), 'L4 checksum valid for them').toBe(true);
    }
    if (want.urgent !== undefined) expect(out.readUInt16BE(urgentAt), 'TCP urgent pointer').toBe(want.urgent);
    if (want.udpLength !== undefined) expect(out.readUInt16BE(l4 + 4), 'UDP length').toBe(want.udpLength);
    if (want.udpChecksum !== undefined) expect(out.readUInt16BE(l4 + 6), 'UDP checksum').toBe(want.udpChecksum);
    if (want.icmpCode !== undefined) expect(out[l4 + 1], 'ICMP code').toBe(want.icmpCode);
    if (want.filter) {
      const w = o.kernel.state.egress_filter;
      const half = w.length / 2;
      const bits = (from: number) => w.subarray(from, from + half).reduce((n, x) => n + popcount(x), 0);
      expect([bits(0), bits(half)], 'bits set in each half of egress_filter').toEqual([want.filter.bitsPerHalf, want.filter.bitsPerHalf]);
      const reads = o.kernel.state.config.flags & ConfigFlag.FILTER_HALF1 ? half : 0;
      for (const p of want.filter.pairs) {
        const k = o.kernel.state.egress_cache.keys.fromLayout(p.key);
        const slot = egressFilterSlot(k.local_pod, k.remote_pod, half * 32);
        const at = (from: number) => (w[from + (slot >>> 5)] >>> (slot & 31)) & 1;
        if (p.set) expect([at(0), at(half)], `bit of ${JSON.stringify(p.key)} in both halves`).toEqual([1, 1]);
        else expect(at(reads), `bit of ${JSON.stringify(p.key)} in the half masq reads`).toBe(0);
      }
    }
    for (const st of want.stamps ?? []) {
      const before = st.cache === 'egress' ? f.state.egress_cache.lookup(st.key) : f.state.ingress_cache.lookup(st.key);
      const after = st.cache === 'egress' ? o.kernel.state.egress_cache.lookup(st.key) : o.kernel.state.ingress_cache.lookup(st.key);
      expect(before && after, `${st.cache} entry ${JSON.stringify(st.key)} before and after`).toBeTruthy();
      expect(after!.last_seen !== before!.last_seen, `${st.cache} ${JSON.stringify(st.key)} last_seen ${before!.last_seen} -> ${after!.last_seen}: refreshed`).toBe(st.refreshed);
    }
  });
});

function popcount(x: number): number {
  let n = 0;
  for (; x; x >>>= 1) n += x & 1;
  return n;
}
