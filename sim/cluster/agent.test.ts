/**
 * The simulated agent runs the real agent's expiry and purge (caches.ts) on
 * the model's tables through ModelMapView: these check that the view gives
 * them what a kernel map would.
 */
import { describe, expect, it } from 'vitest';
import { MAX_ENTRIES, egressKey, path } from '../../dataplane/maps.ts';
import { emptyPath, emptyState } from '../model/index.ts';
import { SimAgent } from './agent.ts';

const T = { egressIdleNs: 10, ingressIdleNs: 20, scanIntervalNs: 1 };

function state() {
  const s = emptyState(MAX_ENTRIES.test);
  const add = (local: string, remote: string, host: string, key: number, lastSeen: bigint) => {
    s.egress_cache.update({ local_pod: local, remote_pod: remote }, { ...emptyPath(), local_ip: '172.31.250.1', remote_ip: host, local_key: key, remote_key: 5, remote_ready: 1, last_seen: lastSeen });
    s.ingress_cache.update({ remote_host: host, key }, { ...emptyPath(), local_ip: local, remote_ip: remote, local_key: key, ifindex: 7, last_seen: lastSeen });
  };
  add('10.244.1.2', '10.244.2.2', '172.31.250.2', 1, 100n);
  add('10.244.1.3', '10.244.2.2', '172.31.250.2', 2, 100n);
  return s;
}

describe('sim/cluster agent on model maps', () => {
  it('pod delete purges exactly the entries of that pod, and pod_info', () => {
    const s = state();
    const a = new SimAgent(s, T);
    a.addPod('10.244.1.2', '0a:58:00:00:00:01', 10, 100n);
    a.delPod('10.244.1.2', 150n);
    expect(s.pod_info.lookup('10.244.1.2')).toBeUndefined();
    expect(s.egress_cache.entries().map(([k]) => k.local_pod)).toEqual(['10.244.1.3']);
    // The deleted pod's key stays taken as a tombstone (ifindex 0), stamped at the delete.
    const ingress = s.ingress_cache.entries().map(([k, v]) => [k.key, v.local_ip, v.ifindex, v.last_seen]);
    expect(ingress).toEqual([[1, '10.244.1.2', 0, 150n], [2, '10.244.1.3', 7, 100n]]);
  });

  it('the planted fault leaves them behind', () => {
    const s = state();
    new SimAgent(s, T, { noPurgeOnDelete: true }).delPod('10.244.1.2', 150n);
    expect(s.egress_cache.size).toBe(2);
  });

  it('expiry keeps fresh entries and deletes idle ones', () => {
    const s = state();
    const a = new SimAgent(s, T);
    expect(a.scan(105n).egress.deleted).toBe(0);
    s.egress_cache.lookup({ local_pod: '10.244.1.3', remote_pod: '10.244.2.2' })!.last_seen = 200n;
    s.ingress_cache.lookup({ remote_host: '172.31.250.2', key: 2 })!.last_seen = 200n;
    const r = a.scan(205n);
    expect(r.egress.deleted).toBe(1);
    expect(r.ingress.deleted).toBe(1);
    expect(s.egress_cache.entries().map(([k]) => k.local_pod)).toEqual(['10.244.1.3']);
  });

  it('expiry decides to the nanosecond where a double cannot (stamps past 2^63)', () => {
    const now = (1n << 63n) + 12_345n;
    const s = state();
    const stamp = (key: number, egress: bigint, ingress: bigint) => {
      s.egress_cache.lookup({ local_pod: `10.244.1.${key + 1}`, remote_pod: '10.244.2.2' })!.last_seen = now - egress;
      s.ingress_cache.lookup({ remote_host: '172.31.250.2', key })!.last_seen = now - ingress;
    };
    // Egress idle 10: 10 ns idle stays (its peer answered 10 ns ago), 11 goes; ingress idle 20: 20 stays.
    stamp(1, 10n, 10n);
    stamp(2, 11n, 20n);
    const a = new SimAgent(s, T);
    let r = a.scan(now);
    expect([r.egress.deleted, r.egress.unanswered, r.ingress.deleted]).toEqual([1, 0, 0]);
    expect(s.egress_cache.entries().map(([k]) => k.local_pod)).toEqual(['10.244.1.2']);
    // The peer's answer 11 ns old is one ns too old: unanswered. The ingress entry 21 ns idle goes.
    stamp(1, 0n, 11n);
    s.ingress_cache.lookup({ remote_host: '172.31.250.2', key: 2 })!.last_seen = now - 21n;
    r = a.scan(now);
    expect([r.egress.deleted, r.egress.unanswered, r.ingress.deleted]).toEqual([1, 1, 1]);
    expect(s.ingress_cache.entries().map(([k]) => k.key)).toEqual([1]);
  });

  it('a batch read gives the values as of the read, a clone its own', () => {
    const s = state();
    const key = { local_pod: '10.244.1.2', remote_pod: '10.244.2.2' };
    const bytes = () => s.egress_cache.entriesBytes().map(([k, v]) => [k.toString('hex'), v.toString('hex')]);
    const first = bytes();
    expect(first).toEqual(s.egress_cache.entries().map(([k, v]) => [egressKey.encode(k).toString('hex'), path.encode(v).toString('hex')]));
    // The programs write values in place; the next batch has what they wrote, as a fresh lookup does.
    s.egress_cache.lookup(key)!.last_seen = 0x1_0000_0001n;
    s.egress_cache.lookup(key)!.remote_mac = '02:00:00:00:00:09';
    const copy = s.egress_cache.clone();
    const second = bytes();
    expect(second).not.toEqual(first);
    expect(second).toEqual(s.egress_cache.entries().map(([k, v]) => [egressKey.encode(k).toString('hex'), path.encode(v).toString('hex')]));
    expect(second[0][1]).toBe(s.egress_cache.lookupBytes(egressKey.encode(key))!.toString('hex'));
    // A clone's batch buffers are not the original's: a scan of one leaves the other's bytes alone.
    const [[, held]] = copy.entriesBytes();
    s.egress_cache.lookup(key)!.last_seen = 7n;
    s.egress_cache.entriesBytes();
    expect(held.readBigUInt64LE(path.field('last_seen').offset)).toBe(0x1_0000_0001n);
  });

  it("policy rules go through the agent's PolicyTable into policy_table and policy_start", () => {
    const s = state();
    const a = new SimAgent(s, T);
    const id = a.addRule({ dir: 'egress', dst: '10.244.2.0/24', dport: 80, dportEnd: 90, proto: 'tcp' });
    a.addRule({ dir: 'ingress', src: '10.244.2.9' });
    expect(s.policy_start.egress).not.toBe(0);
    expect(s.policy_start.ingress).not.toBe(0);
    const before = s.policy_table.size;
    expect(before).toBeGreaterThan(0);
    expect(a.removeRule(id)).toBe(true);
    expect(s.policy_start.egress).toBe(0);
    expect(s.policy_table.size).toBeLessThan(before);
    expect(a.removeRule(id)).toBe(false);
    expect(a.policy.map((r) => r.src)).toEqual(['10.244.2.9']);
    expect(() => a.addRule({ dir: 'sideways' })).toThrow(/egress/);
  });
});
