/**
 * Human-readable comparison of frames for test failure messages: which header
 * fields differ, by layer path, rather than which byte offsets.
 */
import { bytesToHex } from './addr.ts';
import { decodeFrame, formatField, HEX_BLOB_FIELDS, tcpFlagsString, type DecodedFrame, type FieldValue, type Layer } from './decode.ts';

export interface DiffOptions {
  /** Cap on returned lines (a last line says how many were left out); default 100. */
  maxLines?: number;
}

/** Bytes shown either side of the first difference inside a hex field. */
const WINDOW = 8;

function hexFieldDiff(path: string, field: string, layer: Layer, g: string, w: string): string {
  let i = 0;
  while (i < g.length && i < w.length && g.substr(i, 2) === w.substr(i, 2)) i += 2;
  const byte = i / 2;
  const base = HEX_BLOB_FIELDS[`${layer.name}.${field}`];
  const where = base === undefined ? `byte ${byte}` : `byte ${byte} (frame offset ${layer.offset + base + byte})`;
  const around = (s: string) => {
    const from = Math.max(0, i - 2 * WINDOW);
    const to = Math.min(s.length, i + 2 * WINDOW + 2);
    const mid = i < s.length ? `[${s.substr(i, 2)}]` : '[]';
    return `${from > 0 ? '…' : ''}${s.slice(from, i)}${mid}${s.slice(i + 2, to)}${to < s.length ? '…' : ''}`;
  };
  return `${path}.${field}: first difference at ${where}: got ${around(g)} want ${around(w)}`;
}

function layerSummary(l: Layer): string {
  return Object.entries(l.fields)
    .map(([k, v]) => {
      const s = formatField(l.name, k, v);
      return `${k}=${s.length > 24 ? s.slice(0, 24) + '…' : s}`;
    })
    .join(' ');
}

/** Merge two path sequences keeping each one's order: got-only paths go after their predecessor in got. */
function mergePaths(got: string[], want: string[]): string[] {
  const out = [...want];
  let last = -1;
  for (const p of got) {
    const i = out.indexOf(p);
    if (i >= 0) last = i;
    else out.splice(++last, 0, p);
  }
  return out;
}

function quote(v: string | undefined): string {
  return v === undefined ? '(none)' : JSON.stringify(v);
}

/**
 * Differences between two frames, one line each: frame length, decode
 * outcome, then fields by layer path ('ipv4.tos: got 0x0b want 0x08',
 * 'inner.udp.dport: …'), layers present on one side only, and for byte fields
 * (payloads, options, undecodable tails) the first differing byte and its
 * frame offset. Empty when the frames are byte-identical.
 */
export function diffFrames(got: Uint8Array, want: Uint8Array, opts: DiffOptions = {}): string[] {
  if (Buffer.compare(Buffer.from(got.buffer, got.byteOffset, got.byteLength), Buffer.from(want.buffer, want.byteOffset, want.byteLength)) === 0) return [];
  const g = decodeFrame(got);
  const w = decodeFrame(want);
  const lines: string[] = [];
  if (got.length !== want.length) lines.push(`length: got ${got.length} want ${want.length}`);
  if (g.truncatedAt !== w.truncatedAt) lines.push(`truncatedAt: got ${quote(g.truncatedAt)} want ${quote(w.truncatedAt)}`);
  if (g.error !== w.error) lines.push(`error: got ${quote(g.error)} want ${quote(w.error)}`);
  lines.push(...layerDiffs(g, w));
  if (lines.length === 0 || (lines.length === 1 && got.length !== want.length)) {
    // Only reachable if every decoded field matched; point at the bytes directly.
    const n = Math.min(got.length, want.length);
    let i = 0;
    while (i < n && got[i] === want[i]) i++;
    if (i < n) lines.push(`bytes: first difference at offset ${i}: got 0x${bytesToHex(got, i, i + 1)} want 0x${bytesToHex(want, i, i + 1)}`);
  }
  const max = opts.maxLines ?? 100;
  if (lines.length > max) return [...lines.slice(0, max - 1), `… ${lines.length - max + 1} more differences`];
  return lines;
}

function layerDiffs(g: DecodedFrame, w: DecodedFrame): string[] {
  const lines: string[] = [];
  const gm = new Map(g.layers.map((l) => [l.path, l]));
  const wm = new Map(w.layers.map((l) => [l.path, l]));
  for (const path of mergePaths(g.layers.map((l) => l.path), w.layers.map((l) => l.path))) {
    const gl = gm.get(path);
    const wl = wm.get(path);
    if (!gl) { lines.push(`${path}: only in want (${layerSummary(wl!)})`); continue; }
    if (!wl) { lines.push(`${path}: only in got (${layerSummary(gl)})`); continue; }
    if (gl.name !== wl.name) { lines.push(`${path}: got ${gl.name} want ${wl.name}`); continue; }
    const keys = [...Object.keys(wl.fields), ...Object.keys(gl.fields).filter((k) => !(k in wl.fields))];
    for (const k of keys) {
      // Differs whenever anything it covers differs, which is already reported; shown with checksumValid instead.
      if (k === 'checksumExpected') continue;
      const gv: FieldValue | undefined = gl.fields[k];
      const wv: FieldValue | undefined = wl.fields[k];
      if (gv === wv) continue;
      if (`${gl.name}.${k}` in HEX_BLOB_FIELDS && typeof gv === 'string' && typeof wv === 'string') {
        lines.push(hexFieldDiff(path, k, gl, gv, wv));
      } else if (k === 'checksumValid') {
        lines.push(`${path}.${k}: got ${validity(gl)} want ${validity(wl)}`);
      } else {
        lines.push(`${path}.${k}: got ${formatField(gl.name, k, gv)} want ${formatField(wl.name, k, wv)}`);
      }
    }
  }
  return lines;
}

