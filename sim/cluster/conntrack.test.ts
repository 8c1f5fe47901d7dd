/**
 * The simulated hosts' conntrack (conntrack.ts): its TCP states, UDP and ICMP
 * timeouts, DNAT entries and expiry, as the model's admission check reads
 * them (sim/model/conntrack.ts ctAdmit); its table against a plain map; the
 * NAT rewrite and TCP flag variants against a full recomputation.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { CT_RECHECK_NS, MAX_ENTRIES } from '../../dataplane/maps.ts';
import { CT_ADMIT, CT_CURRENT_NETNS, NatSide, ctAdmit, ipWord, newCtTo } from '../model/conntrack.ts';
import { Hdrs } from '../model/packet.ts';
import { emptyState, type Env } from '../model/index.ts';
import { verifyL4 } from '../../testing/packet/index.ts';
import { CT_ESTABLISHED, CT_INVALID, CT_NEW, HostConntrack, IPS_DST_NAT, IPS_SEEN_REPLY, LINUX_CT_TIMEOUTS, TCP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN, scaledTimeouts } from './conntrack.ts';
import { ipHeaderValid, natRewrite } from './frames.ts';
import { ipToU32 } from './topology.ts';
import { FLAGS_FINACK, FLAGS_SYN, FLAGS_SYNACK, buildTemplate, withTcpFlags } from './traffic.ts';

const A = ipWord('10.244.1.2'), B = ipWord('10.244.2.3'), VIP = ipWord('10.96.0.10');
const TCPP = 6, UDPP = 17;
const PA = TCP_PSH | TCP_ACK;

/** A packet's headers as the programs parse them, for ctAdmit. */
function hdrs(proto: number, sport: number, dport: number, flags = PA): Hdrs {
  const h = new Hdrs();
  h.proto = proto;
  h.sport = sport;
  h.dport = dport;
  h.tcp_flags = proto === TCPP ? flags : 0;
  h.l4_ok = true;
  return h;
}

/** What the programs get from the host: its clock and its table. */
function envOf(ct: HostConntrack): Env {
  return { now: BigInt(Math.round(ct.now)), random: () => 0, conntrack: ct };
}

/** A packet crossing the stack: track, then confirm as FORWARD accepted it. */
function cross(ct: HostConntrack, src: number, dst: number, sport: number, dport: number, proto: number, flags: number): number {
  const st = ct.track(src, dst, sport, dport, proto, flags, 0);
  if (st !== CT_INVALID) ct.confirm();
  return st;
}

