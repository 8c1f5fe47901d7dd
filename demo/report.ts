/**
 * What the demo reports, kept free of any I/O so it can be tested and re-rendered from a
 * saved JSON: the report shape, medians, the goals, the markdown table and the SVG chart.
 */
import { median, type Machine } from '../testing/measure.ts';

export const PATHS = ['host', 'route', 'overlay', 'xmasq'] as const;
export type PathName = (typeof PATHS)[number];
export const MODES = ['pinned', 'unpinned'] as const;
export type Mode = (typeof MODES)[number];
export const METRICS = [
  'throughput_gbps', 'throughput4_gbps',
  'sockperf_rr_tps', 'sockperf_p50_us', 'sockperf_p99_us',
  'rr_tps', 'rr_p50_us', 'rr_p99_us',
  'cpu_per_gbps',
] as const;
export type Metric = (typeof METRICS)[number];

export interface Stat {
  median: number;
  min: number;
  max: number;
}

export type ModeResult = Record<Exclude<Metric, 'cpu_per_gbps'>, Stat> & { cpu_per_gbps?: Stat };

/**
 * The share of the overlay's cost that XMasq takes away, (xmasq − overlay) / (host − overlay)
 * on the medians: 1 is host speed, 0 the overlay's. Unlike "× overlay" it carries over from a
 * lab whose overlay is unusually cheap (a veth wire keeps every offload) to a real cluster.
 * null where host and overlay measured the same (nothing to remove).
 */
export interface OverheadRemoved {
  /** sockperf ping-pong transactions/s. */
  rr: number | null;
  /** sockperf p50 latency. */
  p50: number | null;
  /** iperf3, 1 stream. */
  throughput: number | null;
}

export interface DemoReport {
  machine: Machine;
  date: string;
  rounds: number;
  duration_s: number;
  paths: Record<PathName, Partial<Record<Mode, ModeResult>>>;
  overhead_removed: Partial<Record<Mode, OverheadRemoved>>;
}

/** One round's numbers for one path and mode. */
export type Sample = Record<Metric, number>;

export const METRIC_INFO: Record<Metric, { label: string; unit: string; higherIsBetter: boolean; digits: number }> = {
  throughput_gbps: { label: 'throughput, 1 stream', unit: 'Gbit/s', higherIsBetter: true, digits: 2 },
  throughput4_gbps: { label: 'throughput, 4 streams', unit: 'Gbit/s', higherIsBetter: true, digits: 2 },
  sockperf_rr_tps: { label: 'sockperf TCP ping-pong (14 bytes)', unit: 'transactions/s', higherIsBetter: true, digits: 0 },
  sockperf_p50_us: { label: 'sockperf p50 latency, half round trip', unit: 'µs', higherIsBetter: false, digits: 2 },
  sockperf_p99_us: { label: 'sockperf p99 latency, half round trip', unit: 'µs', higherIsBetter: false, digits: 2 },
  rr_tps: { label: 'TCP_RR (1 byte), demo/rr.c', unit: 'transactions/s', higherIsBetter: true, digits: 0 },
  rr_p50_us: { label: 'rr.c p50 latency, round trip', unit: 'µs', higherIsBetter: false, digits: 1 },
  rr_p99_us: { label: 'rr.c p99 latency, round trip', unit: 'µs', higherIsBetter: false, digits: 1 },
  cpu_per_gbps: { label: 'CPU per Gbit/s, 1 stream', unit: '% of a core', higherIsBetter: false, digits: 2 },
};


export function stat(xs: readonly number[]): Stat {
  return { median: median(xs), min: Math.min(...xs), max: Math.max(...xs) };
}

export function summarize(samples: readonly Sample[]): ModeResult {
  const out = {} as ModeResult;
  for (const m of METRICS) {
    const xs = samples.map((s) => s[m]).filter((x) => Number.isFinite(x));
    if (xs.length) out[m] = stat(xs);
  }
  return out;
}

/** (xmasq − overlay) / (host − overlay) of one metric's medians; see OverheadRemoved. */
export function overheadRemoved(r: Pick<DemoReport, 'paths'>, mode: Mode, metric: Metric): number | null {
  const [h, o, x] = (['host', 'overlay', 'xmasq'] as const).map((p) => r.paths[p][mode]?.[metric]?.median);
  if (h === undefined || o === undefined || x === undefined || h === o) return null;
  return (x - o) / (h - o);
}

export function overheadRemovedByMode(r: Pick<DemoReport, 'paths'>): DemoReport['overhead_removed'] {
  const out: DemoReport['overhead_removed'] = {};
  for (const mode of MODES) {
    if (!r.paths.xmasq[mode]) continue;
    out[mode] = {
      rr: overheadRemoved(r, mode, 'sockperf_rr_tps'),
      p50: overheadRemoved(r, mode, 'sockperf_p50_us'),
      throughput: overheadRemoved(r, mode, 'throughput_gbps'),
    };
  }
  return out;
}

