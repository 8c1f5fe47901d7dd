/**
 * Chaining `xmasq` into the node's primary CNI network configuration: which file a runtime
 * uses, and that file with our entry last in its plugin list. Pure functions on names and
 * text; install.ts does the files.
 *
 * Which file: libcni (containerd's CRI plugin, CRI-O, kubelet's old dockershim) lists the
 * files of the config directory ending in .conf, .conflist or .json, sorted by name, and
 * the runtime uses the first it can load. Flannel writes 10-flannel.conflist, Calico
 * 10-calico.conflist, Antrea 10-antrea.conflist: each the first file of a directory it owns.
 */

/** What a runtime reads in the config directory (libcni's ConfFiles). */
export const CONF_EXTENSIONS = ['.conf', '.conflist', '.json'] as const;

/** The entry we chain, as the README documents it. */
export const XMASQ_ENTRY = { type: 'xmasq', agentSocket: '/run/xmasq/agent.sock' } as const;

/** The cniVersions the plugin speaks (plugin.ts SUPPORTED_VERSIONS); a list in another one is not ours to join. */
const CHAINABLE_VERSIONS = ['0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0'];

export class ConflistError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConflistError';
  }
}

/** The file a runtime takes from a directory listing, or undefined when none would do. */
export function primaryConfName(names: readonly string[]): string | undefined {
  return [...names].filter((n) => !n.startsWith('.') && CONF_EXTENSIONS.some((e) => n.endsWith(e))).sort()[0];
}

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);
const isXmasq = (p: unknown) => isObject(p) && p.type === XMASQ_ENTRY.type;

function parse(text: string, file: string): Json & { plugins: unknown[] } {
  let obj: unknown;
  try {
    obj = JSON.parse(text);
  } catch (e) {
    throw new ConflistError(`${file}: not JSON (${(e as Error).message}); the overlay may be writing it: it is read again on its next change`);
  }
  if (!isObject(obj)) throw new ConflistError(`${file}: not a JSON object`);
  if (!Array.isArray(obj.plugins)) {
    throw new ConflistError(`${file}: a single-plugin config (no "plugins" list), which cannot be chained; ` +
      `give the overlay a .conflist, or name one with --conflist`);
  }
  if (!obj.plugins.every(isObject)) throw new ConflistError(`${file}: "plugins" holds something that is not an object`);
  return obj as Json & { plugins: unknown[] };
}

export interface Chained {
  /** The file's new text (the old one when nothing changed). */
  text: string;
  changed: boolean;
}

/** The text of a conflist as we write it: two-space JSON and a final newline. */
const render = (obj: Json) => `${JSON.stringify(obj, null, 2)}\n`;

/**
 * The conflist with exactly one xmasq entry, `entry`, last in "plugins"; every other plugin,
 * and every other key, as it was, in its order. Unchanged (the same text) when it already
 * ends with that entry and holds no other: running it again writes nothing.
 */
export function chainXmasq(text: string, file: string, entry: Json = XMASQ_ENTRY): Chained {
  const conf = parse(text, file);
  const version = conf.cniVersion;
  if (typeof version !== 'string' || !CHAINABLE_VERSIONS.includes(version)) {
    throw new ConflistError(`${file}: cniVersion ${JSON.stringify(version)} is not one the xmasq plugin speaks (${CHAINABLE_VERSIONS.join(', ')})`);
  }
  const others = conf.plugins.filter((p) => !isXmasq(p));
  const last = conf.plugins[conf.plugins.length - 1];
  if (others.length === conf.plugins.length - 1 && isXmasq(last) && JSON.stringify(last) === JSON.stringify(entry)) {
    return { text, changed: false };
  }
  if (others.length === 0) throw new ConflistError(`${file}: holds no plugin but xmasq; the overlay's plugin must come first`);
  return { text: render({ ...conf, plugins: [...others, entry] }), changed: true };
}

/** The conflist without any xmasq entry (an uninstall); unchanged when it has none. */
export function unchainXmasq(text: string, file: string): Chained {
  const conf = parse(text, file);
  const others = conf.plugins.filter((p) => !isXmasq(p));
  if (others.length === conf.plugins.length) return { text, changed: false };
  return { text: render({ ...conf, plugins: others }), changed: true };
}

/** Whether the conflist ends with an xmasq entry (status, tests). */
export function isChained(text: string, file: string): boolean {
  const conf = parse(text, file);
  return isXmasq(conf.plugins[conf.plugins.length - 1]);
}
