/**
 * Expiry compares last_seen stamps as two 32-bit words against a bound made
 * once per scan (caches.ts stampBound): it must decide exactly what the
 * BigInt rule `now - last_seen > idle` decides, for every u64 stamp,
 * including where a double could not tell two stamps apart.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { path } from '../maps.ts';
import { stampBelow, stampBound } from './caches.ts';

const U64_MAX = (1n << 64n) - 1n;
const LAST_SEEN = path.field('last_seen').offset;

/** A path value holding only the stamp, written as the kernel's bytes, read as the scans read it: 32-bit words. */
function valueWith(lastSeen: bigint): Uint32Array {
  const v = new Uint32Array(path.size / 4);
  Buffer.from(v.buffer).writeBigUInt64LE(lastSeen, LAST_SEEN);
  return v;
}

/** The rule as the agent states it, in BigInt arithmetic. */
const idle = (now: bigint, lastSeen: bigint, idleNs: bigint) => now - lastSeen > idleNs;

const check = (now: bigint, lastSeen: bigint, idleNs: bigint) =>
  expect(stampBelow(valueWith(lastSeen), 0, stampBound(now, idleNs)), `now ${now}, last_seen ${lastSeen}, idle ${idleNs}`).toBe(idle(now, lastSeen, idleNs));

describe('agent expiry: last_seen against a scan bound', () => {
  it('decides as now - last_seen > idle at the edges: one ns either side, word carries, past 2^53', () => {
    const idles = [0n, 1n, 20_000_000_000n, 0xffffffffn, 1n << 32n, U64_MAX];
    const bounds = [0n, 1n, 0xffffffffn, 1n << 32n, (1n << 32n) + 1n, (1n << 53n) + 1n, (1n << 63n) + 12_345n, U64_MAX - 1n, U64_MAX];
    let cases = 0;
    for (const idleNs of idles) {
      for (const b of bounds) {
        // The clock at which b is exactly the oldest stamp still fresh; stamps around it.
        const now = b + idleNs;
        for (const d of [-2n, -1n, 0n, 1n, 2n]) {
          const lastSeen = b + d;
          if (lastSeen < 0n || lastSeen > U64_MAX) continue;
          check(now, lastSeen, idleNs);
          cases++;
        }
      }
    }
    expect(cases).toBeGreaterThan(200);
    // A bound below 0 (the clock younger than the limit): nothing is idle, the oldest stamp neither.
    check(5n, 0n, 10n);
    // A bound above every u64 (a clock past 2^64 + idle): everything is, the newest stamp too.
    check(U64_MAX + 100n, U64_MAX, 1n);
    // A stamp newer than the clock (refreshed since the clock was read) is fresh.
    check(100n, 200n, 10n);
  });

  it('decides as now - last_seen > idle for any stamp, clock and limit', () => {
    const u64 = fc.bigInt({ min: 0n, max: U64_MAX });
    fc.assert(fc.property(u64, u64, fc.bigInt({ min: 0n, max: (1n << 65n) }), (lastSeen, idleNs, now) => {
      check(now, lastSeen, idleNs);
    }), { numRuns: 5000 });
    // Stamps within a few ns of the bound, where the two words decide.
    fc.assert(fc.property(u64, u64, fc.bigInt({ min: -3n, max: 3n }), (b, idleNs, d) => {
      const lastSeen = b + d;
      fc.pre(lastSeen >= 0n && lastSeen <= U64_MAX);
      check(b + idleNs, lastSeen, idleNs);
    }), { numRuns: 5000 });
  });
});
