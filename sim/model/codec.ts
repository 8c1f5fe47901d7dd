/**
 * The struct codecs at a model table's boundary (state.ts HashTable): a value as the
 * model holds it (state.ts: addresses and MACs as numbers) to and from the kernel's
 * bytes and the layout's value (dataplane/maps.ts: addresses and MACs as text).
 */
import { bytesToIpv4, bytesToMac, ipv4ToBytes, macToBytes, type Field, type Struct } from '../../dataplane/layout.ts';
import { writeMac } from './packet.ts';

/**
 * A struct's values as the model holds them, to and from the C bytes: each
 * field at the layout's offset, ipv4 and mac fields as the numbers above, a
 * struct member as its own struct's model value.
 */
export class ModelCodec<M> {
  private readonly fields: readonly Field[];
  /** The bytes no field covers (pads, alignment holes): zero, as in the kernel's copy. */
  private readonly holes: readonly number[];
  /**
   * Writes every field of a value at its offset. toBytes runs for every entry
   * of every scan the agent makes; a loop over the fields reading v[name]
   * was a megamorphic keyed load per field, and Buffer's writers validate
   * their arguments through several calls. So the function is made once per
   * struct from the layout: a load by the field's literal name and a call
   * of the writer for its type, per field (writeFields below).
   */
  private readonly write: (b: Buffer, v: unknown, c: ModelCodec<unknown>) => void;

  constructor(readonly struct: Struct<never>) {
    this.fields = struct.fields.filter((f) => !(typeof f.type === 'object' && 'pad' in f.type));
    for (const f of this.fields) this.byName.set(f.name, f);
    const covered = new Uint8Array(struct.size);
    for (const f of this.fields) covered.fill(1, f.offset, f.offset + f.size);
    this.holes = [...covered.keys()].filter((i) => !covered[i]);
    this.write = writeFields(struct.name, this.fields);
  }

  /** The C bytes of a value; a field out of its type's range throws, as Buffer's writers do. */
  toBytes(m: M): Buffer {
    return this.writeBytes(Buffer.allocUnsafe(this.struct.size), m);
  }

  /** toBytes into b (the struct's size), every byte of it written; returns b. */
  writeBytes(b: Buffer, m: M): Buffer {
    this.write(b, m, this as ModelCodec<unknown>);
    const holes = this.holes;
    for (let i = 0; i < holes.length; i++) b[holes[i]] = 0;
    return b;
  }

  outOfRange(i: number, x: unknown): never {
    throw new RangeError(`struct ${this.struct.name}: field ${this.fields[i].name} = ${String(x)} is out of range for ${JSON.stringify(this.fields[i].type)}`);
  }

  fromBytes(b: Buffer): M {
    const v: Record<string, unknown> = {};
    for (const f of this.fields) {
      if (typeof f.type === 'object' && 'struct' in f.type) {
        v[f.name] = memberCodec(f).fromBytes(b.subarray(f.offset, f.offset + f.size));
        continue;
      }
      switch (f.type) {
        case 'ipv4': v[f.name] = b.readUInt32LE(f.offset); break;
        case 'mac': v[f.name] = b.readUIntBE(f.offset, 6); break;
        case 'u8': v[f.name] = b.readUInt8(f.offset); break;
        case 'u16': v[f.name] = b.readUInt16LE(f.offset); break;
        case 'u32': v[f.name] = b.readUInt32LE(f.offset); break;
        case 's32': v[f.name] = b.readInt32LE(f.offset); break;
        case 'u64': v[f.name] = b.readBigUInt64LE(f.offset); break;
        case 'be16': v[f.name] = b.readUInt16BE(f.offset); break;
        default: throw new Error(`struct ${this.struct.name}: field ${f.name} has no model form`);
      }
    }
    return v as M;
  }

  /** The layout's value (text addresses and MACs); encode validates it. */
  fromLayout(x: unknown): M {
    return this.fromBytes(this.struct.encode(x as never));
  }

  /** The layout's value, as decode would give it from toBytes (each field converted alone). */
  toLayout(m: M): unknown {
    const v: Record<string, unknown> = {};
    const mr = m as Record<string, unknown>;
    for (const f of this.fields) v[f.name] = layoutField(f, mr[f.name]);
    return v;
  }

  /**
   * The layout's value, live: reading a field reads the model's, writing one
   * writes it (converted, a bad address or MAC refused), as writing through a
   * map value pointer writes the map. Its own keys are the struct's fields.
   */
  view(m: M): unknown {
    return new Proxy(m as object, this.viewHandler);
  }

  private readonly byName = new Map<string | symbol, Field>();

  private readonly viewHandler: ProxyHandler<object> = {
    get: (m, name) => {
      const f = this.byName.get(name);
      const x = (m as Record<string | symbol, unknown>)[name];
      return f === undefined ? x : layoutField(f, x);
    },
    set: (m, name, x) => {
      const f = this.byName.get(name);
      if (f === undefined) return false;
      (m as Record<string, unknown>)[f.name] = modelField(f, x);
      return true;
    },
    getOwnPropertyDescriptor: (m, name) => {
      const f = this.byName.get(name);
      if (f === undefined) return Reflect.getOwnPropertyDescriptor(m, name);
      return { value: layoutField(f, (m as Record<string, unknown>)[f.name]), writable: true, enumerable: true, configurable: true };
    },
  };
}

/** A writer of one field: its bytes at b[at], or the codec's range error for field i. */
type FieldWriter = (b: Buffer, at: number, x: never, c: ModelCodec<unknown>, i: number) => void;