export interface Goal {
  what: string;
  /** The xmasq figure the goal is judged on, from the pinned medians. */
  value: number;
  /** That figure as the table shows it (a ratio, a difference in µs, a share). */
  shown: string;
  met: boolean;
}

/** Host speed within the tolerances of the issue that set them (#17), on a stock kernel. */
export const GOALS = {
  throughputVsHost: 0.97,
  rrVsHost: 0.95,
  /** µs over host, sockperf's half round trip. */
  p50OverHost: 0.5,
  overheadRemovedRr: 0.75,
} as const;

/**
 * The project's goals, judged on the pinned medians (the stable measurement on a 2-core
 * machine) with sockperf for request/response: reported, never asserted, since a VM's numbers
 * move from run to run. Against the overlay they are stated as the share of its overhead
 * removed, not as "× overlay", which depends on how cheap the overlay happens to be.
 */
export function goals(r: DemoReport): Goal[] {
  const pinned = (p: PathName, m: Metric) => r.paths[p].pinned?.[m]?.median;
  const out: Goal[] = [];
  const ratio = (m: Metric, target: number, what: string) => {
    const x = pinned('xmasq', m), h = pinned('host', m);
    if (x === undefined || !h) return;
    out.push({ what, value: x / h, shown: `${(x / h).toFixed(2)}×`, met: x / h >= target });
  };
  ratio('throughput_gbps', GOALS.throughputVsHost, `throughput (1 stream) ≥ ${GOALS.throughputVsHost.toFixed(2)} × host`);
  ratio('sockperf_rr_tps', GOALS.rrVsHost, `RR rate (sockperf) ≥ ${GOALS.rrVsHost.toFixed(2)} × host`);
  const x = pinned('xmasq', 'sockperf_p50_us'), h = pinned('host', 'sockperf_p50_us');
  if (x !== undefined && h !== undefined) {
    const d = x - h;
    out.push({ what: `p50 latency (sockperf, half round trip) ≤ host + ${GOALS.p50OverHost} µs`, value: d, shown: `${d >= 0 ? '+' : '−'}${Math.abs(d).toFixed(2)} µs`, met: d <= GOALS.p50OverHost });
  }
  const rr = overheadRemoved(r, 'pinned', 'sockperf_rr_tps');
  if (rr !== null) {
    out.push({ what: `≥ ${GOALS.overheadRemovedRr * 100}% of the overlay's RR overhead removed (sockperf)`, value: rr, shown: percent(rr), met: rr >= GOALS.overheadRemovedRr });
  }
  return out;
}

function percent(x: number | null): string {
  return x === null ? '–' : `${(x * 100).toFixed(0)}%`;
}

