/**
 * The host stays in charge (issue 13, point 5): each simulated host has a
 * conntrack, kube-proxy's Service DNAT and FORWARD deny rules, and the
 * programs admit a flow to the fast path only when the host's conntrack
 * knows it established, liberal and un-NATed (sim/model/conntrack.ts).
 * Over random clusters, Services, policies, churn, loss, reordering,
 * learning and expiring conntrack entries:
 * - a Service connection never breaks: its requests reach one backend of the
 *   Service, DNATed; every reply reaches the client from the ClusterIP:port
 *   it asked, never from the backend's own address;
 * - a denied flow never arrives, ingress or egress;
 * - allowed flows are carried by masq once learned (a floor on the fast path's
 *   share, so that the properties above are not held by an empty fast path);
 * - a run whose programs skip the check (the build without it) breaks both,
 *   and the failure shrinks to a few lines.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Cluster, type RunOptions, type RunResult } from './cluster.ts';
import { scaledTimeouts } from './conntrack.ts';
import { formatScenario, type FlowSpec, type PodRef, type Scenario } from './scenario.ts';

const US = 1e3;
const RUNS = Number(process.env.SIM_PROPERTY_RUNS ?? 1);
const SEED = process.env.SIM_PROPERTY_SEED === undefined ? 20261206 : Number(process.env.SIM_PROPERTY_SEED);
const MAX_HOSTS = 3;
const MAX_PODS = 4;
const PORTS = [80, 443, 8080];

const podRef = fc.record({ host: fc.nat(MAX_HOSTS - 1), slot: fc.nat(MAX_PODS - 1) });

const flowArb = fc.record({
  at: fc.nat(30_000).map((x) => x * US),
  a: podRef,
  b: podRef,
  proto: fc.constantFrom('tcp' as const, 'udp' as const, 'icmp' as const),
  packets: fc.integer({ min: 2, max: 60 }),
  gapNs: fc.integer({ min: 100, max: 2_000 }).map((x) => x * US),
  pattern: fc.constantFrom('rr' as const, 'stream' as const),
  // Half the flows go to a Service.
  service: fc.option(fc.nat(1), { nil: undefined, freq: 2 }),
});

const ruleArb = fc.record({
  at: fc.nat(30_000).map((x) => x * US),
  host: fc.nat(MAX_HOSTS - 1),
  op: fc.constantFrom('add' as const, 'add' as const, 'remove' as const),
  dir: fc.constantFrom('egress' as const, 'ingress' as const),
  src: fc.option(podRef, { nil: undefined }),
  dst: fc.option(podRef, { nil: undefined }),
  dport: fc.option(fc.constantFrom(...PORTS, 8080, 9000), { nil: undefined }),
  proto: fc.option(fc.constantFrom('tcp' as const, 'udp' as const, 'icmp' as const), { nil: undefined }),
  removes: fc.nat(3),
});

const rawArb = fc.record({
  hosts: fc.integer({ min: 2, max: MAX_HOSTS }),
  podsPerHost: fc.integer({ min: 2, max: MAX_PODS }),
  link: fc.record({
    latencyNs: fc.integer({ min: 10, max: 300 }).map((x) => x * US),
    jitterNs: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 1_000 }).map((x) => x * US)),
    loss: fc.oneof(fc.constant(0), fc.double({ min: 0, max: 0.1, noNaN: true })),
  }),
  timing: fc.record({
    egressIdleNs: fc.integer({ min: 2, max: 20 }).map((x) => x * 1e6),
    scanIntervalNs: fc.integer({ min: 200, max: 2_000 }).map((x) => x * US),
    ctDrainNs: fc.integer({ min: 100, max: 2_000 }).map((x) => x * US),
  }),
  // UDP's 30 s / 120 s as 30 / 120 ms or 9 / 36 ms: entries of flows on the fast path expire under them.
  ctScale: fc.constantFrom(1, 1e-3, 3e-4),
  services: fc.array(fc.record({
    proto: fc.constantFrom('tcp' as const, 'udp' as const),
    port: fc.constantFrom(80, 443),
    targetPort: fc.constantFrom(8080, 9000),
    backends: fc.array(podRef, { minLength: 1, maxLength: 3 }),
  }), { minLength: 1, maxLength: 2 }),
  flows: fc.array(flowArb, { minLength: 1, maxLength: 8 }),
  churn: fc.array(fc.record({
    at: fc.nat(60_000).map((x) => x * US), pod: podRef, gapNs: fc.nat(3_000).map((x) => x * US), sameIp: fc.boolean(),
  }), { maxLength: 3 }),
  hostPolicy: fc.array(ruleArb, { maxLength: 4 }),
  scheme: fc.constantFrom('6-bit', 'wide'),
  ifindex: fc.constantFrom('fresh' as const, 'reuse' as const),
  seed: fc.nat(),
});

type Raw = typeof rawArb extends fc.Arbitrary<infer T> ? T : never;

/** The generated references folded into the cluster's size; a Service's client is never one of its backends (no hairpin). */
function toScenario(r: Raw): Scenario {
  const fit = (p: { host: number; slot: number }): PodRef => ({ host: p.host % r.hosts, slot: p.slot % r.podsPerHost });
  const same = (x: PodRef, y: PodRef) => x.host === y.host && x.slot === y.slot;
  const services = r.services.map((v) => {
    const backends: PodRef[] = [];
    for (const b of v.backends.map(fit)) if (!backends.some((x) => same(x, b))) backends.push(b);
    return { ...v, backends };
  });
  const flows: FlowSpec[] = [];
  for (const f of r.flows) {
    const a = fit(f.a), b = fit(f.b);
    if (f.service !== undefined) {
      const n = f.service % services.length;
      if (services[n].backends.some((x) => same(x, a))) continue;
      flows.push({ ...f, a, b: a, service: n, proto: services[n].proto });
    } else if (!same(a, b)) flows.push({ at: f.at, a, b, proto: f.proto, packets: f.packets, gapNs: f.gapNs, pattern: f.pattern });
  }
  const hostOf = (h: number) => h % r.hosts;
  return {
    hosts: r.hosts, podsPerHost: r.podsPerHost, link: r.link,
    timing: { egressIdleNs: r.timing.egressIdleNs, ingressIdleNs: 2 * r.timing.egressIdleNs + r.timing.scanIntervalNs, scanIntervalNs: r.timing.scanIntervalNs, ctDrainNs: r.timing.ctDrainNs },
    ctTimeouts: scaledTimeouts(r.ctScale),
    scheme: r.scheme, ifindex: r.ifindex, flows, hostFlows: [], services,
    churn: r.churn.map((c) => ({ ...c, pod: fit(c.pod) })),
    policy: [],
    hostPolicy: r.hostPolicy.map((p) => ({
      ...p, host: hostOf(p.host), src: p.src && fit(p.src), dst: p.dst && fit(p.dst),
      proto: p.dport && p.proto === 'icmp' ? 'tcp' as const : p.proto,
    })),
    durationNs: 100e6,
    seed: r.seed,
  };
}

