/**
 * Address and byte-string conversions. Parsers are strict and throw, because
 * they read hand-written fixtures where a typo should fail loudly; formatters
 * never throw, because the decoder must describe whatever bytes it is given.
 */

export function ipToBytes(ip: string): Uint8Array {
  const parts = ip.split('.');
  const out = new Uint8Array(4);
  // Leading zeros are refused because inet_aton reads "010" as octal 8.
  if (parts.length !== 4 || parts.some((p) => !/^(0|[1-9]\d{0,2})$/.test(p) || Number(p) > 255)) {
    throw new Error(`bad IPv4 address "${ip}": want four decimal bytes like 10.0.0.1`);
  }
  for (let i = 0; i < 4; i++) out[i] = Number(parts[i]);
  return out;
}

export function bytesToIp(b: Uint8Array, off = 0): string {
  return `${b[off]}.${b[off + 1]}.${b[off + 2]}.${b[off + 3]}`;
}

/** '1.2.3.4' -> 0x01020304: the number whose big-endian bytes are the address. */
export function ipToU32(ip: string): number {
  const b = ipToBytes(ip);
  return ((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]) >>> 0;
}

export function u32ToIp(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new Error(`bad IPv4 number ${n}`);
  return `${n >>> 24}.${(n >>> 16) & 0xff}.${(n >>> 8) & 0xff}.${n & 0xff}`;
}

/** Accepts '::' compression and a dotted IPv4 tail ('::ffff:10.0.0.1'). */
export function ip6ToBytes(ip: string): Uint8Array {
  const bad = (why: string) => new Error(`bad IPv6 address "${ip}": ${why}`);
  const halves = ip.split('::');
  if (halves.length > 2) throw bad('more than one "::"');
  const words = (s: string, last: boolean): number[] => {
    if (s === '') return [];
    const out: number[] = [];
    const groups = s.split(':');
    groups.forEach((g, i) => {
      if (last && i === groups.length - 1 && g.includes('.')) {
        const v4 = ipToBytes(g);
        out.push((v4[0] << 8) | v4[1], (v4[2] << 8) | v4[3]);
      } else if (/^[0-9a-fA-F]{1,4}$/.test(g)) {
        out.push(parseInt(g, 16));
      } else {
        throw bad(`"${g}" is not a 16-bit hex group`);
      }
    });
    return out;
  };
  const head = words(halves[0], halves.length === 1);
  const tail = halves.length === 2 ? words(halves[1], true) : [];
  const missing = 8 - head.length - tail.length;
  if (halves.length === 1 ? missing !== 0 : missing < 1) throw bad('want eight 16-bit groups');
  const all = [...head, ...new Array<number>(halves.length === 2 ? missing : 0).fill(0), ...tail];
  const out = new Uint8Array(16);
  all.forEach((w, i) => {
    out[2 * i] = w >> 8;
    out[2 * i + 1] = w & 0xff;
  });
  return out;
}

/** RFC 5952 canonical text: lowercase, no leading zeros, longest zero run (>= 2 groups) as '::'. */
export function bytesToIp6(b: Uint8Array, off = 0): string {
  const w: number[] = [];
  for (let i = 0; i < 8; i++) w.push((b[off + 2 * i] << 8) | b[off + 2 * i + 1]);
  let bestAt = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (w[i] !== 0) { i++; continue; }
    let j = i;
    while (j < 8 && w[j] === 0) j++;
    if (j - i > bestLen) { bestAt = i; bestLen = j - i; }
    i = j;
  }
  const hex = (ws: number[]) => ws.map((x) => x.toString(16)).join(':');
  if (bestAt < 0) return hex(w);
  return `${hex(w.slice(0, bestAt))}::${hex(w.slice(bestAt + bestLen))}`;
}

export function macToBytes(mac: string): Uint8Array {
  const parts = mac.split(/[:-]/);
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{1,2}$/.test(p))) {
    throw new Error(`bad MAC address "${mac}": want six hex bytes like 02:00:00:00:00:01`);
  }
  return Uint8Array.from(parts, (p) => parseInt(p, 16));
}

export function bytesToMac(b: Uint8Array, off = 0): string {
  let s = '';
  for (let i = 0; i < 6; i++) s += (i ? ':' : '') + hex2(b[off + i]);
  return s;
}

function hex2(x: number): string {
  return (x ?? 0).toString(16).padStart(2, '0');
}

/** Separators (whitespace, ':', '-', '_', '.') and a leading '0x' are ignored so dumps can be pasted. */
export function hexToBytes(hex: string): Uint8Array {
  const clean = hex.replace(/^0x/i, '').replace(/[\s:_.-]/g, '');
  if (clean.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(clean)) {
    throw new Error(`bad hex string "${hex.length > 40 ? hex.slice(0, 40) + '…' : hex}": want an even number of hex digits`);
  }
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.substr(2 * i, 2), 16);
  return out;
}

export function bytesToHex(b: Uint8Array, start = 0, end = b.length): string {
  let s = '';
  for (let i = start; i < end; i++) s += hex2(b[i]);
  return s;
}

/**
 * Byte content in a form fixtures can store as JSON: a hex string, an array
 * of byte values, `{ascii}` text, or `{len, fill}` for sized filler where
 * `fill: 'counter'` makes byte i equal i & 0xff so offsets are visible in a dump.
 */
export type Bytes =
  | Uint8Array
  | number[]
  | string
  | { ascii: string }
  | { len: number; fill?: number | 'counter' };

export function toBytes(b: Bytes): Uint8Array {
  if (b instanceof Uint8Array) return b;
  if (typeof b === 'string') return hexToBytes(b);
  if (Array.isArray(b)) {
    b.forEach((x, i) => {
      if (!Number.isInteger(x) || x < 0 || x > 255) throw new Error(`bad byte ${x} at index ${i}`);
    });
    return Uint8Array.from(b);
  }
  if ('ascii' in b) return new TextEncoder().encode(b.ascii);
  if (!Number.isInteger(b.len) || b.len < 0) throw new Error(`bad byte length ${b.len}`);
  const out = new Uint8Array(b.len);
  if (b.fill === 'counter') for (let i = 0; i < b.len; i++) out[i] = i & 0xff;
  else if (b.fill !== undefined) {
    if (!Number.isInteger(b.fill) || b.fill < 0 || b.fill > 255) throw new Error(`bad fill byte ${b.fill}`);
    out.fill(b.fill);
  }
  return out;
}
