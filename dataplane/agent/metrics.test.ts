/**
 * /metrics as Prometheus parses it: every line of renderMetrics is read back by a small
 * parser of the text format 0.0.4 (families, HELP and TYPE before their samples, label
 * syntax, values), and the process_* families and xmasq_build_info hold what the process
 * and package.json say. The real agent's /metrics is checked in agent.test.ts.
 */
import { closeSync, openSync, readdirSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { COUNTER_NAMES } from '../maps.ts';
import { processSample, renderMetrics, type MetricsSnapshot, type ProcessSample } from './metrics.ts';

interface Family { help: string; type: string; samples: Array<{ name: string; labels: Record<string, string>; value: number }> }

/** The text format, strictly: a line that is none of HELP, TYPE or a sample of the family just declared fails. */
function parseExposition(text: string): Map<string, Family> {
  const families = new Map<string, Family>();
  let current: string | undefined;
  expect(text.endsWith('\n')).toBe(true);
  for (const line of text.slice(0, -1).split('\n')) {
    const help = /^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$/.exec(line);
    if (help) {
      expect(families.has(help[1]), `${help[1]} declared twice`).toBe(false);
      families.set(help[1], { help: help[2], type: '', samples: [] });
      current = help[1];
      continue;
    }
    const type = /^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$/.exec(line);
    if (type) {
      expect(type[1], `TYPE of ${type[1]} right after its HELP`).toBe(current);
      families.get(type[1])!.type = type[2];
      continue;
    }
    const sample = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    expect(sample, `not a sample line: ${JSON.stringify(line)}`).not.toBeNull();
    const [, name, labelText, value] = sample!;
    expect(name, `${name} outside its family`).toBe(current);
    const labels: Record<string, string> = {};
    if (labelText) {
      const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)/y;
      let m: RegExpExecArray | null;
      while (re.lastIndex < labelText.length && (m = re.exec(labelText))) labels[m[1]] = m[2];
      expect(re.lastIndex, `labels of ${line}`).toBe(labelText.length);
    }
    expect(Number.isNaN(Number(value)), `value of ${line}`).toBe(false);
    families.get(name)!.samples.push({ name, labels, value: Number(value) });
  }
  for (const [name, f] of families) expect(f.type, `${name} has a TYPE`).not.toBe('');
  return families;
}

/** A snapshot as the agent makes it: the counters named as its datapath reports them. */
function snapshot(): MetricsSnapshot {
  return {
    mode: 'veth',
    nic: 'eth0',
    counters: Object.fromEntries(COUNTER_NAMES.map((c, i) => [c.toLowerCase(), i * 10])),
    caches: { egress: { entries: 3, capacity: 65536 }, ingress: { entries: 2, capacity: 65536 } },
    pods: 4,
    podsAttached: 3,
    nodes: { self: 1, peers: 2 },
    policyRules: 1,
    policyTableEntries: 1,
    clockHz: 250,
    expired: { egress: 5, ingress: 6 },
    lastScanSeconds: 0.012,
    scans: 7,
    scanFailures: 0,
    socket: { connections: 1, refused: { connections: 0, line: 1, depth: 0, idle: 2, unread: 0, handler: 0 } },
    startTimeSeconds: 1_700_000_000,
    requests: { add: 4, del: 1, status: 9 },
  };
}

const version = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
const one = (f: Map<string, Family>, name: string) => {
  const fam = f.get(name);
  expect(fam, `${name} is exported`).toBeDefined();
  expect(fam!.samples).toHaveLength(1);
  return fam!.samples[0];
};