function report(sc: Scenario, r: RunResult): string {
  return `${formatScenario(sc)}\n\n${r.violations.slice(0, 3).map((v) => Cluster.describe(v)).join('\n')}`;
}

/** Runs the property; on failure, throws the shrunk scenario and its violations (traced) as text. */
function holds(arb: fc.Arbitrary<Raw>, numRuns: number, opts: RunOptions = {}, seed = SEED): void {
  const out = fc.check(fc.property(arb, (raw) => new Cluster(toScenario(raw), opts).run().violations.length === 0), { numRuns, seed });
  if (!out.failed) return;
  const sc = toScenario(out.counterexample![0]);
  throw new Error(`invariant broken after ${out.numShrinks} shrinks (seed ${out.seed}):\n${report(sc, new Cluster(sc, { ...opts, trace: true }).run())}`);
}

/** The message of a failing holds(), or ''. */
function failure(f: () => void): string {
  try {
    f();
  } catch (e) {
    return (e as Error).message;
  }
  return '';
}

const clean = rawArb.map((r) => ({ ...r, link: { ...r.link, loss: 0 }, churn: [], hostPolicy: [], ctScale: 1 as const }));

describe('host authority: Services, FORWARD policy and conntrack under churn, loss, reordering and learning', () => {
  it('a Service connection never breaks, a denied flow never arrives, and every other invariant holds', () => {
    // The checker's own invariants (exactly once, right pod, headers and payload, host traffic)
    // plus: Service requests reach one backend of their Service, DNATed; replies come from the
    // ClusterIP:port; no packet of a connection that a FORWARD rule denied from its start arrives.
    holds(rawArb, 150 * RUNS);
  });

  it('on a clean network every packet of every connection, Services included, arrives', () => {
    fc.assert(fc.property(clean, (raw) => {
      const sc = toScenario(raw);
      const r = new Cluster(sc, { trace: true }).run();
      const lost = Object.entries(r.stats.drops).filter(([, n]) => n > 0);
      if (r.violations.length || lost.length) throw new Error(`${report(sc, r)}\ndrops: ${JSON.stringify(Object.fromEntries(lost))}`);
      const s = r.stats;
      expect(s.delivered.fast + s.delivered.overlay + s.delivered.viaStack + s.delivered.local).toBe(s.sent.cross + s.sent.local + s.sent.service);
    }), { numRuns: 60 * RUNS, seed: SEED });
  });

  it('allowed flows are carried by masq once learned: at least half of long TCP and UDP flows\' cross-host packets', () => {
    // Long flows, slow enough for the agent's drain; no policy, loss or churn to keep them off the fast path.
    const long = clean.map((r) => ({
      ...r, scheme: 'wide' as const, services: r.services, ctScale: 1 as const,
      flows: r.flows.map((f) => ({ ...f, service: undefined, proto: f.proto === 'icmp' ? 'tcp' as const : f.proto, packets: 40 + (f.packets % 20), gapNs: 1e6 + (f.gapNs % 1e6) })),
      timing: { ...r.timing, ctDrainNs: 300 * US, egressIdleNs: 50e6 },
    }));
    let cross = 0, fast = 0;
    fc.assert(fc.property(long, (raw) => {
      const sc = toScenario(raw);
      const r = new Cluster(sc).run();
      expect(r.violations).toEqual([]);
      const s = r.stats;
      if (s.sent.cross > 0) expect(s.masqueraded / s.sent.cross).toBeGreaterThanOrEqual(0.5);
      // What masq carried was restored into its pod (the receiving host admitted it), or handed to its stack.
      expect(s.delivered.fast + s.delivered.viaStack).toBe(s.masqueraded);
      cross += s.sent.cross;
      fast += s.masqueraded;
    }), { numRuns: 40 * RUNS, seed: SEED });
    // Over all the runs: most cross-host packets of allowed flows took the fast path.
    expect(cross).toBeGreaterThan(1000);
    expect(fast / cross).toBeGreaterThan(0.75);
  });
});