describe('sim/cluster conntrack', () => {
  it('a TCP connection: SYN_SENT, SYN_RECV, ESTABLISHED; admitted only once liberal; a FIN takes it off the fast path', () => {
    const ct = new HostConntrack();
    const s = emptyState(MAX_ENTRIES.test);
    const admit = () => ctAdmit(s, envOf(ct), hdrs(TCPP, 40000, 80), A, B, CT_CURRENT_NETNS, 0, NatSide.NONE, newCtTo());
    expect(admit()).toBe('CT_REFUSED');
    expect(cross(ct, A, B, 40000, 80, TCPP, TCP_SYN)).toBe(CT_NEW);
    expect(ct.lookup({ src: A, dst: B, sport: 40000, dport: 80, proto: TCPP })!.tcpState).toBe(TCP.SYN_SENT);
    // A retransmitted SYN is still NEW: the rules see it again.
    expect(cross(ct, A, B, 40000, 80, TCPP, TCP_SYN)).toBe(CT_NEW);
    expect(cross(ct, B, A, 80, 40000, TCPP, TCP_SYN | TCP_ACK)).toBe(CT_ESTABLISHED);
    expect(ct.lookup({ src: B, dst: A, sport: 80, dport: 40000, proto: TCPP })!.tcpState).toBe(TCP.SYN_RECV);
    expect(admit()).toBe('CT_REFUSED');
    expect(cross(ct, A, B, 40000, 80, TCPP, TCP_ACK)).toBe(CT_ESTABLISHED);
    const e = ct.lookup({ src: A, dst: B, sport: 40000, dport: 80, proto: TCPP })!;
    expect(e.tcpState).toBe(TCP.ESTABLISHED);
    expect(e.status & IPS_SEEN_REPLY).toBe(IPS_SEEN_REPLY);
    expect(e.orig).toEqual({ src: A, dst: B, sport: 40000, dport: 80, proto: TCPP });
    expect(e.reply).toEqual({ src: B, dst: A, sport: 80, dport: 40000, proto: TCPP });
    // Established but tracking windows: queued for the agent, not admitted.
    expect(admit()).toBe('CT_PENDING');
    expect(s.ct_pending.lookupElem({ saddr: A, daddr: B, sport: 40000, dport: 80, protocol: TCPP })).toBeDefined();
    expect(ct.makeLiberal({ src: '10.244.2.3', dst: '10.244.1.2', sport: 80, dport: 40000, proto: TCPP })).toBe(true);
    expect(admit()).toBe(CT_ADMIT);
    expect(ctAdmit(s, envOf(ct), hdrs(TCPP, 80, 40000), B, A, CT_CURRENT_NETNS, 0, NatSide.NONE, newCtTo())).toBe(CT_ADMIT);
    // A SYN, FIN or RST never takes the fast path; after a FIN the entry is closing.
    expect(ctAdmit(s, envOf(ct), hdrs(TCPP, 40000, 80, TCP_FIN | TCP_ACK), A, B, CT_CURRENT_NETNS, 0, NatSide.NONE, newCtTo())).toBe('CT_REFUSED');
    expect(cross(ct, B, A, 80, 40000, TCPP, TCP_FIN | TCP_ACK)).toBe(CT_ESTABLISHED);
    expect(ct.lookup({ src: A, dst: B, sport: 40000, dport: 80, proto: TCPP })!.tcpState).toBe(TCP.CLOSE_WAIT);
    // The admission is cached for 200 ms (ct_admitted), then looked up again.
    ct.now += Number(CT_RECHECK_NS) - 1;
    expect(admit()).toBe(CT_ADMIT);
    ct.now += 1;
    expect(admit()).toBe('CT_REFUSED');
    expect(ct.makeLiberal({ src: '10.244.9.9', dst: '10.244.1.2', sport: 80, dport: 40000, proto: TCPP })).toBe(false);
  });

  it('what the state table calls invalid: a SYN-ACK or FIN without an entry, an ACK to a SYN not answered', () => {
    const ct = new HostConntrack();
    expect(cross(ct, B, A, 80, 40000, TCPP, TCP_SYN | TCP_ACK)).toBe(CT_INVALID);
    expect(cross(ct, B, A, 80, 40000, TCPP, TCP_FIN | TCP_ACK)).toBe(CT_INVALID);
    expect(ct.size).toBe(0);
    expect(cross(ct, A, B, 40000, 80, TCPP, TCP_SYN)).toBe(CT_NEW);
    expect(cross(ct, A, B, 40000, 80, TCPP, TCP_ACK)).toBe(CT_INVALID);
    // ICMP: an echo reply without its request.
    expect(ct.track(B, A, 7, 0, 1, 0, 0)).toBe(CT_INVALID);
  });

  it('a TCP flow picked up mid-stream is ESTABLISHED and liberal at once, and NEW for the rules', () => {
    const ct = new HostConntrack();
    const s = emptyState(MAX_ENTRIES.test);
    expect(cross(ct, A, B, 40000, 80, TCPP, PA)).toBe(CT_NEW);
    // No reply seen yet: established, liberal (windows unknown); the check asks for no more.
    expect(ctAdmit(s, envOf(ct), hdrs(TCPP, 40000, 80), A, B, CT_CURRENT_NETNS, 0, NatSide.NONE, newCtTo())).toBe(CT_ADMIT);
    expect(cross(ct, B, A, 80, 40000, TCPP, PA)).toBe(CT_ESTABLISHED);
  });

  it('UDP: unreplied 30 s, replied 30 s for its first 2 s, then 120 s; admitted once a reply was seen', () => {
    const ct = new HostConntrack();
    const s = emptyState(MAX_ENTRIES.test);
    const S = 1e9;
    const admit = () => ctAdmit(s, envOf(ct), hdrs(UDPP, 5000, 53), A, B, CT_CURRENT_NETNS, 0, NatSide.NONE, newCtTo());
    ct.now = 0;
    expect(cross(ct, A, B, 5000, 53, UDPP, 0)).toBe(CT_NEW);
    expect(admit()).toBe('CT_REFUSED');
    ct.now = 29.9 * S;
    expect(cross(ct, A, B, 5000, 53, UDPP, 0)).toBe(CT_NEW);
    ct.now = 59.8 * S;
    expect(admit()).toBe('CT_REFUSED');
    expect(ct.size).toBe(1);
    ct.now = 59.9 * S;
    // Past 30 s without a packet: gone.
    expect(admit()).toBe('CT_REFUSED');
    expect(ct.size).toBe(0);
    expect(cross(ct, A, B, 5000, 53, UDPP, 0)).toBe(CT_NEW);
    ct.now += 1 * S;
    expect(cross(ct, B, A, 53, 5000, UDPP, 0)).toBe(CT_ESTABLISHED);
    expect(admit()).toBe(CT_ADMIT);
    // Within its first 2 s a replied entry still lives 30 s from its last packet.
    ct.now += 0.5 * S;
    expect(cross(ct, A, B, 5000, 53, UDPP, 0)).toBe(CT_ESTABLISHED);
    ct.now += 30.1 * S;
    expect(admit()).toBe('CT_REFUSED');
    // A stream: older than 2 s when a packet comes, then 120 s.
    expect(cross(ct, A, B, 5000, 53, UDPP, 0)).toBe(CT_NEW);
    ct.now += 0.1 * S;
    cross(ct, B, A, 53, 5000, UDPP, 0);
    ct.now += 2 * S;
    cross(ct, A, B, 5000, 53, UDPP, 0);
    ct.now += 119 * S;
    expect(admit()).toBe(CT_ADMIT);
    ct.now += 1.1 * S;
    expect(admit()).toBe('CT_REFUSED');
  });

  it('a DNAT: the reply tuple is the backend\'s, either tuple finds the entry, and the check leaves it to the stack', () => {
    const ct = new HostConntrack();
    const s = emptyState(MAX_ENTRIES.test);
    expect(ct.track(A, VIP, 40000, 80, TCPP, TCP_SYN, 0)).toBe(CT_NEW);
    ct.dnat(B, 8080);
    expect(ct.isDnat()).toBe(true);
    ct.confirm();
    expect(ct.word(3) >>> 0).toBe(B);
    expect(ct.word(5) >>> 16).toBe(8080);
    const e = ct.lookup({ src: B, dst: A, sport: 8080, dport: 40000, proto: TCPP })!;
    expect(e.status & IPS_DST_NAT).toBe(IPS_DST_NAT);
    expect(ct.track(B, A, 8080, 40000, TCPP, TCP_SYN | TCP_ACK, 0)).toBe(CT_ESTABLISHED);
    expect(ct.dir).toBe(1);
    expect(cross(ct, A, VIP, 40000, 80, TCPP, TCP_ACK)).toBe(CT_ESTABLISHED);
    ct.makeLiberal({ src: '10.244.1.2', dst: '10.96.0.10', sport: 40000, dport: 80, proto: TCPP });
    // restore gives the backend's reply the Service's address back; masq takes a request to the backend.
    const to = newCtTo();
    expect(ctAdmit(s, envOf(ct), hdrs(TCPP, 8080, 40000), B, A, CT_CURRENT_NETNS, 0, NatSide.SRC, to)).toBe(CT_ADMIT);
    expect(to).toEqual({ saddr: VIP, sport: 80, daddr: A, dport: 40000 });
    expect(ctAdmit(s, envOf(ct), hdrs(TCPP, 40000, 80), A, VIP, CT_CURRENT_NETNS, 0, NatSide.DST, to)).toBe(CT_ADMIT);
    expect(to).toEqual({ saddr: A, sport: 40000, daddr: B, dport: 8080 });
    // Neither carries the other's NAT, nor a flow that must leave as it is.
    expect(ctAdmit(s, envOf(ct), hdrs(TCPP, 40000, 80), A, VIP, CT_CURRENT_NETNS, 0, NatSide.SRC, to)).toBe('CT_NAT');
    expect(ctAdmit(s, envOf(ct), hdrs(TCPP, 8080, 40000), B, A, CT_CURRENT_NETNS, 0, NatSide.NONE, to)).toBe('CT_NAT');
  });

  it('the table agrees with a plain model of UDP entries through both directions, expiries, slot reuse and growth', () => {
    // UDP entries live 300 ns (stream: 1.2 µs after 20 ns): a few hundred at a time, past the first sizes of the table.
    const t = scaledTimeouts(1e-8);
    fc.assert(fc.property(fc.array(fc.record({ flow: fc.nat(600), gap: fc.nat(4), fromA: fc.boolean() }), { minLength: 1000, maxLength: 3000 }), (ops) => {
      const ct = new HostConntrack(t);
      const model = new Map<number, { until: number; origA: boolean; seen: boolean; born: number }>();
      let now = 0;
      const ends = (flow: number) => [0x0a000000 + flow, 0x0b000000 + (flow >> 3), 1000 + flow, 53] as const;
      for (const { flow, gap, fromA } of ops) {
        now += gap;
        ct.now = now;
        const [a, b, pa, pb] = ends(flow);
        const st = fromA ? cross(ct, a, b, pa, pb, UDPP, 0) : cross(ct, b, a, pb, pa, UDPP, 0);
        let m = model.get(flow);
        if (m && m.until <= now) m = undefined;
        let want: number;
        if (!m) {
          want = CT_NEW;
          model.set(flow, { until: now + t.udp, origA: fromA, seen: false, born: now });
        } else {
          const reply = fromA !== m.origA;
          want = reply || m.seen ? CT_ESTABLISHED : CT_NEW;
          m.until = now + (m.seen && now > m.born + t.udpStreamAfter ? t.udpStream : t.udp);
          if (reply) m.seen = true;
        }
        expect(st).toBe(want);
      }
      let live = 0;
      for (const [flow, m] of model) {
        const [a, b, pa, pb] = ends(flow);
        const e = ct.lookup({ src: b, dst: a, sport: pb, dport: pa, proto: UDPP });
        expect(e !== undefined).toBe(m.until > now);
        if (e) {
          live++;
          expect(e.orig.src).toBe(m.origA ? a : b);
          expect((e.status & IPS_SEEN_REPLY) !== 0).toBe(m.seen);
        }
      }
      expect(ct.size).toBeGreaterThanOrEqual(live);
    }), { numRuns: 100 });
  });

  it('Linux\'s timeouts by default: an established TCP entry lives 5 days, UDP 30 s', () => {
    expect(LINUX_CT_TIMEOUTS.tcpEstablished).toBe(432000e9);
    expect(LINUX_CT_TIMEOUTS.udp).toBe(30e9);
    expect(LINUX_CT_TIMEOUTS.udpStream).toBe(120e9);
  });
});

