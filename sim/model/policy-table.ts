/**
 * Twin of policy_table (bpf/maps.h), a BPF_MAP_TYPE_ARRAY of struct
 * policy_slot: slots 0..maxEntries-1, each zero (ALLOW) until written. Only
 * the slots holding something else are kept.
 */
import { arrayIndex, policySlot } from '../../dataplane/maps.ts';

export class PolicySlots {
  private readonly slots = new Map<number, number>();

  constructor(readonly maxEntries: number) {}

  /** Slots holding something other than 0. */
  get size(): number {
    return this.slots.size;
  }

  /** C: bpf_map_lookup_elem: the slot's next, or undefined past the array's end (the C's NULL). */
  lookup(slot: number): number | undefined {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.maxEntries) return undefined;
    return this.slots.get(slot) ?? 0;
  }

  /** A slot as the agent writes it; false past the end (the kernel's E2BIG). */
  update(slot: number, next: number): boolean {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.maxEntries) return false;
    if (next === 0) this.slots.delete(slot);
    else this.slots.set(slot, next >>> 0);
    return true;
  }

  /** The slots holding something other than 0, by index. */
  entries(): Array<[number, number]> {
    return [...this.slots].sort((a, b) => a[0] - b[0]);
  }

  updateBytes(k: Buffer, v: Buffer): boolean {
    return this.update(arrayIndex.decode(k).index, policySlot.decode(v).next);
  }

  entriesBytes(): Array<[Buffer, Buffer]> {
    return this.entries().map(([slot, next]) => [arrayIndex.encode({ index: slot }), policySlot.encode({ next })]);
  }

  clone(): PolicySlots {
    const t = new PolicySlots(this.maxEntries);
    for (const [k, v] of this.slots) t.slots.set(k, v);
    return t;
  }
}
