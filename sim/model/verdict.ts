/** Twin of bpf/verdict.h. */
import { TC_CONTINUE, type RunEffects } from './state.ts';

export function pass(fx: RunEffects): number {
  fx.counters.PASSED++;
  return TC_CONTINUE;
}
