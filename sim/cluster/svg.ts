/**
 * A line chart as a hand-written SVG: axes with ticks, one polyline with dots
 * per series, a legend. Enough for the study's plots, no dependency.
 */
export interface Series {
  name: string;
  points: Array<[number, number]>;
  dashed?: boolean;
  dotted?: boolean;
}

export interface Chart {
  title: string;
  xLabel: string;
  yLabel: string;
  series: Series[];
  /** Log-2 x axis (for sweeps that double). */
  xLog?: boolean;
  /** Fixed y range; default 0..100. */
  yMax?: number;
}

const W = 700, H = 400, L = 64, R = 200, T = 40, B = 56;
const COLOURS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b'];

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

function niceTicks(lo: number, hi: number, n: number): number[] {
  const span = hi - lo || 1;
  const step0 = span / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0) ?? step0;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

export function lineChart(c: Chart): string {
  const xs = c.series.flatMap((s) => s.points.map((p) => p[0]));
  const fx = c.xLog ? Math.log2 : (v: number) => v;
  const x0 = fx(Math.min(...xs)), x1 = fx(Math.max(...xs));
  const yMax = c.yMax ?? 100;
  const px = (v: number) => +(L + ((fx(v) - x0) / (x1 - x0 || 1)) * (W - L - R)).toFixed(1);
  const py = (v: number) => +(T + (1 - v / yMax) * (H - T - B)).toFixed(1);
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  out.push(`<text x="${W / 2 - R / 2 + L / 2}" y="22" text-anchor="middle" font-size="14" font-weight="bold">${esc(c.title)}</text>`);
  // Grid and y ticks.
  for (const v of niceTicks(0, yMax, 5)) {
    out.push(`<line x1="${L}" x2="${W - R}" y1="${py(v)}" y2="${py(v)}" stroke="#ddd"/>`);
    out.push(`<text x="${L - 6}" y="${py(v) + 4}" text-anchor="end">${v}</text>`);
  }
  const xTicks = c.xLog ? [...new Set(xs)].sort((a, b) => a - b) : niceTicks(Math.min(...xs), Math.max(...xs), 6);
  for (const v of xTicks) {
    out.push(`<line x1="${px(v)}" x2="${px(v)}" y1="${H - B}" y2="${H - B + 5}" stroke="#333"/>`);
    out.push(`<text x="${px(v)}" y="${H - B + 18}" text-anchor="middle">${v}</text>`);
  }
  out.push(`<line x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}" stroke="#333"/>`);
  out.push(`<line x1="${L}" x2="${L}" y1="${T}" y2="${H - B}" stroke="#333"/>`);
  out.push(`<text x="${(L + W - R) / 2}" y="${H - 14}" text-anchor="middle">${esc(c.xLabel)}</text>`);
  out.push(`<text transform="translate(16 ${(T + H - B) / 2}) rotate(-90)" text-anchor="middle">${esc(c.yLabel)}</text>`);
  c.series.forEach((s, i) => {
    const col = COLOURS[i % COLOURS.length];
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    const dash = s.dashed ? ' stroke-dasharray="6 4"' : s.dotted ? ' stroke-dasharray="2 3"' : '';
    out.push(`<polyline fill="none" stroke="${col}" stroke-width="2"${dash} points="${pts.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(' ')}"/>`);
    for (const [x, y] of pts) out.push(`<circle cx="${px(x).toFixed(1)}" cy="${py(y).toFixed(1)}" r="3" fill="${col}"/>`);
    const ly = T + 10 + i * 20;
    out.push(`<line x1="${W - R + 12}" x2="${W - R + 36}" y1="${ly}" y2="${ly}" stroke="${col}" stroke-width="2"${dash}/>`);
    out.push(`<text x="${W - R + 42}" y="${ly + 4}">${esc(s.name)}</text>`);
  });
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}
