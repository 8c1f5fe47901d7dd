/**
 * The libc calls the agent needs beside libbpf: the coarse monotonic clock
 * the programs stamp entries with, and interface name <-> index lookups that
 * follow the calling thread's network namespace.
 */
import koffi from 'koffi';

interface Native {
  clock_gettime(clk: number, ts: Buffer): number;
  if_nametoindex(name: string): number;
  if_indextoname(index: number, buf: Buffer): string | null;
}

let cache: Native | undefined;

function native(): Native {
  if (cache) return cache;
  const libc = koffi.load('libc.so.6');
  cache = {
    clock_gettime: libc.func('int clock_gettime(int clk, void *ts)'),
    if_nametoindex: libc.func('unsigned int if_nametoindex(const char *name)'),
    if_indextoname: libc.func('const char *if_indextoname(unsigned int index, void *buf)'),
  } as unknown as Native;
  return cache;
}

const CLOCK_MONOTONIC_COARSE = 6;

/**
 * Now, on the clock the programs write into path.last_seen (bpf/maps.h
 * xmasq_now): bpf_ktime_get_coarse_ns() reads the same coarse monotonic time
 * that CLOCK_MONOTONIC_COARSE gives user space, and the clock map the agent
 * calibrates (clock.ts) keeps jiffies within a tick or so of it.
 * process.hrtime() reads CLOCK_MONOTONIC, which runs up to one tick ahead;
 * the same clock means a fresh entry never looks idle, and costs one vDSO call.
 */
export function monotonicCoarseNs(): bigint {
  const ts = Buffer.alloc(16);
  if (native().clock_gettime(CLOCK_MONOTONIC_COARSE, ts) !== 0) {
    throw new Error('clock_gettime(CLOCK_MONOTONIC_COARSE) failed');
  }
  return ts.readBigInt64LE(0) * 1_000_000_000n + ts.readBigInt64LE(8);
}

/**
 * The ifindex of a device in the calling thread's network namespace, or 0.
 * /sys/class/net would show the namespace sysfs was mounted in, which under
 * `nsenter --net` is not ours.
 */
export function ifNameToIndex(name: string): number {
  if (name.length === 0 || name.length > 15) return 0;
  return native().if_nametoindex(name);
}

/** The device name of an ifindex in the calling thread's network namespace, or undefined. */
export function ifIndexToName(index: number): string | undefined {
  if (!Number.isInteger(index) || index <= 0 || index > 0xffffffff) return undefined;
  const buf = Buffer.alloc(16); // IF_NAMESIZE
  const r = native().if_indextoname(index, buf);
  return r ?? undefined;
}