function fmt(x: number, digits: number): string {
  return x.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function cell(s: Stat | undefined, digits: number, spread: boolean): string {
  if (!s) return '–';
  const m = fmt(s.median, digits);
  return spread && s.min !== s.max ? `${m} (${fmt(s.min, digits)}–${fmt(s.max, digits)})` : m;
}

function ratio(a: Stat | undefined, b: Stat | undefined): string {
  return a && b && b.median ? `${(a.median / b.median).toFixed(2)}×` : '–';
}

/** One markdown table per mode: a row per metric, a column per path, then the two ratios. */
export function renderTable(r: DemoReport): string {
  const spread = r.rounds > 1;
  const out: string[] = [];
  for (const mode of MODES) {
    if (!PATHS.some((p) => r.paths[p][mode])) continue;
    out.push(`**${mode}**${mode === 'pinned' ? ' (client and server on CPU 0)' : ''}, median${spread ? ' (min–max)' : ''} of ${r.rounds} round${r.rounds > 1 ? 's' : ''} × ${r.duration_s} s`, '');
    out.push(`| metric | ${PATHS.join(' | ')} | xmasq/host | xmasq/overlay |`);
    out.push(`|---|${PATHS.map(() => '---:').join('|')}|---:|---:|`);
    for (const m of METRICS) {
      const info = METRIC_INFO[m];
      const get = (p: PathName) => r.paths[p][mode]?.[m];
      if (!PATHS.some((p) => get(p))) continue;
      out.push(`| ${info.label} (${info.unit}) | ${PATHS.map((p) => cell(get(p), info.digits, spread)).join(' | ')} | ${ratio(get('xmasq'), get('host'))} | ${ratio(get('xmasq'), get('overlay'))} |`);
    }
    out.push('');
  }
  const removed = MODES.filter((m) => r.overhead_removed[m]);
  if (removed.length) {
    out.push('**overlay overhead removed** by xmasq, (xmasq − overlay) / (host − overlay) of the medians: 100% is host speed, 0% the overlay\'s', '');
    out.push('| mode | RR rate (sockperf) | p50 latency (sockperf) | throughput (1 stream) |', '|---|---:|---:|---:|');
    let noisy = false;
    for (const m of removed) {
      const o = r.overhead_removed[m]!;
      const cell = (x: number | null, metric: Metric) => {
        const h = r.paths.host[m]?.[metric], ov = r.paths.overlay[m]?.[metric];
        const overlap = h && ov && h.min <= ov.max && ov.min <= h.max;
        noisy ||= !!overlap;
        return `${percent(x)}${overlap ? ' ‡' : ''}`;
      };
      out.push(`| ${m} | ${cell(o.rr, 'sockperf_rr_tps')} | ${cell(o.p50, 'sockperf_p50_us')} | ${cell(o.throughput, 'throughput_gbps')} |`);
    }
    out.push('');
    if (noisy) out.push('‡ host\'s and overlay\'s min–max overlap: the difference this is a share of is within the run\'s noise.', '');
  }
  const gs = goals(r);
  if (gs.length) {
    out.push('**goals** (pinned medians)', '');
    out.push('| goal | xmasq | met |', '|---|---:|---|');
    for (const g of gs) out.push(`| ${g.what} | ${g.shown} | ${g.met ? 'met' : '**not met**'} |`);
    out.push('');
  }
  return out.join('\n');
}

export function renderMachine(r: DemoReport): string {
  return `${r.machine.cpu}, ${r.machine.cores} cores, Linux ${r.machine.kernel}, ${r.date}`;
}

const COLORS: Record<PathName, string> = { host: '#4c72b0', route: '#8c8c8c', overlay: '#dd8452', xmasq: '#55a868' };

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** A tick step of 1, 2 or 5 × 10^k giving about `n` gridlines up to `max`. */
function niceStep(max: number, n = 5): number {
  const raw = max / n;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((k) => k * p).find((s) => s >= raw)!;
}

/** A bar: its median, and its min–max whisker when it has one. */
interface Bar {
  label: string;
  color: string;
  median: number;
  min?: number;
  max?: number;
}

interface Panel {
  title: string;
  /** Each group of bars sits over its label; groups of one panel share its axis. */
  groups: { label: string; bars: Bar[] }[];
  /** Lines drawn across the panel at these values (a goal, 100%). */
  marks?: number[];
  digits?: number;
}

function pathBars(r: DemoReport, mode: Mode, metric: Metric, scale: number): Bar[] {
  return PATHS.flatMap((p) => {
    const s = r.paths[p][mode]?.[metric];
    return s ? [{ label: p, color: COLORS[p], median: s.median * scale, min: s.min * scale, max: s.max * scale }] : [];
  });
}

/**
 * Grouped bars of the medians of one mode with min–max whiskers, a panel per unit: throughput
 * (1 and 4 streams, one bar per path), request/response rate (sockperf and the demo's own
 * client), and the share of the overlay's overhead that xmasq removed (RR, p50, throughput;
 * 100% is host speed, the goal line is the RR goal).
 */
export function renderSvg(r: DemoReport, mode: Mode = 'pinned'): string {
  const removed = r.overhead_removed[mode];
  const panels: Panel[] = [
    { title: 'Throughput (Gbit/s)', groups: [{ label: '1 stream', bars: pathBars(r, mode, 'throughput_gbps', 1) }, { label: '4 streams', bars: pathBars(r, mode, 'throughput4_gbps', 1) }] },
    { title: 'Request/response (k transactions/s)', groups: [{ label: 'sockperf', bars: pathBars(r, mode, 'sockperf_rr_tps', 1e-3) }, { label: 'demo/rr.c', bars: pathBars(r, mode, 'rr_tps', 1e-3) }] },
  ];
  if (removed) {
    const bar = (x: number | null): Bar[] => (x === null ? [] : [{ label: 'xmasq', color: COLORS.xmasq, median: x * 100 }]);
    panels.push({
      title: 'Overlay overhead removed (%)',
      groups: [{ label: 'RR', bars: bar(removed.rr) }, { label: 'p50', bars: bar(removed.p50) }, { label: 'tput', bars: bar(removed.throughput) }],
      marks: [100, GOALS.overheadRemovedRr * 100],
      digits: 0,
    });
  }
  const W = 960, H = 400, top = 70, bottom = 60, left = 60, gap = 30, right = 20;
  const plotH = H - top - bottom;
  // Every bar gets the same width, whichever panel it is in; a group has a margin of 20.
  const slots = panels.map((p) => p.groups.reduce((n, g) => n + Math.max(1, g.bars.length) + 1, 0));
  const unit = (W - left * panels.length - gap * (panels.length - 1) - right) / slots.reduce((a, b) => a + b, 0);
  const parts: string[] = [];
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  parts.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  parts.push(`<text x="${W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">XMasq demo: h1 → h2 by path, ${mode}</text>`);
  parts.push(`<text x="${W / 2}" y="40" text-anchor="middle" fill="#555">${esc(renderMachine(r).replace(/:\d\d\.\d+Z$/, ' UTC').replace('T', ' '))}; median of ${r.rounds} × ${r.duration_s} s, whiskers min–max</text>`);
  PATHS.forEach((p, i) => {
    const x = W / 2 - 160 + i * 85;
    parts.push(`<rect x="${x}" y="${H - 22}" width="12" height="12" fill="${COLORS[p]}"/><text x="${x + 16}" y="${H - 12}">${p}</text>`);
  });
  let x0 = left;
  panels.forEach((panel, pi) => {
    const w = slots[pi] * unit;
    const vals = panel.groups.flatMap((g) => g.bars.flatMap((b) => [b.median, b.max ?? b.median, b.min ?? b.median])).concat(panel.marks ?? []);
    const step = niceStep(Math.max(...vals.map(Math.abs), 1e-9));
    const yMax = Math.ceil(Math.max(...vals, 1e-9) / step) * step;
    // An xmasq slower than the overlay removes a negative share: the axis goes below 0 for it.
    const yMin = Math.min(0, Math.floor(Math.min(...vals) / step) * step);
    const y = (v: number) => top + plotH - ((v - yMin) / (yMax - yMin)) * plotH;
    parts.push(`<text x="${x0 + w / 2}" y="${top - 12}" text-anchor="middle" font-weight="bold">${esc(panel.title)}</text>`);
    for (let v = yMin; v <= yMax + step / 2; v += step) {
      parts.push(`<line x1="${x0}" x2="${x0 + w}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`);
      parts.push(`<text x="${x0 - 6}" y="${y(v) + 4}" text-anchor="end" fill="#555">${+v.toPrecision(6)}</text>`);
    }
    for (const m of panel.marks ?? []) parts.push(`<line x1="${x0}" x2="${x0 + w}" y1="${y(m)}" y2="${y(m)}" stroke="#c44" stroke-dasharray="4 3"/>`);
    parts.push(`<line x1="${x0}" x2="${x0}" y1="${top}" y2="${top + plotH}" stroke="#333"/>`);
    parts.push(`<line x1="${x0}" x2="${x0 + w}" y1="${y(0)}" y2="${y(0)}" stroke="#333"/>`);
    let gx = x0;
    for (const g of panel.groups) {
      const gw = (Math.max(1, g.bars.length) + 1) * unit;
      const barW = unit;
      const bx0 = gx + unit / 2;
      g.bars.forEach((b, k) => {
        const bx = bx0 + k * barW;
        const [lo, hi] = [Math.min(0, b.median), Math.max(0, b.median)];
        const spread = b.min !== undefined && b.max !== undefined ? ` (${fmt(b.min, 2)}–${fmt(b.max, 2)})` : '';
        parts.push(`<rect x="${bx + 1}" y="${y(hi)}" width="${barW - 2}" height="${y(lo) - y(hi)}" fill="${b.color}"><title>${b.label} ${esc(g.label)}: ${fmt(b.median, 2)}${spread}</title></rect>`);
        const cx = bx + barW / 2;
        if (b.min !== undefined && b.max !== undefined && b.max > b.min) {
          parts.push(`<line x1="${cx}" x2="${cx}" y1="${y(b.min)}" y2="${y(b.max)}" stroke="#222"/>`);
          parts.push(`<line x1="${cx - 4}" x2="${cx + 4}" y1="${y(b.max)}" y2="${y(b.max)}" stroke="#222"/>`);
          parts.push(`<line x1="${cx - 4}" x2="${cx + 4}" y1="${y(b.min)}" y2="${y(b.min)}" stroke="#222"/>`);
        }
        const label = panel.digits !== undefined ? b.median.toFixed(panel.digits) : b.median >= 100 ? b.median.toFixed(0) : b.median.toFixed(1);
        parts.push(`<text x="${cx}" y="${y(Math.max(b.max ?? b.median, 0)) - 4}" text-anchor="middle" font-size="10" fill="#333">${label}</text>`);
      });
      parts.push(`<text x="${gx + gw / 2}" y="${top + plotH + 18}" text-anchor="middle">${esc(g.label)}</text>`);
      gx += gw;
    }
    x0 += w + gap + left;
  });
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}

/** The markdown file written next to the JSON: machine, the tables, the goals, how it was measured. */
export function renderMarkdown(r: DemoReport, notes: string): string {
  return [
    `# XMasq demo, ${r.date.slice(0, 10)}`,
    '',
    `Machine: ${renderMachine(r)}.`,
    '',
    renderTable(r),
    notes.trim(),
    '',
  ].join('\n');
}
