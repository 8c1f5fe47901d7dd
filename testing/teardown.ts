/**
 * What a root suite leaves behind, removed at its end whether or not it got as far as
 * making it: its network namespaces and its bpffs pin directory.
 */
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { unpinAll } from '../dataplane/agent/datapath.ts';

/** Deletes each network namespace; one never made, or gone already, is no error. */
export function deleteNetns(names: Iterable<string>): void {
  for (const ns of names) {
    try {
      execFileSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
    } catch {
      // never made, or gone already
    }
  }
}

/** Unpins XMasq's maps in dir as the agent would, then removes dir with anything else a test pinned there. */
export function removePins(dir: string): void {
  try {
    unpinAll(dir);
  } catch {
    // nothing pinned, or a pin unpinAll cannot remove: rmSync takes what is left
  }
  rmSync(dir, { recursive: true, force: true });
}
