/** The datapath model: one function per BPF program (state is mutated in place, as maps are). */
export { init, initInPlace } from './init.ts';
export { restore, restoreInPlace } from './restore.ts';
export { masq, masqInPlace } from './masq.ts';
export * from './maps.ts';
export * from './state.ts';
