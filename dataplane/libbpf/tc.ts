/** TC attachment through libbpf's bpf_tc_* (cls_bpf filters on a clsact qdisc). */
import { E, LibbpfError, check } from './errors.ts';
import { native, STRUCT_SIZES, withLibbpfLog } from './native.ts';
import type { BpfProgram } from './program.ts';

export type TcHookPoint = 'ingress' | 'egress';
const TC_POINT = { ingress: 1, egress: 2 } as const; // BPF_TC_INGRESS, BPF_TC_EGRESS
const BPF_TC_F_REPLACE = 1;

function tcHook(ifindex: number, where: TcHookPoint, what: string): Record<string, number> {
  if (!Number.isInteger(ifindex) || ifindex <= 0) throw new Error(`${what}: ifindex must be a positive integer, got ${ifindex}`);
  const point = TC_POINT[where];
  if (!point) throw new Error(`${what}: where must be 'ingress' or 'egress', got ${String(where)}`);
  return { sz: STRUCT_SIZES.bpf_tc_hook, ifindex, attach_point: point, parent: 0 };
}

const TC_HINTS = {
  [E.EPERM]: 'are you root with CAP_NET_ADMIN and CAP_BPF?',
  [E.ENODEV]: 'no such interface in this network namespace',
  [E.EINVAL]: 'invalid hook or filter (is the program a SEC("tc") program?)',
};

/**
 * Attaches prog as a direct-action filter on the clsact qdisc of ifindex,
 * creating the qdisc if needed. Handle and priority default to 1; returns
 * what the kernel used, which tcDetach needs.
 */
export function tcAttach(ifindex: number, where: TcHookPoint, prog: BpfProgram,
  opts: { handle?: number; priority?: number; replace?: boolean } = {}): { handle: number; priority: number; progId: number } {
  const what = `tc attach of ${prog.name} to ifindex ${ifindex} ${where}`;
  const hook = tcHook(ifindex, where, what);
  const n = native();
  // One clsact qdisc serves both directions, so it exists already when the
  // other direction (or another program, or tc(8)) attached first: EEXIST
  // means the hook we need is there, not that something went wrong. (A plain
  // `ingress` qdisc in its place also gives EEXIST; then the attach below fails.)
  const { result: rc, log } = withLibbpfLog(() => n.bpf_tc_hook_create(hook));
  if (rc < 0 && rc !== -E.EEXIST) throw new LibbpfError(`creating the clsact qdisc for ${what}`, -rc, TC_HINTS[-rc], log);
  const o: Record<string, unknown> = {
    sz: STRUCT_SIZES.bpf_tc_opts, prog_fd: prog.fd, flags: opts.replace ? BPF_TC_F_REPLACE : 0, prog_id: 0,
    handle: opts.handle ?? 1, priority: opts.priority ?? 1,
  };
  check(what, () => n.bpf_tc_attach(hook, o), {
    ...TC_HINTS,
    [E.EEXIST]: `a filter already sits at handle ${o.handle} priority ${o.priority}: detach it or pass replace: true`,
  });
  return { handle: o.handle as number, priority: o.priority as number, progId: o.prog_id as number };
}

/** Removes the filter at handle/priority. */
export function tcDetach(ifindex: number, where: TcHookPoint, handle: number, priority: number): void {
  const what = `tc detach from ifindex ${ifindex} ${where} (handle ${handle}, priority ${priority})`;
  const hook = tcHook(ifindex, where, what);
  const o = { sz: STRUCT_SIZES.bpf_tc_opts, prog_fd: 0, flags: 0, prog_id: 0, handle, priority };
  check(what, () => native().bpf_tc_detach(hook, o), { ...TC_HINTS, [E.ENOENT]: 'no filter there (or no clsact qdisc)' });
}

/** The id of the program attached at handle/priority, or undefined if none is. */
export function tcQuery(ifindex: number, where: TcHookPoint, handle: number, priority: number): number | undefined {
  const what = `tc query of ifindex ${ifindex} ${where} (handle ${handle}, priority ${priority})`;
  const hook = tcHook(ifindex, where, what);
  const o: Record<string, unknown> = { sz: STRUCT_SIZES.bpf_tc_opts, prog_fd: 0, flags: 0, prog_id: 0, handle, priority };
  const { result: rc, log } = withLibbpfLog(() => native().bpf_tc_query(hook, o));
  // ENOENT: no filter there; EINVAL: no clsact qdisc at all on this device.
  if (rc === -E.ENOENT || rc === -E.EINVAL) return undefined;
  if (rc < 0) throw new LibbpfError(what, -rc, TC_HINTS[-rc], log);
  return o.prog_id as number;
}

/** Deletes the clsact qdisc of ifindex and with it every filter of both directions. */
export function tcDestroyHook(ifindex: number): void {
  const hook = tcHook(ifindex, 'ingress', `tc hook destroy on ifindex ${ifindex}`);
  hook.attach_point = TC_POINT.ingress | TC_POINT.egress;
  check(`destroying the clsact qdisc of ifindex ${ifindex}`, () => native().bpf_tc_hook_destroy(hook), {
    ...TC_HINTS, [E.ENOENT]: 'there is no clsact qdisc on this device',
  });
}
