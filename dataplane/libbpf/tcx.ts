/**
 * tcx: BPF links on a device's TC ingress or egress (Linux 6.6+), the
 * successor of cls_bpf filters on a clsact qdisc (tc.ts). A link is a file
 * descriptor: the program runs while some fd or a bpffs pin holds the link,
 * so an attachment that must outlive the process is pinned. libbpf 1.1 has no
 * tcx API; its generic bpf_link_create passes the attach type and flags through.
 */
import { closeSync } from 'node:fs';
import { E, check } from './errors.ts';
import { LINK_CREATE_OPTS_SIZE, native, STRUCT_SIZES } from './native.ts';
import type { BpfProgram } from './program.ts';
import type { TcHookPoint } from './tc.ts';

/** enum bpf_attach_type values (uapi linux/bpf.h of 6.6+; Debian 12's headers predate them). */
const TCX_ATTACH = { ingress: 46, egress: 47 } as const; // BPF_TCX_INGRESS, BPF_TCX_EGRESS
/** Ahead of every program already on the hook (no relative program given). */
const BPF_F_BEFORE = 1 << 3;

const TCX_HINTS = {
  [E.EPERM]: 'are you root with CAP_NET_ADMIN and CAP_BPF?',
  [E.ENODEV]: 'no such interface in this network namespace',
  [E.EINVAL]: 'this kernel has no tcx (Linux 6.6+), or the program is not a SEC("tc") program',
};

let tcxCache: boolean | undefined;
/**
 * Whether the running kernel has tcx: a query of lo's tcx ingress succeeds
 * there and fails with EINVAL (an attach type it does not know) before 6.6.
 */
export function haveTcx(): boolean {
  if (tcxCache === undefined) {
    const o: Record<string, unknown> = { sz: STRUCT_SIZES.bpf_prog_query_opts, query_flags: 0, attach_flags: 0, prog_ids: null, prog_cnt: 0, prog_attach_flags: null };
    tcxCache = native().bpf_prog_query_opts(1, TCX_ATTACH.ingress, o) === 0;
  }
  return tcxCache;
}

/**
 * Links prog to ifindex's tcx hook in front of every program already there,
 * so it sees packets first, as a cls_bpf filter at priority 1 does. Returns
 * the link's fd: close it (closeLink) and the program leaves the hook, unless
 * the link was pinned on bpffs first.
 */
export function tcxAttach(ifindex: number, where: TcHookPoint, prog: BpfProgram): number {
  const what = `tcx attach of ${prog.name} to ifindex ${ifindex} ${where}`;
  const type = attachType(ifindex, where, what);
  const opts = { sz: LINK_CREATE_OPTS_SIZE, flags: BPF_F_BEFORE, pad: 0 };
  return check(what, () => native().bpf_link_create(prog.fd, ifindex, type, opts), TCX_HINTS);
}

/** The ids of the programs on ifindex's tcx hook, first to run first. */
export function tcxQuery(ifindex: number, where: TcHookPoint): number[] {
  const what = `tcx query of ifindex ${ifindex} ${where}`;
  const type = attachType(ifindex, where, what);
  const ids = Buffer.alloc(4 * 64);
  const o: Record<string, unknown> = { sz: STRUCT_SIZES.bpf_prog_query_opts, query_flags: 0, attach_flags: 0, prog_ids: ids, prog_cnt: 64, prog_attach_flags: null };
  check(what, () => native().bpf_prog_query_opts(ifindex, type, o), TCX_HINTS);
  return Array.from({ length: o.prog_cnt as number }, (_, i) => ids.readUInt32LE(4 * i));
}

/** Closes a link's fd: the last reference gone, its program leaves the hook. */
export function closeLink(linkFd: number): void {
  closeSync(linkFd);
}

function attachType(ifindex: number, where: TcHookPoint, what: string): number {
  if (!Number.isInteger(ifindex) || ifindex <= 0) throw new Error(`${what}: ifindex must be a positive integer, got ${ifindex}`);
  const t = TCX_ATTACH[where];
  if (!t) throw new Error(`${what}: where must be 'ingress' or 'egress', got ${String(where)}`);
  return t;
}
