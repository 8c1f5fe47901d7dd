/**
 * hostNetnsSeenFrom, what the agent records in pod_info for masq_rpeer: the id a
 * pod's namespace gives the agent's (the one the kernel already gave it through a
 * veth, or a new one assigned there) and the agent namespace's inode.
 */
import { execFileSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { hostNetnsSeenFrom } from './netlink.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, RTM_NEWNSID');

const tag = `xnl${process.pid % 100000}`;
const made: string[] = [];
const ip = (...args: string[]) => execFileSync('ip', args, { encoding: 'utf8' });
function netns(suffix: string): string {
  const name = `${tag}-${suffix}`;
  ip('netns', 'add', name);
  made.push(name);
  return name;
}

afterAll(() => {
  for (const n of made) execFileSync('ip', ['netns', 'del', n], { stdio: 'ignore' });
  try {
    execFileSync('ip', ['link', 'del', `${tag}h`], { stdio: 'ignore' });
  } catch {
    // gone with its peer's namespace
  }
});

describe('hostNetnsSeenFrom', () => {
  it('takes the id a veth already gave this namespace in the pod\'s, and this namespace\'s inode', () => {
    const pod = netns('veth');
    ip('link', 'add', `${tag}h`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', pod);
    const [link] = JSON.parse(ip('-n', pod, '-j', '-d', 'link', 'show', 'eth0')) as { link_netnsid?: number }[];
    expect(link.link_netnsid).toBeGreaterThanOrEqual(0);
    expect(hostNetnsSeenFrom(`/run/netns/${pod}`)).toEqual({ host_netns_id: link.link_netnsid, host_netns_ino: statSync('/proc/self/ns/net').ino });
  });

  it('assigns one in a namespace that has none, and gives the same one again', () => {
    const pod = netns('bare');
    const ids = () => JSON.parse(ip('-n', pod, '-j', 'netns', 'list-id') || '[]') as { nsid: number }[];
    expect(ids()).toEqual([]);
    const first = hostNetnsSeenFrom(`/run/netns/${pod}`);
    expect(first.host_netns_id).toBeGreaterThanOrEqual(0);
    expect(ids().map((x) => x.nsid)).toEqual([first.host_netns_id]);
    expect(hostNetnsSeenFrom(`/run/netns/${pod}`)).toEqual(first);
  });

  it('names the namespace it could not enter', () => {
    expect(() => hostNetnsSeenFrom(`/run/netns/${tag}-absent`)).toThrow(`${tag}-absent`);
  });
});
