/**
 * Small network-namespace plumbing for the guest suites that do not need the whole
 * lab: named namespaces, interface counters, and the objects built by vm-tests/bpf.
 */
import { fileURLToPath } from 'node:url';
import { mustRun, mustRunIn, run } from '../../testing/command.ts';

/** vm-tests/build/, where vm-tests/bpf/Makefile puts abi.bpf.o and rpeer_probe.bpf.o. */
export const VM_BUILD = fileURLToPath(new URL('../build/', import.meta.url));

/** Creates a netns with lo up and IPv6 off, so that no router solicitation or DAD packet moves a counter. */
export async function addNetns(name: string): Promise<void> {
  await mustRun('ip', ['netns', 'add', name], { what: `creating netns ${name}` });
  await mustRunIn(name, 'sysctl', ['-q', '-w', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1'], { what: `sysctls of ${name}` });
  await mustRun('ip', ['-n', name, 'link', 'set', 'lo', 'up'], { what: `lo up in ${name}` });
}

export async function deleteNetns(name: string): Promise<void> {
  await run('ip', ['netns', 'delete', name]);
}

/** `ip -n netns ...` lines in one batch. */
export async function ipBatch(netns: string, lines: string[], what: string): Promise<void> {
  await mustRun('ip', ['-n', netns, '-batch', '-'], { input: lines.join('\n') + '\n', what });
}

interface IpLinkStats {
  ifindex: number;
  ifname: string;
  address: string;
  stats64: { rx: { packets: number }; tx: { packets: number } };
}

export async function link(netns: string, dev: string): Promise<IpLinkStats> {
  const r = await mustRun('ip', ['-n', netns, '-s', '-j', 'link', 'show', 'dev', dev], { what: `reading ${dev} in ${netns}` });
  const l = (JSON.parse(r.stdout) as IpLinkStats[])[0];
  if (!l) throw new Error(`no link ${dev} in netns ${netns}`);
  return l;
}

export async function ifindex(netns: string, dev: string): Promise<number> {
  return (await link(netns, dev)).ifindex;
}

/** Packets received (rx) or sent (tx) by each device of a list, as "netns/dev" -> count. */
export async function counters(devs: Array<[string, string]>, dir: 'rx' | 'tx'): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const [ns, dev] of devs) out[`${ns}/${dev}`] = (await link(ns, dev)).stats64[dir].packets;
  return out;
}

/** What each counter gained since `before`. */
export function gained(before: Record<string, number>, after: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.keys(before).map((k) => [k, after[k] - before[k]]));
}