/**
 * The function that writes a struct's fields (ModelCodec.write): made with
 * new Function from the layout alone (field names, quoted by JSON.stringify,
 * offsets and types), so that each field's load has its name in the code.
 */
function writeFields(struct: string, fields: readonly Field[]): (b: Buffer, v: unknown, c: ModelCodec<unknown>) => void {
  const writers: Record<string, FieldWriter> = { ipv4: putU32, u32: putU32, s32: putS32, mac: putMac, u8: putU8, u16: putU16, be16: putBe16, u64: putU64 };
  const members: ModelCodec<unknown>[] = [];
  const lines = fields.map((f, i) => {
    if (typeof f.type === 'object' && 'struct' in f.type) {
      members.push(memberCodec(f));
      return `m[${members.length - 1}].writeBytes(b.subarray(${f.offset}, ${f.offset + f.size}), v[${JSON.stringify(f.name)}]);`;
    }
    if (typeof f.type !== 'string' || !(f.type in writers)) throw new Error(`struct ${struct}: field ${f.name} has no model form`);
    return `w.${f.type}(b, ${f.offset}, v[${JSON.stringify(f.name)}], c, ${i});`;
  });
  return new Function('w', 'm', `return function write(b, v, c) {\n${lines.join('\n')}\n};`)(writers, members);
}

/** The codec of a struct member's own struct. */
function memberCodec(f: Field): ModelCodec<unknown> {
  if (typeof f.type !== 'object' || !('struct' in f.type)) throw new Error(`field ${f.name} is not a struct member`);
  return new ModelCodec(f.type.struct as Struct<never>);
}

function putU8(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x & 0xff) !== x) c.outOfRange(i, x);
  b[at] = x;
}

function putU16(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x & 0xffff) !== x) c.outOfRange(i, x);
  b[at] = x;
  b[at + 1] = x >>> 8;
}

function putBe16(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x & 0xffff) !== x) c.outOfRange(i, x);
  b[at] = x >>> 8;
  b[at + 1] = x;
}

function putU32(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x >>> 0) !== x) c.outOfRange(i, x);
  b[at] = x;
  b[at + 1] = x >>> 8;
  b[at + 2] = x >>> 16;
  b[at + 3] = x >>> 24;
}

function putS32(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if ((x | 0) !== x) c.outOfRange(i, x);
  putU32(b, at, x >>> 0, c, i);
}

/** The model's 48-bit MAC number, first byte highest (readMac's form). */
function putMac(b: Buffer, at: number, x: number, c: ModelCodec<unknown>, i: number): void {
  if (!(x >= 0 && x <= 0xffffffffffff && Math.floor(x) === x)) c.outOfRange(i, x);
  writeMac(b, at, x);
}

/** A u64 bigint through DataView's own conversion: BigInt arithmetic would allocate. */
const u64Bytes = new Uint8Array(8);
const u64View = new DataView(u64Bytes.buffer);

function putU64(b: Buffer, at: number, x: bigint, c: ModelCodec<unknown>, i: number): void {
  if (typeof x !== 'bigint' || x < 0n || x > 0xffffffffffffffffn) c.outOfRange(i, x);
  u64View.setBigUint64(0, x, true);
  for (let j = 0; j < 8; j++) b[at + j] = u64Bytes[j];
}

const scratch = Buffer.alloc(8);

/** One field of the model's value as the layout gives it. */
function layoutField(f: Field, x: unknown): unknown {
  if (typeof f.type === 'object' && 'struct' in f.type) return memberCodec(f).toLayout(x);
  if (f.type === 'ipv4') {
    scratch.writeUInt32LE(x as number, 0);
    return bytesToIpv4(scratch, 0);
  }
  if (f.type === 'mac') {
    scratch.writeUIntBE(x as number, 0, 6);
    return bytesToMac(scratch, 0);
  }
  return x;
}

/** One field of a layout value as the model holds it. */
function modelField(f: Field, x: unknown): unknown {
  if (typeof f.type === 'object' && 'struct' in f.type) return memberCodec(f).fromLayout(x);
  if (f.type === 'ipv4') {
    ipv4ToBytes(x as string, scratch, 0);
    return scratch.readUInt32LE(0);
  }
  if (f.type === 'mac') {
    macToBytes(x as string, scratch, 0);
    return scratch.readUIntBE(0, 6);
  }
  return x;
}

/** A key's forms at a table's boundary: maps.ts's value and the kernel's bytes. */
export interface KeyCodec<K, MK> {
  toBytes(k: MK): Buffer;
  fromBytes(b: Buffer): MK;
  fromLayout(k: K): MK;
  toLayout(k: MK): K;
}

/** A struct key's codec, the key being the struct itself. */
export function structKeys<K, MK>(struct: Struct<never>): KeyCodec<K, MK> {
  const c = new ModelCodec<MK>(struct);
  return { toBytes: (k) => c.toBytes(k), fromBytes: (b) => c.fromBytes(b), fromLayout: (k) => c.fromLayout(k), toLayout: (k) => c.toLayout(k) as K };
}

/**
 * An address key (pod_info's struct pod_ip, nodes' struct node_ip), which
 * maps.ts gives as its one field, the address text; the model as its word.
 */
export function ipKeys(struct: Struct<never>): KeyCodec<string, number> {
  const c = new ModelCodec<{ ip: number }>(struct);
  return {
    toBytes: (ip) => c.toBytes({ ip }), fromBytes: (b) => c.fromBytes(b).ip,
    fromLayout: (ip) => c.fromLayout({ ip }).ip, toLayout: (ip) => (c.toLayout({ ip }) as { ip: string }).ip,
  };
}