describe('sim/cluster NAT rewrite and TCP flags', () => {
  const proto = fc.constantFrom('tcp' as const, 'udp' as const);
  const ip = fc.nat(0xffffffff);
  const port = fc.integer({ min: 1, max: 65535 });

  it('natRewrite gives the frame a recomputation gives, checksums included', () => {
    fc.assert(fc.property(proto, ip, ip, ip, port, port, port, fc.boolean(), (p, src, dst, to, sport, dport, toPort, which) => {
      const f = Buffer.from(buildTemplate(src, dst, p, sport, dport, 0, false, true, 9).frame);
      // The address as the model's word: its bytes as a little-endian u32.
      const word = Buffer.alloc(4);
      word.writeUInt32BE(to >>> 0);
      const w = word.readUInt32LE(0);
      if (which) natRewrite(f, 14 + 16, 34 + 2, w, toPort);
      else natRewrite(f, 14 + 12, 34, w, toPort);
      const want = which ? buildTemplate(src, to, p, sport, toPort, 0, false, true, 9) : buildTemplate(to, dst, p, toPort, dport, 0, false, true, 9);
      expect(ipHeaderValid(f, 14)).toBe(true);
      expect(verifyL4(f, 14)).toBe(true);
      expect(f.equals(want.frame)).toBe(true);
    }), { numRuns: 500 });
    expect(ipToU32('10.96.0.10')).toBe(0x0a60000a);
  });

  it('a TCP template with other flags is the template built with them, checksum included', () => {
    fc.assert(fc.property(ip, ip, port, port, fc.constantFrom(FLAGS_SYN, FLAGS_SYNACK, FLAGS_FINACK), (src, dst, sport, dport, flags) => {
      const t = buildTemplate(src, dst, 'tcp', sport, dport, 0, false, true, 5);
      const v = withTcpFlags(t, flags);
      expect(v.frame[47]).toBe(flags);
      expect(verifyL4(v.frame, 14)).toBe(true);
      const again = Buffer.from(t.frame);
      again[47] = flags;
      expect(v.frame.subarray(0, 50).equals(again.subarray(0, 50))).toBe(true);
      expect(v.frame.subarray(52).equals(again.subarray(52))).toBe(true);
    }), { numRuns: 500 });
  });
});
