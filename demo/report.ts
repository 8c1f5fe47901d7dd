/**
 * What the demo reports, kept free of any I/O so it can be tested and re-rendered from a
 * saved JSON: the report shape, medians, the goals, the markdown table and the SVG chart.
 */

export const PATHS = ['host', 'route', 'overlay', 'xmasq'] as const;
export type PathName = (typeof PATHS)[number];
export const MODES = ['pinned', 'unpinned'] as const;
export type Mode = (typeof MODES)[number];
export const METRICS = ['throughput_gbps', 'throughput4_gbps', 'rr_tps', 'rr_p50_us', 'rr_p99_us', 'cpu_per_gbps'] as const;
export type Metric = (typeof METRICS)[number];

export interface Stat {
  median: number;
  min: number;
  max: number;
}

export type ModeResult = Record<Exclude<Metric, 'cpu_per_gbps'>, Stat> & { cpu_per_gbps?: Stat };

export interface DemoReport {
  machine: { cpu: string; cores: number; kernel: string };
  date: string;
  rounds: number;
  duration_s: number;
  paths: Record<PathName, Partial<Record<Mode, ModeResult>>>;
}

/** One round's numbers for one path and mode. */
export type Sample = Record<Metric, number>;

export const METRIC_INFO: Record<Metric, { label: string; unit: string; higherIsBetter: boolean; digits: number }> = {
  throughput_gbps: { label: 'throughput, 1 stream', unit: 'Gbit/s', higherIsBetter: true, digits: 2 },
  throughput4_gbps: { label: 'throughput, 4 streams', unit: 'Gbit/s', higherIsBetter: true, digits: 2 },
  rr_tps: { label: 'TCP_RR (1 byte)', unit: 'transactions/s', higherIsBetter: true, digits: 0 },
  rr_p50_us: { label: 'TCP_RR p50 latency', unit: 'µs', higherIsBetter: false, digits: 1 },
  rr_p99_us: { label: 'TCP_RR p99 latency', unit: 'µs', higherIsBetter: false, digits: 1 },
  cpu_per_gbps: { label: 'CPU per Gbit/s, 1 stream', unit: '% of a core', higherIsBetter: false, digits: 2 },
};

export const PATH_INFO: Record<PathName, string> = {
  host: 'host netns to host netns over the wire (underlay IPs)',
  route: 'pod to pod, plain routing via the other host\'s underlay IP (host-gw style, no encapsulation)',
  overlay: 'pod to pod over the flannel VXLAN overlay, no XMasq attached',
  xmasq: 'pod to pod with the XMasq agents running, flow warmed onto the fast path',
};

