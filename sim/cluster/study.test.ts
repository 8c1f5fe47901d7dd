/**
 * npm run sim:study produces its report: a quick run into a temporary
 * directory writes the markdown, whose last line is the headline, and one
 * SVG per sweep with a line per series.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const STUDY = new URL('./study.ts', import.meta.url).pathname;

describe('sim:study', () => {
  it('writes the report and its plots (quick run)', () => {
    const dir = mkdtempSync(join(tmpdir(), 'sim-study-'));
    try {
      const stdout = execFileSync(process.execPath, ['--import', 'tsx', STUDY, '--quick', '--out', dir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
      const md = readFileSync(join(dir, 'sim-study.md'), 'utf8').trimEnd().split('\n');
      const last = md[md.length - 1];
      expect(last).toMatch(/^fast-path packets: \d+\.\d% \(110 pods\/host, all-to-all\)$/);
      expect(stdout.trim()).toBe(last);
      for (const sweep of ['steady', 'pods', 'pairs', 'expiry', 'churn']) {
        const svg = readFileSync(join(dir, `sim-study-${sweep}.svg`), 'utf8');
        expect(svg).toMatch(/^<svg /);
        expect(svg.match(/<polyline /g)?.length).toBeGreaterThanOrEqual(2);
      }
      // The headline is the wide keys' steady all-to-all figure, which 63 narrow keys cannot reach
      // with 110 × 110 pairs per host pair.
      const pct = Number(/(\d+\.\d)%/.exec(last)![1]);
      const summary = (scheme: string) => Number(new RegExp(`^- \`${scheme}\`: (\\d+\\.\\d)% of packets`, 'm').exec(md.join('\n'))![1]);
      expect(pct).toBe(summary('wide'));
      expect(summary('6-bit')).toBeLessThan(10);
      // ICMP echo pairs (3%) stay on the overlay (conntrack admits TCP and UDP only), and a TCP
      // pair's first packets wait for its handshake and the agent's 100 ms drain of ct_pending.
      expect(pct).toBeGreaterThan(85);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses an unknown key scheme with the list of known ones', () => {
    let err = '';
    try {
      execFileSync(process.execPath, ['--import', 'tsx', STUDY, '--schemes', 'nine-bit'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      err = String((e as { stderr: string }).stderr);
    }
    expect(err).toMatch(/unknown key scheme nine-bit; the schemes are 6-bit, wide, overlay/);
  });
});
