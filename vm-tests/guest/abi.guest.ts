/**
 * The patch moves no helper id: vm-tests/bpf/abi.bpf.c, built against the machine's
 * stock headers, calls helpers late in the uapi list (ids 155 to 208) by the numbers
 * those headers give; it must load and each call must give what only that helper gives.
 */
import { describe, expect, it } from 'vitest';
import { BpfObject, skbCtx } from '../../dataplane/libbpf.ts';
import { buildFrame } from '../../testing/packet/build.ts';
import { VM_BUILD } from './netns.ts';

const R = ['LOOP_RET', 'LOOP_COUNT', 'STRNCMP_EQ', 'STRNCMP_GT', 'PEER_BAD_FLAGS', 'PEER_OK', 'TSTAMP_RET', 'TSTAMP',
  'TSTAMP_BAD_TYPE', 'TAI_NS', 'MONO_NS'] as const;
const TC_ACT_OK = 0, TC_ACT_SHOT = 2, TC_ACT_REDIRECT = 7, EINVAL = 22;

describe('helper numbering on the patched kernel', () => {
  it('a program built against stock headers, using helpers with late ids, loads and each call does what its id names', () => {
    const obj = BpfObject.open(`${VM_BUILD}abi.bpf.o`);
    try {
      obj.load();
      const frame = buildFrame({ ipv4: { src: '10.0.0.1', dst: '10.0.0.2', l4: { udp: { sport: 1000, dport: 2000, payload: Buffer.from('abi') } } } });
      const before = BigInt(Date.now()) * 1_000_000n;
      const run = obj.program('abi').testRun({ data: frame, ctx: skbCtx() });
      expect(run.retval).toBe(TC_ACT_OK);
      const results = obj.map('results');
      const got: Record<string, bigint> = {};
      R.forEach((name, i) => {
        const k = Buffer.alloc(4);
        k.writeUInt32LE(i);
        got[name] = results.lookup(k)!.readBigInt64LE(0);
      });
      expect(got.LOOP_RET).toBe(7n); // bpf_loop: iterations done
      expect(got.LOOP_COUNT).toBe(7n);
      expect(got.STRNCMP_EQ).toBe(0n); // bpf_strncmp
      expect(got.STRNCMP_GT > 0n).toBe(true);
      expect(got.PEER_BAD_FLAGS).toBe(BigInt(TC_ACT_SHOT)); // bpf_redirect_peer refuses flags
      expect(got.PEER_OK).toBe(BigInt(TC_ACT_REDIRECT));
      expect(got.TSTAMP_RET).toBe(0n); // bpf_skb_set_tstamp
      expect(got.TSTAMP).toBe(12345n);
      expect(got.TSTAMP_BAD_TYPE).toBe(BigInt(-EINVAL));
      // bpf_ktime_get_tai_ns is the wall clock plus the TAI offset (0 to 37 s);
      // bpf_ktime_get_ns counts from boot.
      const taiSkew = Number(got.TAI_NS - before) / 1e9;
      expect(taiSkew, `TAI - wall clock = ${taiSkew} s`).toBeGreaterThan(-5);
      expect(taiSkew).toBeLessThan(60);
      expect(got.MONO_NS < before / 2n).toBe(true);
    } finally {
      obj.close();
    }
  });
});
