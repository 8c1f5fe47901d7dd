/**
 * One BPF map as its users see it: keys and values as the kernel's bytes, at
 * the offsets of dataplane/maps.ts. The agent's code (caches.ts, conntrack.ts,
 * policy.ts, nodes.ts) takes this interface rather than the libbpf class, so
 * that the cluster simulator runs that very code on its own tables
 * (sim/cluster/agent.ts), and the kernel's maps (libbpf.ts BpfMap) and the
 * simulator's are held to one contract.
 */

/** How an update treats a key already present (BPF_ANY, BPF_NOEXIST, BPF_EXIST). */
export type UpdateFlag = 'any' | 'noexist' | 'exist';

/** What update throws when the kernel refuses (libbpf.ts LibbpfError is one). */
export type MapError = Error & { code?: string };

/**
 * An update refused as the kernel refuses it throws an Error whose `code` is
 * the errno's name: 'EEXIST' (noexist, key present), 'ENOENT' (exist, key
 * absent), 'E2BIG' (the map is full).
 */
/**
 * A whole map as readAll() read it: entry i's key is keys[i * keySize, …),
 * its value values[i * valueSize, …) (the whole value: every CPU's for a
 * per-CPU map), for i < count.
 */
export interface MapSnapshot {
  count: number;
  keys: Buffer;
  values: Buffer;
  keySize: number;
  valueSize: number;
}

export interface MapOps {
  readonly maxEntries: number;
  /** The value, or undefined if the key is absent: a copy, never the map's own. */
  lookup(key: Buffer): Buffer | undefined;
  update(key: Buffer, value: Buffer, flags?: UpdateFlag): void;
  /** true if the key was there. */
  delete(key: Buffer): boolean;
  /**
   * Every [key, value] as of the call. The buffers are to read, never to
   * write (copy one to change it), and not to keep past the next batch read
   * of the same map: the simulator's tables reuse them.
   */
  lookupBatch(): Array<[Buffer, Buffer]>;
  /** As lookupBatch (the same contract), one entry at a time where the kernel does it so. */
  entries(): Array<[Buffer, Buffer]>;
  /** Deletes the keys; returns how many were present. */
  deleteBatch(keys: Buffer[]): number;
  /**
   * Every entry as of the call, packed into buffers the map keeps and reuses
   * (no object per entry, for the scans of whole caches): to read, and valid
   * until the next readAll of the same map.
   */
  readAll(): MapSnapshot;
  /** The value into the caller's buffer (a readAll value's size): true if the key was there. */
  lookupInto(key: Buffer, value: Buffer): boolean;
  /** deleteBatch of the first count keys packed one after another in keys. */
  deleteKeys(keys: Buffer, count: number): number;
}