/** Two hosts, two pods each, a TCP flow h0p0 → h1p0:443 from t = 0; the test adds or replaces what it needs. */
function pairScenario(extra: Partial<Scenario>): Scenario {
  return {
    hosts: 2, podsPerHost: 2, link: { latencyNs: 50e3, jitterNs: 20e3, loss: 0 },
    timing: { egressIdleNs: 20e9, ingressIdleNs: 40e9, scanIntervalNs: 1e9, ctDrainNs: 1e6 }, scheme: 'wide', ifindex: 'fresh',
    flows: [{ at: 0, a: { host: 0, slot: 0 }, b: { host: 1, slot: 0 }, proto: 'tcp', packets: 40, gapNs: 1e6, pattern: 'rr' }],
    hostFlows: [], churn: [], policy: [], durationNs: 200e6, seed: 3, ...extra,
  };
}

describe('host authority: the cases of issue 13, by hand', () => {
  it('a ClusterIP connection to a backend on another host: requests taken to the backend, replies given the ClusterIP back, on the fast path', () => {
    const sc = pairScenario({
      services: [{ proto: 'tcp', port: 80, targetPort: 8080, backends: [{ host: 1, slot: 1 }] }],
      flows: [{ at: 0, a: { host: 0, slot: 1 }, b: { host: 0, slot: 1 }, service: 0, proto: 'tcp', packets: 60, gapNs: 1e6, pattern: 'rr' }],
    });
    const r = new Cluster(sc, { trace: true }).run();
    expect(r.violations.map((v) => Cluster.describe(v))).toEqual([]);
    expect(r.stats.drops).toEqual({});
    // After the handshake crossed both stacks, every packet is carried: the client's masq
    // applies the DNAT its host recorded, its restore reverses it on the replies.
    expect(r.stats.masqueraded).toBeGreaterThan(40);
    expect(r.stats.delivered.fast).toBe(r.stats.masqueraded);
    expect(r.stats.counters.SERVICE_NAT).toBe(r.stats.masqueraded);
    expect(r.stats.counters.CT_NAT).toBe(0);

    // Without the Service range the requests cross the client host's stack on the overlay;
    // the replies are still restored with the ClusterIP.
    const noRange = new Cluster({ ...sc, serviceRange: false }, { trace: true }).run();
    expect(noRange.violations.map((v) => Cluster.describe(v))).toEqual([]);
    expect(noRange.stats.delivered.overlay).toBeGreaterThan(25);
    expect(noRange.stats.delivered.fast).toBeGreaterThan(20);
    expect(noRange.stats.counters.SERVICE_NAT).toBe(noRange.stats.delivered.fast);

    // The same run with programs that skip the check: the backend's replies are restored into the client as they are.
    const bad = new Cluster(sc, { trace: true, bypassAdmission: true }).run();
    expect(bad.violationCounts['a Service connection never breaks']).toBeGreaterThan(10);
    expect(Cluster.describe(bad.violations[0])).toMatch(/from 10\.244\.2\.\d+, not from the ClusterIP 10\.96\.0\.10/);
  });

  it('a Service with a backend on the client\'s own host: DNATed and reversed through cni0 (br_netfilter), never on the fast path', () => {
    const sc = pairScenario({
      services: [{ proto: 'udp', port: 443, targetPort: 9000, backends: [{ host: 0, slot: 1 }] }],
      flows: [{ at: 0, a: { host: 0, slot: 0 }, b: { host: 0, slot: 0 }, service: 0, proto: 'udp', packets: 20, gapNs: 1e6, pattern: 'rr' }],
    });
    const r = new Cluster(sc).run();
    expect(r.violations.map((v) => Cluster.describe(v))).toEqual([]);
    expect(r.stats.delivered.local).toBe(20);
    expect(r.stats.masqueraded).toBe(0);
  });

  it('a flow a FORWARD rule denies never arrives, though its pod pair is on the fast path; without the check it does', () => {
    for (const dir of ['ingress', 'egress'] as const) {
      const sc = pairScenario({
        flows: [
          { at: 0, a: { host: 0, slot: 0 }, b: { host: 1, slot: 0 }, proto: 'tcp', packets: 60, gapNs: 1e6, pattern: 'rr' },
          // Flow 2 is on port 8080 (flow 1 on 443: traffic.ts flowPorts), between the same pods, from 20 ms, once the pair is on the fast path.
          { at: 20e6, a: { host: 0, slot: 0 }, b: { host: 1, slot: 0 }, proto: 'tcp', packets: 20, gapNs: 1e6, pattern: 'rr' },
        ],
        hostPolicy: [{ at: 1e6, host: dir === 'ingress' ? 1 : 0, op: 'add', dir, src: { host: 0, slot: 0 }, dst: { host: 1, slot: 0 }, dport: 8080, proto: 'tcp' }],
      });
      const r = new Cluster(sc, { trace: true }).run();
      expect(r.violations.map((v) => Cluster.describe(v))).toEqual([]);
      // The allowed flow went fast; every packet of the denied one (its SYN, sent again and again) died in FORWARD.
      expect(r.stats.masqueraded).toBeGreaterThan(30);
      expect(r.stats.drops['host-policy']).toBe(10);
      expect(r.stats.sent.unsent).toBe(10);

      const bad = new Cluster(sc, { trace: true, bypassAdmission: true }).run();
      expect(bad.violationCounts['a denied flow never arrives']).toBeGreaterThan(0);
    }
  });

  it('a rule added while a flow is established leaves it alone (ESTABLISHED first), as without XMasq', () => {
    const sc = pairScenario({
      hostPolicy: [{ at: 20e6, host: 1, op: 'add', dir: 'ingress', src: { host: 0, slot: 0 }, dst: { host: 1, slot: 0 }, dport: 443, proto: 'tcp' }],
    });
    for (const scheme of ['wide', 'overlay']) {
      const r = new Cluster({ ...sc, scheme }).run();
      expect(r.violations).toEqual([]);
      expect(r.stats.drops).toEqual({});
      expect(r.stats.delivered.fast + r.stats.delivered.overlay + r.stats.delivered.viaStack).toBe(40);
    }
  });

  it('a UDP flow whose entries expire while it is on the fast path falls back to the stack and comes back, nothing lost', () => {
    // UDP's timeouts at 1/1000: 30 ms unreplied, 120 ms once a stream (2 ms): the fast path refreshes nothing.
    // The programs look the flow up again 200 ms after they last did (ct_admitted), find no entry, and leave it to the stack.
    const sc = pairScenario({
      ctTimeouts: scaledTimeouts(1e-3), durationNs: 700e6,
      flows: [{ at: 0, a: { host: 0, slot: 0 }, b: { host: 1, slot: 0 }, proto: 'udp', packets: 600, gapNs: 1e6, pattern: 'rr' }],
    });
    const r = new Cluster(sc).run();
    expect(r.violations).toEqual([]);
    expect(r.stats.drops).toEqual({});
    expect(r.stats.delivered.fast + r.stats.delivered.overlay + r.stats.delivered.viaStack).toBe(600);
    // Refused after the expiry (no entry), then admitted again once the new entry saw a reply.
    expect(r.stats.counters.CT_REFUSED).toBeGreaterThanOrEqual(2);
    expect(r.stats.masqueraded).toBeGreaterThan(540);
  });
});

