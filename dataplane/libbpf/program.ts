/** Loaded programs: their fd and id, pins, and BPF_PROG_TEST_RUN with an __sk_buff context. */
import { unlinkSync } from 'node:fs';
import { E, LibbpfError, check } from './errors.ts';
import { native, STRUCT_SIZES, type Ptr } from './native.ts';
import type { BpfObject } from './object.ts';

export interface TestRunResult {
  /** The program's return code (TC_ACT_*, XDP_*, ...). */
  retval: number;
  /** The packet after the program, data_size_out bytes long. */
  data: Buffer;
  /** The context after the program, when one was passed in. */
  ctx?: Buffer;
  /** Average run time per repetition, as measured by the kernel. */
  durationNs: number;
}

export class BpfProgram {
  /** @internal */
  constructor(private readonly obj: BpfObject, readonly name: string, private readonly ptr: Ptr) {}

  private get label(): string {
    return `program '${this.name}' of ${this.obj.path}`;
  }

  get fd(): number {
    this.obj.assertOpen(this.label);
    const fd = native().bpf_program__fd(this.ptr);
    if (fd < 0) throw new Error(`${this.label} has no fd: load the object first (and keep its autoload on)`);
    return fd;
  }

  /** The kernel's id of the loaded program, as tcQuery() reports it. */
  get id(): number {
    // bpf_prog_info starts with type and id; the kernel copies only as much
    // as we ask for, so 8 bytes spare us mirroring its 200-odd byte layout.
    const buf = Buffer.alloc(8);
    const fd = this.fd;
    check(`reading id of ${this.label}`, () => native().bpf_obj_get_info_by_fd(fd, buf, [buf.length]));
    return buf.readUInt32LE(4);
  }

  /**
   * BPF_PROG_TEST_RUN. data_out is sized data.length + 256 unless
   * dataSizeOut says otherwise, so programs may grow the packet; the returned
   * data is cut to the length the kernel reports.
   */
  testRun(opts: { data: Buffer; ctx?: Buffer; repeat?: number; dataSizeOut?: number }): TestRunResult {
    const fd = this.fd;
    const outSize = opts.dataSizeOut ?? opts.data.length + 256;
    const dataOut = Buffer.alloc(outSize);
    const ctxOut = opts.ctx ? Buffer.alloc(opts.ctx.length) : null;
    const o: Record<string, unknown> = {
      sz: STRUCT_SIZES.bpf_test_run_opts,
      data_in: opts.data, data_out: dataOut, data_size_in: opts.data.length, data_size_out: outSize,
      ctx_in: opts.ctx ?? null, ctx_out: ctxOut, ctx_size_in: opts.ctx?.length ?? 0, ctx_size_out: ctxOut?.length ?? 0,
      retval: 0, repeat: opts.repeat ?? 1, duration: 0, flags: 0, cpu: 0, batch_size: 0,
    };
    const rc = native().bpf_prog_test_run_opts(fd, o);
    if (rc < 0) {
      throw new LibbpfError(`test run of ${this.label}`, -rc, {
        [E.ENOSPC]: `the output is ${o.data_size_out} bytes, more than dataSizeOut (${outSize})`,
        [E.EINVAL]: `for skb programs the packet must hold at least an Ethernet header (14 bytes) and the ctx at most ${SK_BUFF_SIZE} bytes with only mark, priority, ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size, hwtstamp set`,
        [E.ENODEV]: 'ctx.ifindex names no interface in this network namespace (use 1, lo, or 0)',
      }[-rc]);
    }
    const result: TestRunResult = {
      // A TC verdict is an int: TC_ACT_UNSPEC comes back as -1, not 2^32 - 1.
      retval: (o.retval as number) | 0,
      data: dataOut.subarray(0, Math.min(o.data_size_out as number, outSize)),
      durationNs: o.duration as number,
    };
    if (ctxOut) result.ctx = ctxOut.subarray(0, Math.min(o.ctx_size_out as number, ctxOut.length));
    return result;
  }

  /** Pins the program at path on a BPF file system. */
  pin(path: string): void {
    const fd = this.fd;
    check(`pinning ${this.label} at ${path}`, () => native().bpf_obj_pin(fd, path), {
      [E.EEXIST]: `something is already pinned at ${path}: unpin it first`,
    });
  }

  unpin(path: string): void {
    try {
      unlinkSync(path);
    } catch (e) {
      throw new Error(`unpinning ${this.label} from ${path} failed: ${(e as Error).message}`);
    }
  }
}

// ---------------------------------------------------------------------------
// struct __sk_buff for BPF_PROG_TEST_RUN
// ---------------------------------------------------------------------------

/** sizeof(struct __sk_buff) in /usr/include/linux/bpf.h (and in the objects' BTF). */
export const SK_BUFF_SIZE = 192;
/** uapi offsets of the __sk_buff fields skbCtx() writes. */
export const SK_BUFF_OFFSETS = { mark: 8, priority: 32, ingress_ifindex: 36, ifindex: 40, cb: 48 } as const;

export interface SkbFields {
  ifindex?: number;
  ingressIfindex?: number;
  mark?: number;
  priority?: number;
}

/**
 * A zeroed __sk_buff with a few fields set, for testRun's ctx. The kernel
 * refuses (EINVAL) a ctx with anything but mark, priority, ingress_ifindex,
 * ifindex, cb[], tstamp, wire_len, gso_segs, gso_size or hwtstamp non-zero,
 * and an ifindex above 1 must exist in the caller's network namespace (ENODEV).
 */
export function skbCtx(f: SkbFields = {}): Buffer {
  const b = Buffer.alloc(SK_BUFF_SIZE);
  b.writeUInt32LE(f.mark ?? 0, SK_BUFF_OFFSETS.mark);
  b.writeUInt32LE(f.priority ?? 0, SK_BUFF_OFFSETS.priority);
  b.writeUInt32LE(f.ingressIfindex ?? 0, SK_BUFF_OFFSETS.ingress_ifindex);
  b.writeUInt32LE(f.ifindex ?? 0, SK_BUFF_OFFSETS.ifindex);
  return b;
}

/** The fields skbCtx() writes, read back from a testRun ctx. */
export function readSkbCtx(b: Buffer): Required<SkbFields> {
  return {
    mark: b.readUInt32LE(SK_BUFF_OFFSETS.mark),
    priority: b.readUInt32LE(SK_BUFF_OFFSETS.priority),
    ingressIfindex: b.readUInt32LE(SK_BUFF_OFFSETS.ingress_ifindex),
    ifindex: b.readUInt32LE(SK_BUFF_OFFSETS.ifindex),
  };
}
