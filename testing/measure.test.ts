/**
 * The measuring helpers the demo and the rpeer bench share (testing/measure.ts) that
 * need no lab: the median and sockperf's figures.
 */
import { describe, expect, it } from 'vitest';
import { machine, median, parseSockperf } from './measure.ts';

describe('measure', () => {
  it('takes the median of odd and even counts, and refuses none', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 2, 3])).toBe(2.5);
    expect(() => median([])).toThrow(/median of nothing/);
  });

  it('names the machine: a CPU, at least one core, the running kernel', () => {
    const m = machine();
    expect(m.cpu).not.toBe('');
    expect(m.cores).toBeGreaterThan(0);
    expect(m.kernel).toMatch(/^\d+\.\d+/);
  });

  it('reads sockperf 3.7\'s ping-pong output; a run without figures is an error naming it', () => {
    // Captured from sockperf 3.7 (Debian 12) over TCP on loopback, colours and all.
    const out = [
      'sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=73086; ReceivedMessages=73085',
      'sockperf: ========= Printing statistics for Server No: 0',
      'sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=56880; ReceivedMessages=56880',
      'sockperf: \x1b[2;35m====> avg-latency=13.596 (std-dev=12.108)\x1b[0m',
      'sockperf: Summary: Latency is 13.596 usec',
      'sockperf: \x1b[2;35mTotal 56880 observations\x1b[0m; each percentile contains 568.80 observations',
      'sockperf: ---> <MAX> observation = 1058.602',
      'sockperf: ---> percentile 99.999 = 1007.110',
      'sockperf: ---> percentile 99.000 =   27.912',
      'sockperf: ---> percentile 90.000 =   14.141',
      'sockperf: ---> percentile 50.000 =   12.949',
      'sockperf: ---> <MIN> observation =    9.537',
    ].join('\n');
    const r = parseSockperf(out, 0, 'sockperf to x');
    expect(r.tps).toBeCloseTo(56880 / 1.55, 6);
    expect(r.p50).toBe(12.949);
    expect(r.p99).toBe(27.912);
    expect(r.total).toBe(73085);
    expect(() => parseSockperf('sockperf: ERROR: Failed to connect', 255, 'sockperf to 10.244.2.2 (xmasq)')).toThrow(/sockperf to 10\.244\.2\.2 \(xmasq\) exited 255 without its figures: sockperf: ERROR/);
    expect(() => parseSockperf(out, 1, 'sockperf to x')).toThrow(/exited 1/);
  });
});
