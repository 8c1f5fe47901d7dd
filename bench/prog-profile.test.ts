/**
 * bench:prog --profile: a sample goes to the row it was taken in and, within it, to what the
 * innermost program frame was doing. The pure parts against hand-written perf output; then a
 * real recording of a short bench run, whose rows must show the helpers their programs call
 * and no others.
 */
import { describe, expect, it } from 'vitest';
import { HARNESS, OWN, Recording, breakdown, classify, parseScript } from './prog-profile.ts';
import { runBench, type RowWindow } from './programs.ts';
import { requireRoot } from '../testing/privileges.ts';

// As `perf script -F time,ip,sym` prints it: a time line, then the chain from the leaf.
const SCRIPT = `
    1000.000100: 
\tffffffff81532e6e htab_map_hash
\tffffffff815339c4 __htab_map_lookup_elem
\tffffffffc000841d bpf_prog_3926f4c86cfe700e_bench_masq
\tffffffff81f55241 bpf_test_run
\tffffffff81f56509 bpf_prog_test_run_skb

    1000.000200: 
\tffffffffc000841d bpf_prog_3926f4c86cfe700e_bench_masq
\tffffffff81f55241 bpf_test_run

    1000.000300: 
\tffffffff81b00000 trie_lookup_elem
\tffffffffc0009000 bpf_prog_6e379255c84479b2_policy_walk
\tffffffffc000841d bpf_prog_7318640d16965a11_bench_policy
\tffffffff81f55241 bpf_test_run

    1000.000400: 
\tffffffff81f55241 bpf_test_run
\tffffffff81f56509 bpf_prog_test_run_skb

    1000.000500: 
\tffffffff8224215b pv_native_safe_halt

    1000.000600: 
\tffffffff81ee1b0d bpf_fancy_new_helper
\tffffffffc000c3d0 bpf_prog_fd0d23e0f2e48e09_bench_restore
\tffffffff81f55241 bpf_test_run
`;

describe('bench:prog --profile, its parts', () => {
  it('reads times to the nanosecond and chains leaf first', () => {
    const s = parseScript(SCRIPT);
    expect(s).toHaveLength(6);
    expect(s[0].ns).toBe(1_000_000_100_000n);
    expect(s[0].frames).toEqual(['htab_map_hash', '__htab_map_lookup_elem', 'bpf_prog_3926f4c86cfe700e_bench_masq', 'bpf_test_run', 'bpf_prog_test_run_skb']);
  });

  it('gives a sample to the callee of the innermost program frame, a subprogram included', () => {
    const what = parseScript(SCRIPT).map((s) => classify(s.frames));
    expect(what).toEqual(['hash map lookup', OWN, 'LPM trie lookup', HARNESS, undefined, 'bpf_fancy_new_helper']);
  });

  it('puts samples in the row whose window holds them, per packet', () => {
    const windows: RowWindow[] = [
      { name: 'a', kind: 'full', startNs: 1_000_000_000_000n, endNs: 1_000_000_250_000n, packets: 10 },
      { name: 'b', kind: 'pass', startNs: 1_000_000_250_001n, endNs: 1_000_001_000_000n, packets: 5 },
    ];
    const ns = breakdown(parseScript(SCRIPT), windows, 1000);
    // one sample at 1 kHz = 1 ms; over 10 packets, 100 µs each
    expect(Object.fromEntries(ns.get('a')!)).toEqual({ 'hash map lookup': 100_000, [OWN]: 100_000 });
    // the idle sample (no test run) counts nowhere
    expect(Object.fromEntries(ns.get('b')!)).toEqual({ 'LPM trie lookup': 200_000, [HARNESS]: 200_000, bpf_fancy_new_helper: 200_000 });
  });
});

describe('bench:prog --profile, recorded', () => {
  it('shows each row the helpers its program calls, and no others', async () => {
    requireRoot(import.meta.url, 'BPF_PROG_TEST_RUN, perf record of this process');
    const rec = await Recording.start();
    const windows: RowWindow[] = [];
    try {
      runBench({ repeat: 20_000, runs: 1, log: () => {}, profile: { repeat: 100_000, windows } });
    } catch (e) {
      await rec.stop(); // no perf left recording
      throw e;
    }
    const ns = breakdown(await rec.stop(), windows);
    const row = (name: string) => {
      const m = ns.get(name);
      if (!m) throw new Error(`no row "${name}" in ${[...ns.keys()].join(', ')}`);
      return m;
    };
    expect(windows.map((w) => w.packets)).toEqual(windows.map(() => 100_000));
    const masq = row('masq (pod → NIC)');
    for (const what of ['hash map lookup', 'checksum helpers']) expect(masq.get(what) ?? 0, what).toBeGreaterThan(0);
    // the clock map is calibrated as the agent keeps it: jiffies (inlined), no call of the coarse clock
    expect(masq.get('clock (ktime coarse)')).toBeUndefined();
    expect(masq.get('LPM trie lookup')).toBeUndefined();
    // the policy walk's array lookups are inlined: its time is the program's own, no helper's
    const walk = row('policy: 1 mask, 1 rule');
    expect(walk.get(OWN) ?? 0).toBeGreaterThan(0);
    for (const what of ['LPM trie lookup', 'hash map lookup']) expect(walk.get(what), what).toBeUndefined();
    const none = row('policy: 0 rules');
    expect(none.get('LPM trie lookup')).toBeUndefined();
    expect(none.get('hash map lookup')).toBeUndefined();
    // A flow unknown to conntrack is looked up there at every packet; an admitted one only
    // when its admission is 200 ms old (bpf/conntrack.h), which a slow run can reach once.
    const lookedUp = row('masq, flow unknown to conntrack (overlay)').get('conntrack kfuncs') ?? 0;
    expect(lookedUp).toBeGreaterThan(0);
    expect(masq.get('conntrack kfuncs') ?? 0).toBeLessThan(lookedUp / 10);
    // A pod packet of no pair passes on egress_filter's clear bit: no hash lookup, no clock.
    const pass = row('masq pass (no egress entry)');
    expect(pass.get('hash map lookup')).toBeUndefined();
    expect(pass.get('clock (ktime coarse)')).toBeUndefined();
    expect(row('masq pass (no entry, its filter bit set: one hash miss)').get('hash map lookup') ?? 0).toBeGreaterThan(0);
  });
});
