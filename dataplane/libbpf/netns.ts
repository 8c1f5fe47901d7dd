/** Running libbpf calls (netlink, test_run ifindex lookups) inside another network namespace. */
import { closeSync, openSync } from 'node:fs';
import koffi from 'koffi';
import { errnoName, LibbpfError } from './errors.ts';
import { native } from './native.ts';

const CLONE_NEWNET = 0x40000000;

/**
 * Runs fn with the calling thread in the network namespace at nsPath (e.g.
 * /run/netns/NAME), then moves it back. libbpf's netlink sockets and
 * test_run's ifindex lookups follow the thread's namespace. fn must be
 * synchronous: across an await other code would run in the wrong namespace.
 */
export function withNetns<T>(nsPath: string, fn: () => T): T {
  const n = native();
  // thread-self, not self: setns moves one thread, and this may be a worker.
  const home = openSync('/proc/thread-self/ns/net', 'r');
  let target: number | undefined;
  try {
    target = openSync(nsPath, 'r');
    if (n.setns(target, CLONE_NEWNET) !== 0) {
      throw new LibbpfError(`entering network namespace ${nsPath}`, koffi.errno(), 'is it a netns file, and are you root?');
    }
    try {
      const r = fn();
      if (r && typeof (r as { then?: unknown }).then === 'function') {
        throw new Error('withNetns: fn returned a promise; it must be synchronous');
      }
      return r;
    } finally {
      if (n.setns(home, CLONE_NEWNET) !== 0) {
        // Staying in the wrong namespace would silently send every later
        // netlink call and socket there; better to stop the process.
        const err = errnoName(koffi.errno());
        process.stderr.write(`fatal: cannot return to the original network namespace (${err})\n`);
        process.abort();
      }
    }
  } finally {
    if (target !== undefined) closeSync(target);
    closeSync(home);
  }
}