export function median(xs: readonly number[]): number {
  if (!xs.length) throw new Error('median of nothing');
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

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

export interface Goal {
  what: string;
  /** xmasq / baseline, from the pinned medians. */
  ratio: number;
  target: number;
  met: boolean;
}

/**
 * The project's goals, judged on the pinned medians (the stable measurement on a 2-core
 * machine): reported, never asserted, since a VM's numbers move from run to run.
 */
export function goals(r: DemoReport): Goal[] {
  const specs: [Metric, PathName, number, string][] = [
    ['throughput_gbps', 'host', 0.95, 'throughput (1 stream) ≥ 0.95 × host'],
    ['throughput_gbps', 'overlay', 1.36, 'throughput (1 stream) ≥ 1.36 × overlay'],
    ['rr_tps', 'host', 0.9, 'TCP_RR rate ≥ 0.90 × host'],
    ['rr_tps', 'overlay', 1.59, 'TCP_RR rate ≥ 1.59 × overlay'],
  ];
  const out: Goal[] = [];
  for (const [metric, base, target, what] of specs) {
    const x = r.paths.xmasq.pinned?.[metric]?.median;
    const b = r.paths[base].pinned?.[metric]?.median;
    if (x === undefined || !b) continue;
    const ratio = x / b;
    out.push({ what, ratio, target, met: ratio >= target });
  }
  return out;
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
  const gs = goals(r);
  if (gs.length) {
    out.push('**goals** (pinned medians)', '');
    out.push('| goal | xmasq ratio | met |', '|---|---:|---|');
    for (const g of gs) out.push(`| ${g.what} | ${g.ratio.toFixed(2)}× | ${g.met ? 'met' : '**not met**'} |`);
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

interface Panel {
  title: string;
  groups: { label: string; metric: Metric; scale: number }[];
}

/**
 * Grouped bars of the pinned medians with min–max whiskers: one panel for throughput
 * (1 and 4 streams, one bar per path), one for the RR rate, each with its own axis.
 */
export function renderSvg(r: DemoReport, mode: Mode = 'pinned'): string {
  const panels: Panel[] = [
    { title: 'Throughput (Gbit/s)', groups: [{ label: '1 stream', metric: 'throughput_gbps', scale: 1 }, { label: '4 streams', metric: 'throughput4_gbps', scale: 1 }] },
    { title: 'TCP_RR, 1 byte (k tps)', groups: [{ label: 'rate', metric: 'rr_tps', scale: 1e-3 }] },
  ];
  const W = 860, H = 400, top = 70, bottom = 60, left = 60, gap = 40, right = 20;
  const plotH = H - top - bottom;
  // Every group of bars gets the same width, whichever panel it is in.
  const groupCount = panels.reduce((n, p) => n + p.groups.length, 0);
  const unit = (W - left * panels.length - gap * (panels.length - 1) - right) / groupCount;
  const widths = panels.map((p) => p.groups.length * unit);
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
    const w = widths[pi];
    const vals = panel.groups.flatMap((g) => PATHS.map((p) => (r.paths[p][mode]?.[g.metric]?.max ?? 0) * g.scale));
    const step = niceStep(Math.max(...vals, 1e-9));
    const yMax = Math.ceil(Math.max(...vals, 1e-9) / step) * step;
    const y = (v: number) => top + plotH - (v / yMax) * plotH;
    parts.push(`<text x="${x0 + w / 2}" y="${top - 12}" text-anchor="middle" font-weight="bold">${esc(panel.title)}</text>`);
    for (let v = 0; v <= yMax + step / 2; v += step) {
      parts.push(`<line x1="${x0}" x2="${x0 + w}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`);
      parts.push(`<text x="${x0 - 6}" y="${y(v) + 4}" text-anchor="end" fill="#555">${+v.toPrecision(6)}</text>`);
    }
    parts.push(`<line x1="${x0}" x2="${x0}" y1="${top}" y2="${top + plotH}" stroke="#333"/>`);
    parts.push(`<line x1="${x0}" x2="${x0 + w}" y1="${top + plotH}" y2="${top + plotH}" stroke="#333"/>`);
    const gw = w / panel.groups.length;
    panel.groups.forEach((g, gi) => {
      const barW = Math.min(26, (gw - 20) / PATHS.length);
      const gx = x0 + gi * gw + (gw - barW * PATHS.length) / 2;
      PATHS.forEach((p, k) => {
        const s = r.paths[p][mode]?.[g.metric];
        if (!s) return;
        const bx = gx + k * barW;
        const m = s.median * g.scale;
        parts.push(`<rect x="${bx + 1}" y="${y(m)}" width="${barW - 2}" height="${top + plotH - y(m)}" fill="${COLORS[p]}"><title>${p} ${esc(g.label)}: ${fmt(m, 2)} (${fmt(s.min * g.scale, 2)}–${fmt(s.max * g.scale, 2)})</title></rect>`);
        const cx = bx + barW / 2;
        if (s.max > s.min) {
          parts.push(`<line x1="${cx}" x2="${cx}" y1="${y(s.min * g.scale)}" y2="${y(s.max * g.scale)}" stroke="#222"/>`);
          parts.push(`<line x1="${cx - 4}" x2="${cx + 4}" y1="${y(s.max * g.scale)}" y2="${y(s.max * g.scale)}" stroke="#222"/>`);
          parts.push(`<line x1="${cx - 4}" x2="${cx + 4}" y1="${y(s.min * g.scale)}" y2="${y(s.min * g.scale)}" stroke="#222"/>`);
        }
        parts.push(`<text x="${cx}" y="${y(s.max * g.scale) - 4}" text-anchor="middle" font-size="10" fill="#333">${m >= 100 ? m.toFixed(0) : m.toFixed(1)}</text>`);
      });
      parts.push(`<text x="${x0 + gi * gw + gw / 2}" y="${top + plotH + 18}" text-anchor="middle">${esc(g.label)}</text>`);
    });
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