describe('host authority: the properties catch programs that skip the check', () => {
  // Small clusters, rules from the start: the planted bug (Env without conntrack) must be found and shrunk.
  const small = rawArb.map((r) => ({ ...r, hosts: 2, podsPerHost: 2, link: { ...r.link, loss: 0 }, churn: [] }));

  it('a Service\'s replies restored into the client with the backend\'s address are found, and shrink to a short trace', () => {
    const message = failure(() => holds(small.map((r) => ({ ...r, hostPolicy: [] })), 500, { bypassAdmission: true }, 7));
    expect(message).toMatch(/\[a Service connection never breaks\]/);
    expect(message.split('\n\n')[0].split('\n').length).toBeLessThanOrEqual(8);
    console.log(message);
  });

  it('a denied flow delivered on the fast path is found, and shrinks to a short trace', () => {
    const denyArb = small.map((r) => ({ ...r, services: r.services, flows: r.flows.map((f) => ({ ...f, service: undefined })), hostPolicy: r.hostPolicy.map((p) => ({ ...p, at: 0, op: 'add' as const })) }));
    const message = failure(() => holds(denyArb, 2_000, { bypassAdmission: true }, 11));
    expect(message).toMatch(/\[a denied flow never arrives\]/);
    expect(message.split('\n\n')[0].split('\n').length).toBeLessThanOrEqual(9);
    console.log(message);
  });
});
