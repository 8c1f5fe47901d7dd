/**
 * What runs on a device's TC hook, whichever way it sits there: tcx links
 * (run first, in their order), then cls_bpf filters (by priority). For the
 * suites that check what an agent attached or left behind: `tc filter show`
 * sees no tcx link, and Debian 12's bpftool 7.1 lists tcx links without
 * their device.
 */
import { execFileSync } from 'node:child_process';
import { haveTcx, tcxQuery, withNetns } from '../dataplane/libbpf.ts';

export type HookKind = 'tcx' | 'cls_bpf';
export interface HookProgram {
  name: string;
  id: number;
  kind: HookKind;
}

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const inNs = (netns: string, cmd: string, args: string[]) => sh('nsenter', [`--net=${netns}`, cmd, ...args]);

/** netns: a path (/run/netns/NAME) or a name under /run/netns. */
export function hookPrograms(netns: string, dev: string, where: 'ingress' | 'egress'): HookProgram[] {
  const ns = netns.startsWith('/') ? netns : `/run/netns/${netns}`;
  let ifindex: number;
  try {
    ifindex = (JSON.parse(inNs(ns, 'ip', ['-j', 'link', 'show', 'dev', dev])) as Array<{ ifindex: number }>)[0].ifindex;
  } catch {
    return []; // no such device: nothing on its hooks
  }
  const out: HookProgram[] = [];
  if (haveTcx()) {
    for (const id of withNetns(ns, () => tcxQuery(ifindex, where))) {
      const info = JSON.parse(sh('bpftool', ['-j', 'prog', 'show', 'id', String(id)])) as { name?: string };
      out.push({ name: info.name ?? `id ${id}`, id, kind: 'tcx' });
    }
  }
  let filters = '';
  try {
    filters = inNs(ns, 'tc', ['-j', 'filter', 'show', 'dev', dev, where]);
  } catch {
    // no clsact qdisc: no filters
  }
  for (const f of (filters.trim() ? JSON.parse(filters) : []) as Array<{ options?: { prog?: { name?: string; id?: number } } }>) {
    if (f.options?.prog) out.push({ name: f.options.prog.name ?? '?', id: f.options.prog.id ?? 0, kind: 'cls_bpf' });
  }
  return out;
}

/** The names of the programs on the hook, in the order they run, whichever way each sits there. */
export function hookNames(netns: string, dev: string, where: 'ingress' | 'egress'): string[] {
  return hookPrograms(netns, dev, where).map((p) => p.name);
}
