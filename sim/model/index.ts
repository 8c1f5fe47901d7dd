/** The datapath model: one pure-ish function per BPF program (state is mutated in place, as maps are). */
export { init } from './init.ts';
export { restore } from './restore.ts';
export { masq } from './masq.ts';
export * from './state.ts';
