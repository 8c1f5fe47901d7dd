/**
 * `npm run lab -- up|status|down` (lab/main.ts) as a person runs them: separate processes, the
 * agents outliving the command that started them, and nothing left behind.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { ROOT } from '../testing/root.ts';
import { afterAll, describe, expect, it } from 'vitest';
import type { LabView } from './cli.ts';
import { run } from '../testing/command.ts';
import { UDP_ECHO, UDP_ROUND_TRIPS } from './traffic.ts';
import { requireRoot } from '../testing/privileges.ts';

requireRoot(import.meta.url, 'network namespaces, BPF');

const LAB = `${ROOT}lab/main.ts`;
const name = `xc${process.pid % 100000}`;

function lab(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, ['--import', 'tsx', LAB, ...args], { cwd: ROOT, timeout: 120_000 }, (e, out, err) => {
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : 1) : 0, out, err });
    });
  });
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};
const netnsOfLab = () => readdirSync('/run/netns').filter((n) => n.startsWith(`${name}-`));
const pinsOfLab = () => readdirSync('/sys/fs/bpf').filter((n) => n.startsWith(`xmasq-lab-${name}-`));

afterAll(async () => {
  await lab('down', '--name', name);
});

describe('npm run lab', () => {
  it('--help on each command', async () => {
    for (const sub of ['up', 'down', 'status']) {
      const r = await lab(sub, '--help');
      expect(r.code).toBe(0);
      expect(r.out).toContain(`usage: npm run lab -- ${sub}`);
    }
    expect((await lab('frob')).code).toBe(2);
    expect((await lab('up', '--hosts', 'two')).code).toBe(2);
  });

  it('up --with-agents, status, a ping and UDP between the pods (UDP on the fast path), down: nothing left behind', async () => {
    const up = await lab('up', '--name', name, '--hosts', '2', '--pods', '1', '--with-agents');
    expect(up.code, up.err).toBe(0);
    expect(up.err).toMatch(/^lab: agent of h1 runs: pid \d+/m);
    expect(up.err).toContain(`lab ${name} is up`);

    const st = await lab('status', '--name', name, '--json');
    expect(st.code, st.err).toBe(0);
    const v = JSON.parse(st.out) as LabView;
    expect(v.up).toBe(true);
    expect(v.hosts.map((h) => [h.name, h.netnsExists, h.agent?.running, h.agent?.status?.mode, h.agent?.status?.pods]))
      .toEqual([['h1', true, true, 'veth', 1], ['h2', true, true, 'veth', 1]]);
    expect(v.pods.map((p) => [p.name, p.netnsExists, p.masq])).toEqual([['h1-p1', true, 'attached'], ['h2-p1', true, 'attached']]);
    const pids = v.hosts.map((h) => h.agent!.pid!);
    const human = await lab('status', '--name', name);
    expect(human.out).toMatch(/^h1\s.*pid \d+, veth, 1 pod\(s\)/m);
    expect(human.out).toMatch(/^h2-p1\s.*attached$/m);

    const [p1, p2] = v.pods;
    const ping = await run('nsenter', [`--net=/run/netns/${p1.netns}`, 'ping', '-c', '4', '-i', '0.2', '-W', '2', p2.ip]);
    expect(ping.stdout, ping.stderr).toMatch(/4 packets transmitted, 4 received/);
    // UDP takes the fast path (the hosts' conntrack admits TCP and UDP flows, not pings).
    const echo = spawn('nsenter', [`--net=/run/netns/${p2.netns}`, process.execPath, '-e', UDP_ECHO(5353)], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      await new Promise<void>((resolve, reject) => {
        echo.stdout!.on('data', (d) => { if (String(d).includes('ready')) resolve(); });
        echo.once('exit', (c) => reject(new Error(`udp echo in ${p2.netns} exited ${c}`)));
      });
      const rt = await run('nsenter', [`--net=/run/netns/${p1.netns}`, process.execPath, '-e', UDP_ROUND_TRIPS(p2.ip, 5353, 5, 100)]);
      expect(rt.stdout, rt.stderr).toContain('udp-echoed 5');
    } finally {
      echo.kill();
    }
    const after = JSON.parse((await lab('status', '--name', name, '--json')).out) as LabView;
    expect(after.hosts[0].agent!.status!.counters.masqueraded).toBeGreaterThan(0);
    expect(after.hosts[1].agent!.status!.counters.restored).toBeGreaterThan(0);

    const down = await lab('down', '--name', name);
    expect(down.code, down.err).toBe(0);
    expect(down.err).toMatch(/stopped the agent of h1/);
    expect(netnsOfLab()).toEqual([]);
    expect(pinsOfLab()).toEqual([]);
    for (const pid of pids) expect(alive(pid), `agent pid ${pid}`).toBe(false);
    expect(existsSync(`/run/xmasq-lab-agents/${name}`)).toBe(false);
    expect(existsSync(`/run/xmasq-lab/${name}`)).toBe(false);

    const again = await lab('down', '--name', name);
    expect(again.code).toBe(0);
    expect(again.err).toContain('nothing to do');
    const gone = await lab('status', '--name', name, '--json');
    expect(gone.code).toBe(1);
    expect(JSON.parse(gone.out)).toMatchObject({ name, up: false });
  }, 300_000);
});
