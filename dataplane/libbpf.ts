/**
 * Typed bindings to the system libbpf (libbpf.so.1, written against 1.1.2)
 * through koffi, one concern per file in dataplane/libbpf/:
 *   native.ts   the FFI: libbpf and libc functions, the structs they take, libbpf's log
 *   errors.ts   LibbpfError: operation, errno name, hint, verifier log
 *   object.ts   BpfObject: open, load, programs and maps, close
 *   map.ts      BpfMap: lookups, updates, batches, pins
 *   program.ts  BpfProgram: fd, id, pins, BPF_PROG_TEST_RUN and its __sk_buff
 *   tc.ts       cls_bpf filters on a clsact qdisc
 *   tcx.ts      tcx links (Linux 6.6+): attach, query, pin, update in place, detach
 *   netns.ts    withNetns: libbpf calls inside another network namespace
 * Callers import from here.
 */
export { koffiLayout, setLibbpfLogger, STRUCT_SIZES, type LibbpfLogLevel } from './libbpf/native.ts';
export { errnoName, LibbpfError } from './libbpf/errors.ts';
export { BpfObject } from './libbpf/object.ts';
export { BpfMap, MapType, possibleCpus } from './libbpf/map.ts';
export { BpfProgram, readSkbCtx, SK_BUFF_OFFSETS, SK_BUFF_SIZE, skbCtx, type SkbFields, type TestRunResult } from './libbpf/program.ts';
export { tcAttach, tcDestroyHook, tcDetach, tcQuery, type TcHookPoint } from './libbpf/tc.ts';
export { withNetns } from './libbpf/netns.ts';
export { closeLink, haveTcx, openPinnedLink, pinLink, tcxAttach, tcxLinkDetach, tcxLinkInfo, tcxLinkUpdate, tcxQuery, type TcxLinkInfo } from './libbpf/tcx.ts';