function validity(l: Layer): string {
  const v = l.fields.checksumValid;
  if (v !== false) return formatField(l.name, 'checksumValid', v);
  return `false (checksum ${formatField(l.name, 'checksum', l.fields.checksum)}, expected ${formatField(l.name, 'checksumExpected', l.fields.checksumExpected)})`;
}

/** Throws with the field diff when the frames differ; for tests that want a readable failure without a matcher. */
export function assertFramesEqual(got: Uint8Array, want: Uint8Array, label = 'frame'): void {
  const d = diffFrames(got, want);
  if (d.length) throw new Error(`${label} differs:\n  ${d.join('\n  ')}\ngot:  ${describeFrame(got)}\nwant: ${describeFrame(want)}`);
}

function describeLayer(l: Layer): string | undefined {
  const f = l.fields;
  const bad = f.checksumValid === false ? ' BADSUM' : '';
  switch (l.name) {
    case 'eth': {
      const t = f.type as number;
      const known = t === 0x0800 || t === 0x86dd || t === 0x0806 || t === 0x8100 || t === 0x88a8 || t === 0x9100;
      return `eth ${f.src}>${f.dst}${known ? '' : ` type=${formatField('eth', 'type', t)}`}`;
    }
    case 'vlan':
      return `vlan ${f.vid}${f.pcp ? ` pcp=${f.pcp}` : ''}${f.dei ? ' DEI' : ''}`;
    case 'ipv4': {
      const flags = [f.rf && 'RF', f.df && 'DF', f.mf && 'MF'].filter(Boolean).join(' ');
      const proto = f.protocol === 6 || f.protocol === 17 || f.protocol === 1 ? '' : ` proto=${f.protocol}`;
      const frag = f.fragOffset ? ` frag=${(f.fragOffset as number) * 8}` : '';
      const opts = typeof f.options === 'string' ? ` opts=${f.options.length / 2}B` : '';
      return `ipv4 ${f.src}>${f.dst} tos=${formatField('ipv4', 'tos', f.tos)} id=${f.id}${flags ? ' ' + flags : ''}${frag} ttl=${f.ttl}${proto}${opts}${bad}`;
    }
    case 'ipv6':
      return `ipv6 ${f.src}>${f.dst} nh=${f.nextHeader} hlim=${f.hopLimit}${f.trafficClass ? ` tc=${formatField('ipv6', 'trafficClass', f.trafficClass)}` : ''}`;
    case 'arp':
      if (f.op === 1) return `arp who-has ${f.tpa ?? '?'} tell ${f.spa ?? '?'}`;
      if (f.op === 2) return `arp ${f.spa ?? '?'} is-at ${f.sha ?? '?'}`;
      return `arp op=${f.op}`;
    case 'udp':
      return `udp ${f.sport}>${f.dport}${f.checksum === 0 ? ' nocsum' : ''}${f.checksumPartial ? ' PARTIAL' : bad}`;
    case 'tcp':
      return `tcp ${f.sport}>${f.dport} [${tcpFlagsString(f.flags as number)}]${f.checksumPartial ? ' PARTIAL' : bad}`;
    case 'icmp':
      return `icmp type=${f.type} code=${f.code}${f.id !== undefined ? ` id=${f.id} seq=${f.seq}` : ''}${bad}`;
    case 'vxlan':
      return `vxlan vni=${f.vni}${f.flags !== 0x08 ? ` flags=${formatField('vxlan', 'flags', f.flags)}` : ''}`;
    case 'geneve':
      return `geneve vni=${f.vni}${f.optLen ? ` opts=${(f.optLen as number) * 4}B` : ''}${f.protocol !== 0x6558 ? ` proto=${formatField('geneve', 'protocol', f.protocol)}` : ''}`;
    case 'payload':
      return `${f.len}B`;
    default:
      return `${l.name} ${f.len}B`;
  }
}

/** One line: 'eth 02:..:01>02:..:02 | ipv4 10.0.0.1>10.0.0.2 tos=0x00 id=1 DF ttl=64 | tcp 1234>80 [S] | 12B'. */
export function describeFrame(buf: Uint8Array | DecodedFrame): string {
  const d = buf instanceof Uint8Array ? decodeFrame(buf) : buf;
  const parts = d.layers.map(describeLayer).filter((s): s is string => s !== undefined);
  if (d.error !== undefined) parts.push(`ERROR ${d.error}`);
  if (d.truncatedAt !== undefined) parts.push(`TRUNCATED ${d.truncatedAt}`);
  return parts.join(' | ');
}
