/**
 * A tiny C-struct codec: a struct is a list of typed fields laid out with the
 * C alignment rules of the BPF target (natural alignment, size rounded up to
 * the largest member's alignment). maps.ts describes every map with it, and
 * layout.test.ts holds the result against the object's BTF.
 */

/** How a field is stored in C, and what TypeScript value it decodes to. */
export type FieldType =
  | 'u8' | 'u16' | 'u32' | 'u64'   // host order (little-endian) numbers; u64 as bigint
  | 's32'                           // host order signed 32-bit
  | 'be16'                          // network-order 16-bit (ports): a number
  | 'be32'                          // network-order 32-bit: a number
  | 'ipv4'                          // network-order IPv4 address: dotted string
  | 'mac'                           // 6 bytes: 'aa:bb:cc:dd:ee:ff'
  | { pad: number }                 // zero bytes
  | { u8array: number }             // fixed array of u8: number[]
  | { struct: Struct<Fields> };     // a struct member: its decoded value

type Decoded<T extends FieldType> =
  T extends 'u64' ? bigint :
  T extends 'ipv4' | 'mac' ? string :
  T extends { pad: number } ? undefined :
  T extends { u8array: number } ? number[] :
  T extends { struct: Struct<infer G> } ? StructValue<G> :
  number;

export interface FieldSpec { readonly name: string; readonly type: FieldType }
export interface Field extends FieldSpec { readonly offset: number; readonly size: number }

export type Fields = readonly (readonly [string, FieldType])[];
export type StructValue<F extends Fields> = {
  [K in F[number] as K[1] extends { pad: number } ? never : K[0]]: Decoded<K[1]>;
};

function sizeOf(t: FieldType): number {
  if (typeof t === 'object') return 'pad' in t ? t.pad : 'u8array' in t ? t.u8array : t.struct.size;
  return { u8: 1, u16: 2, u32: 4, s32: 4, u64: 8, be16: 2, be32: 4, ipv4: 4, mac: 6 }[t];
}

function alignOf(t: FieldType): number {
  if (typeof t === 'object') return 'struct' in t ? t.struct.align : 1;
  if (t === 'mac') return 1;
  return t === 'ipv4' || t === 'be32' ? 4 : t === 'be16' ? 2 : sizeOf(t);
}

export function macToBytes(mac: string, into: Buffer, at: number): void {
  const parts = mac.split(':');
  if (parts.length !== 6) throw new Error(`bad MAC address "${mac}": want six hex bytes like 02:00:00:00:00:01`);
  for (let i = 0; i < 6; i++) {
    const b = Number.parseInt(parts[i], 16);
    if (!(b >= 0 && b <= 255) || !/^[0-9a-fA-F]{1,2}$/.test(parts[i])) {
      throw new Error(`bad MAC address "${mac}": "${parts[i]}" is not a hex byte`);
    }
    into[at + i] = b;
  }
}

export function bytesToMac(buf: Uint8Array, at: number): string {
  let s = '';
  for (let i = 0; i < 6; i++) s += (i ? ':' : '') + buf[at + i].toString(16).padStart(2, '0');
  return s;
}

export function ipv4ToBytes(ip: string, into: Buffer, at: number): void {
  const parts = ip.split('.');
  if (parts.length !== 4 || parts.some((p) => !/^\d{1,3}$/.test(p) || Number(p) > 255)) {
    throw new Error(`bad IPv4 address "${ip}": want four decimal bytes like 10.244.1.5`);
  }
  for (let i = 0; i < 4; i++) into[at + i] = Number(parts[i]);
}

export function bytesToIpv4(buf: Uint8Array, at: number): string {
  return `${buf[at]}.${buf[at + 1]}.${buf[at + 2]}.${buf[at + 3]}`;
}

export class Struct<F extends Fields> {
  readonly fields: readonly Field[];
  readonly size: number;
  /** Its largest member's alignment: where it starts as a member of another struct. */
  readonly align: number;