describe('/metrics text', () => {
  it('parses as text format 0.0.4, and every label value the agent makes is lower case', () => {
    const f = parseExposition(renderMetrics(snapshot()));
    expect(f.get('xmasq_packets_total')!.samples.map((s) => s.labels.counter)).toEqual(COUNTER_NAMES.map((c) => c.toLowerCase()));
    expect(one(f, 'xmasq_pods').value).toBe(4);
    expect(one(f, 'xmasq_clock_hz').value).toBe(250);
    expect(f.get('xmasq_packets_total')!.samples.find((s) => s.labels.counter === 'masqueraded')?.value).toBe(COUNTER_NAMES.indexOf('MASQUERADED') * 10);
    for (const [name, fam] of f) {
      for (const s of fam.samples) {
        for (const [label, v] of Object.entries(s.labels)) {
          if (label !== 'nic') expect(v, `${name}{${label}}`).toBe(v.toLowerCase()); // a NIC's name is the system's
        }
      }
    }
  });

  it('exports xmasq_build_info with the version of package.json and the Node.js running it', () => {
    const b = one(parseExposition(renderMetrics(snapshot())), 'xmasq_build_info');
    expect(b).toEqual({ name: 'xmasq_build_info', labels: { version, nodejs: process.version }, value: 1 });
  });

  it('exports the standard process_* families, with the sample it is given', () => {
    const proc: ProcessSample = {
      cpuUserSeconds: 1.5, cpuSystemSeconds: 0.25, residentBytes: 50e6, virtualBytes: 900e6, startTimeSeconds: 1_700_000_123.456, openFds: 17, maxFds: 1024,
    };
    const f = parseExposition(renderMetrics(snapshot(), proc));
    const want: Array<[string, string, number]> = [
      ['process_cpu_user_seconds_total', 'counter', 1.5],
      ['process_cpu_system_seconds_total', 'counter', 0.25],
      ['process_cpu_seconds_total', 'counter', 1.75],
      ['process_resident_memory_bytes', 'gauge', 50e6],
      ['process_virtual_memory_bytes', 'gauge', 900e6],
      ['process_start_time_seconds', 'gauge', 1_700_000_123.456],
      ['process_open_fds', 'gauge', 17],
      ['process_max_fds', 'gauge', 1024],
    ];
    for (const [name, type, value] of want) {
      expect(f.get(name)?.type, name).toBe(type);
      expect(one(f, name).value, name).toBe(value);
    }
  });

  it('leaves out a process family /proc could not give, rather than report 0', () => {
    const f = parseExposition(renderMetrics(snapshot(), { ...processSample(), openFds: NaN, maxFds: NaN }));
    expect(f.get('process_open_fds')!.samples).toEqual([]);
    expect(f.get('process_max_fds')!.samples).toEqual([]);
    expect(one(f, 'process_resident_memory_bytes').value).toBeGreaterThan(0);
  });
});

describe('processSample', () => {
  it('reads this process: memory, start time, CPU and file descriptors', () => {
    const before = processSample();
    const limit = Number(/^Max open files\s+(\d+)/m.exec(readFileSync('/proc/self/limits', 'utf8'))![1]);
    expect(before.maxFds).toBe(limit);
    const rss = process.memoryUsage.rss();
    expect(before.residentBytes).toBeGreaterThan(rss / 2);
    expect(before.residentBytes).toBeLessThan(rss * 2);
    expect(before.virtualBytes).toBeGreaterThan(before.residentBytes);
    const started = Date.now() / 1000 - process.uptime();
    expect(Math.abs(before.startTimeSeconds - started)).toBeLessThan(1);
    expect(before.cpuUserSeconds + before.cpuSystemSeconds).toBeGreaterThan(0);

    // 64 more descriptors open are counted (give or take what vitest's own threads open meanwhile).
    const fds = Array.from({ length: 64 }, () => openSync('/proc/self/stat', 'r'));
    try {
      const after = processSample();
      expect(Math.abs(after.openFds - before.openFds - 64)).toBeLessThanOrEqual(4);
      expect(Math.abs(after.openFds - (readdirSync('/proc/self/fd').length - 1))).toBeLessThanOrEqual(4);
      expect(after.cpuUserSeconds).toBeGreaterThanOrEqual(before.cpuUserSeconds);
    } finally {
      for (const fd of fds) closeSync(fd);
    }
  });
});
