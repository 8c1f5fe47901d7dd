/**
 * tcx: BPF links on a device's TC ingress or egress (Linux 6.6+), the
 * successor of cls_bpf filters on a clsact qdisc (tc.ts). A link is a file
 * descriptor: the program runs while some fd or a bpffs pin holds the link,
 * so an attachment that must outlive the process is pinned. libbpf 1.1 has no
 * tcx API; its generic bpf_link_create passes the attach type and flags through.
 */
import { closeSync, readFileSync } from 'node:fs';
import { E, check } from './errors.ts';
import { LINK_CREATE_OPTS_SIZE, native, STRUCT_SIZES } from './native.ts';
import type { BpfProgram } from './program.ts';
import type { TcHookPoint } from './tc.ts';

/** enum bpf_attach_type values (uapi linux/bpf.h of 6.6+; Debian 12's headers predate them). */
const TCX_ATTACH = { ingress: 46, egress: 47 } as const; // BPF_TCX_INGRESS, BPF_TCX_EGRESS
/** Ahead of every program already on the hook (no relative program given). */
const BPF_F_BEFORE = 1 << 3;
/** enum bpf_link_type: BPF_LINK_TYPE_TCX. */
const LINK_TYPE_TCX = 11;
/**
 * struct bpf_link_info: type, id, prog_id, then a union aligned to 8 whose
 * tcx member is { ifindex, attach_type }. The kernel fills what it knows and
 * wants the bytes past its own struct zero, so a roomy buffer is fine.
 */
const LINK_INFO = { size: 128, type: 0, id: 4, progId: 8, tcxIfindex: 16, tcxAttachType: 20 } as const;

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
 * Links prog to ifindex's tcx hook, by default in front of every program
 * already there, so that it sees packets first, as a cls_bpf filter at
 * priority 1 does; `last` puts it behind them instead (another project's
 * program attached after ours). Returns the link's fd: close it (closeLink)
 * and the program leaves the hook, unless the link was pinned first.
 */
export function tcxAttach(ifindex: number, where: TcHookPoint, prog: BpfProgram, opts: { last?: boolean } = {}): number {
  const what = `tcx attach of ${prog.name} to ifindex ${ifindex} ${where}`;
  const type = attachType(ifindex, where, what);
  const o = { sz: LINK_CREATE_OPTS_SIZE, flags: opts.last ? 0 : BPF_F_BEFORE, pad: 0 };
  return check(what, () => native().bpf_link_create(prog.fd, ifindex, type, o), TCX_HINTS);
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

export interface TcxLinkInfo {
  /** The link's kernel id (bpftool link show). */
  id: number;
  progId: number;
  /** 0 once the device is gone: the link holds no hook any more (defunct). */
  ifindex: number;
  where: TcHookPoint | undefined;
}

/** What a tcx link's fd says of it; throws if the fd is no tcx link. */
export function tcxLinkInfo(linkFd: number, label = `link fd ${linkFd}`): TcxLinkInfo {
  // bpf_obj_get_info_by_fd fills whatever info matches the fd: make sure it is a link first.
  const fdinfo = readFileSync(`/proc/self/fdinfo/${linkFd}`, 'utf8');
  if (!/^link_type:/m.test(fdinfo)) throw new Error(`${label} is not a BPF link (fdinfo: ${fdinfo.split('\n').slice(0, 4).join('; ')})`);
  const buf = Buffer.alloc(LINK_INFO.size);
  check(`reading the info of ${label}`, () => native().bpf_obj_get_info_by_fd(linkFd, buf, [buf.length]));
  const type = buf.readUInt32LE(LINK_INFO.type);
  if (type !== LINK_TYPE_TCX) throw new Error(`${label} is a BPF link of type ${type}, not tcx (${LINK_TYPE_TCX})`);
  const at = buf.readUInt32LE(LINK_INFO.tcxAttachType);
  return {
    id: buf.readUInt32LE(LINK_INFO.id),
    progId: buf.readUInt32LE(LINK_INFO.progId),
    ifindex: buf.readUInt32LE(LINK_INFO.tcxIfindex),
    where: at === TCX_ATTACH.ingress ? 'ingress' : at === TCX_ATTACH.egress ? 'egress' : undefined,
  };
}

/**
 * Puts prog on the hook a link holds in place of its program, atomically
 * (BPF_LINK_UPDATE): the hook never runs without one, and the link keeps
 * its place among the hook's programs.
 */
export function tcxLinkUpdate(linkFd: number, prog: BpfProgram, label = `link fd ${linkFd}`): void {
  check(`replacing the program of ${label} with ${prog.name}`, () => native().bpf_link_update(linkFd, prog.fd, null), {
    ...TCX_HINTS,
    [E.ENOLINK]: 'the link is defunct: its device is gone',
  });
}

/** Takes a link's program off its hook now, whoever else holds the link (BPF_LINK_DETACH). */
export function tcxLinkDetach(linkFd: number, label = `link fd ${linkFd}`): void {
  check(`detaching ${label}`, () => native().bpf_link_detach(linkFd), TCX_HINTS);
}

/** Pins a link on bpffs: it then outlives every fd, this process's included. */
export function pinLink(linkFd: number, path: string): void {
  check(`pinning link fd ${linkFd} at ${path}`, () => native().bpf_obj_pin(linkFd, path), {
    [E.EEXIST]: `something is already pinned at ${path}: unpin it first`,
    [E.ENOENT]: 'the parent directory does not exist on the BPF file system',
  });
}

/** Opens a pinned link; undefined when nothing is pinned there. */
export function openPinnedLink(path: string): number | undefined {
  const fd = native().bpf_obj_get(path);
  if (fd === -E.ENOENT) return undefined;
  return check(`opening the link pinned at ${path}`, () => fd, { [E.EPERM]: 'are you root with CAP_BPF?' });
}

/** Closes a link's fd: the last reference gone (no pin either), its program leaves the hook. */
export function closeLink(linkFd: number): void {
  closeSync(linkFd);
}

function attachType(ifindex: number, where: TcHookPoint, what: string): number {
  if (!Number.isInteger(ifindex) || ifindex <= 0) throw new Error(`${what}: ifindex must be a positive integer, got ${ifindex}`);
  const t = TCX_ATTACH[where];
  if (!t) throw new Error(`${what}: where must be 'ingress' or 'egress', got ${String(where)}`);
  return t;
}