  constructor(readonly name: string, spec: F) {
    let off = 0;
    let maxAlign = 1;
    const fields: Field[] = [];
    for (const [fname, type] of spec) {
      const a = alignOf(type);
      maxAlign = Math.max(maxAlign, a);
      off = Math.ceil(off / a) * a;
      fields.push({ name: fname, type, offset: off, size: sizeOf(type) });
      off += sizeOf(type);
    }
    this.fields = fields;
    this.align = maxAlign;
    this.size = Math.ceil(off / maxAlign) * maxAlign;
  }

  field(name: string): Field {
    const f = this.fields.find((x) => x.name === name);
    if (!f) throw new Error(`struct ${this.name} has no field ${name}`);
    return f;
  }

  encode(value: StructValue<F>): Buffer {
    const buf = Buffer.alloc(this.size);
    const v = value as Record<string, unknown>;
    for (const f of this.fields) {
      if (typeof f.type === 'object' && 'pad' in f.type) continue;
      const x = v[f.name];
      if (x === undefined) throw new Error(`struct ${this.name}: field ${f.name} is missing`);
      writeField(buf, f, x);
    }
    return buf;
  }

  decode(buf: Uint8Array): StructValue<F> {
    if (buf.length < this.size) {
      throw new Error(`struct ${this.name} needs ${this.size} bytes, got ${buf.length}`);
    }
    const b = Buffer.from(buf.buffer, buf.byteOffset, buf.length);
    const out: Record<string, unknown> = {};
    for (const f of this.fields) {
      if (typeof f.type === 'object' && 'pad' in f.type) continue;
      out[f.name] = readField(b, f);
    }
    return out as StructValue<F>;
  }

  /** A value with every field zero, as a freshly created C struct. */
  zero(): StructValue<F> {
    return this.decode(Buffer.alloc(this.size));
  }
}

function writeField(buf: Buffer, f: Field, x: unknown): void {
  const t = f.type;
  if (typeof t === 'object') {
    if ('struct' in t) t.struct.encode(x as never).copy(buf, f.offset);
    if (!('u8array' in t)) return;
    const arr = x as number[];
    for (let i = 0; i < t.u8array; i++) buf[f.offset + i] = arr[i] ?? 0;
    return;
  }
  switch (t) {
    case 'u8': buf.writeUInt8(x as number, f.offset); break;
    case 'u16': buf.writeUInt16LE(x as number, f.offset); break;
    case 'u32': buf.writeUInt32LE(x as number, f.offset); break;
    case 's32': buf.writeInt32LE(x as number, f.offset); break;
    case 'u64': buf.writeBigUInt64LE(x as bigint, f.offset); break;
    case 'be16': buf.writeUInt16BE(x as number, f.offset); break;
    case 'be32': buf.writeUInt32BE(x as number, f.offset); break;
    case 'ipv4': ipv4ToBytes(x as string, buf, f.offset); break;
    case 'mac': macToBytes(x as string, buf, f.offset); break;
  }
}

function readField(buf: Buffer, f: Field): unknown {
  const t = f.type;
  if (typeof t === 'object') {
    if ('struct' in t) return t.struct.decode(buf.subarray(f.offset, f.offset + f.size));
    return Array.from(buf.subarray(f.offset, f.offset + f.size));
  }
  switch (t) {
    case 'u8': return buf.readUInt8(f.offset);
    case 'u16': return buf.readUInt16LE(f.offset);
    case 'u32': return buf.readUInt32LE(f.offset);
    case 's32': return buf.readInt32LE(f.offset);
    case 'u64': return buf.readBigUInt64LE(f.offset);
    case 'be16': return buf.readUInt16BE(f.offset);
    case 'be32': return buf.readUInt32BE(f.offset);
    case 'ipv4': return bytesToIpv4(buf, f.offset);
    case 'mac': return bytesToMac(buf, f.offset);
  }
}
