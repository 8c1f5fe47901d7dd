/**
 * The systemd unit for hosts without Kubernetes: systemd accepts it, and the command it
 * starts is the agent's bundle run by node (here with the package at this checkout instead
 * of /opt/xmasq, and --version appended so that nothing is attached).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '');
const UNIT = fileURLToPath(new URL('./xmasq-agent.service', import.meta.url));
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

/** The unit with the package where this checkout is. */
const localUnit = () => readFileSync(UNIT, 'utf8').replaceAll('/opt/xmasq', ROOT);

describe('deploy/systemd/xmasq-agent.service', () => {
  it('runs the agent\'s bundle with node, with its config, and restarts it after a hand-over', () => {
    const text = localUnit();
    const exec = /^ExecStart=(.+)$/m.exec(text)?.[1].split(' ');
    expect(exec).toEqual(['/usr/bin/node', `${ROOT}/dist/xmasq-agent.mjs`, '--config', '/etc/xmasq/agent.json']);
    expect(text).toMatch(/^Restart=always$/m); // SIGUSR2 ends the agent with status 0
    const r = spawnSync(exec![0], [...exec!.slice(1), '--version'], { encoding: 'utf8', env: { PATH: '/usr/bin:/bin' } });
    expect({ status: r.status, stdout: r.stdout, stderr: r.stderr }).toEqual({ status: 0, stdout: `${VERSION}\n`, stderr: '' });
  });

  it('systemd-analyze verify finds nothing wrong with it', () => {
    const dir = mkdtempSync('/tmp/xmasq-unit-test-');
    try {
      writeFileSync(join(dir, 'xmasq-agent.service'), localUnit());
      // A missing ExecStart binary fails it; unknown keys and bad values are only warnings, on stderr.
      const r = spawnSync('systemd-analyze', ['verify', join(dir, 'xmasq-agent.service')], { encoding: 'utf8' });
      expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
