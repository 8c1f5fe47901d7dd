/**
 * A minimal CNI runtime: runs the plugins of a network configuration list ("conflist") the
 * way a container runtime does (CNI spec 1.0.0, section "Network configuration lists"):
 * ADD in order, each plugin receiving the previous one's result as prevResult; DEL in reverse
 * order and CHECK in order, each receiving the cached final ADD result. The chain is plain data, so
 * an extra plugin (our own `xmasq` one, later) is appended by adding an entry to `plugins`.
 */
import { accessSync, constants } from 'node:fs';
import { join } from 'node:path';
import { netnsPath, run, type RunResult } from '../testing/command.ts';

export interface CniPluginConf {
  type: string;
  [key: string]: unknown;
}

export interface CniConfList {
  cniVersion: string;
  name: string;
  /** Spec: a runtime must not call CHECK for this network when set. */
  disableCheck?: boolean;
  plugins: CniPluginConf[];
}

export interface CniInterface {
  name: string;
  mac?: string;
  mtu?: number;
  /** Set for interfaces inside the container netns (the CNI_NETNS path). */
  sandbox?: string;
}

export interface CniIpConfig {
  address: string;
  gateway?: string;
  interface?: number;
}

export interface CniRoute {
  dst: string;
  gw?: string;
}

export interface CniResult {
  cniVersion: string;
  interfaces?: CniInterface[];
  ips?: CniIpConfig[];
  routes?: CniRoute[];
  dns?: Record<string, unknown>;
  [key: string]: unknown;
}

export interface CniInvocation {
  containerId: string;
  /** Name of the container's netns under /run/netns; passed to plugins as CNI_NETNS=/run/netns/<name>. */
  netns: string;
  ifname: string;
  /** Directories searched for plugin binaries, in order (CNI_PATH). */
  path: readonly string[];
  /** CNI_ARGS, e.g. { K8S_POD_NAME: 'web' }; IgnoreUnknown=1 is added so plugins that know none of them still run. */
  args?: Record<string, string>;
  /**
   * The netns (name under /run/netns) the plugins run in: the node's. Plugins create the
   * host-side objects (bridge, host end of the veth) in whatever netns they are started in.
   */
  pluginNetns?: string;
  /**
   * A mount namespace (a path such as /proc/<pid>/ns/mnt) the plugins run in: a node's own
   * view of the file system, where its /run/xmasq is (lab/kubelet-standin.ts).
   */
  pluginMountNs?: string;
  timeoutMs?: number;
}

export type CniCommand = 'ADD' | 'DEL' | 'CHECK';

/** Which Debian package provides the stock plugins, for the "not found" message. */
const STOCK_PLUGINS = new Set([
  'bandwidth', 'bridge', 'dhcp', 'firewall', 'host-device', 'host-local', 'ipvlan', 'loopback',
  'macvlan', 'portmap', 'ptp', 'sbr', 'static', 'tuning', 'vlan', 'vrf',
]);

export class CniError extends Error {
  constructor(
    readonly command: CniCommand,
    readonly plugin: string,
    /** CNI error code from the plugin's error JSON (spec section "Error"), or undefined when it printed none. */
    readonly code: number | undefined,
    readonly msg: string,
    readonly details: string | undefined,
    readonly result: RunResult | undefined,
    network: string,
    containerId: string,
  ) {
    super(
      `CNI ${command} failed in plugin "${plugin}" (network "${network}", container ${containerId})` +
        `${code !== undefined ? `, code ${code}` : ''}: ${msg}${details ? ` (${details})` : ''}`,
    );
    this.name = 'CniError';
  }
}

export class CniPluginMissingError extends Error {
  constructor(readonly plugin: string, readonly path: readonly string[]) {
    const hint = STOCK_PLUGINS.has(plugin)
      ? `install it with 'apt-get install containernetworking-plugins'`
      : `install its binary into one of those directories`;
    super(`CNI plugin "${plugin}" not found in ${path.join(':')}; ${hint}`);
    this.name = 'CniPluginMissingError';
  }
}

export function findPlugin(type: string, path: readonly string[]): string {
  // A type is a file name, never a path: "../x" in a config must not escape CNI_PATH.
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(type)) throw new Error(`invalid CNI plugin type ${JSON.stringify(type)}`);
  for (const dir of path) {
    const file = join(dir, type);
    try {
      accessSync(file, constants.X_OK);
      return file;
    } catch {
      // try the next directory
    }
  }
  throw new CniPluginMissingError(type, path);
}

/**
 * Every binary the list needs, including IPAM plugins, which the main plugins exec
 * themselves from CNI_PATH: checked up front so a missing host-local is reported by name
 * instead of as an error from deep inside the bridge plugin.
 */
export function checkPlugins(list: CniConfList, path: readonly string[]): void {
  for (const p of list.plugins) {
    findPlugin(p.type, path);
    const ipam = p.ipam as { type?: unknown } | undefined;
    if (ipam && typeof ipam.type === 'string') findPlugin(ipam.type, path);
  }
}

function cniArgs(args: Record<string, string> | undefined): string {
  const all = { IgnoreUnknown: '1', ...args };
  for (const [k, v] of Object.entries(all)) {
    if (/[;=]/.test(k) || v.includes(';')) throw new Error(`CNI_ARGS entry ${k}=${v} may not contain ';' (or '=' in the key)`);
  }
  return Object.entries(all).map(([k, v]) => `${k}=${v}`).join(';');
}

async function invoke(
  command: CniCommand,
  list: CniConfList,
  plugin: CniPluginConf,
  inv: CniInvocation,
  prevResult: CniResult | undefined,
): Promise<CniResult | undefined> {
  const bin = findPlugin(plugin.type, inv.path);
  // Spec: the runtime injects name and cniVersion from the list into each plugin's config.
  const conf: Record<string, unknown> = { ...plugin, cniVersion: list.cniVersion, name: list.name };
  if (prevResult) conf.prevResult = prevResult;
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('CNI_')) env[k] = v;
  Object.assign(env, {
    CNI_COMMAND: command,
    CNI_CONTAINERID: inv.containerId,
    CNI_NETNS: netnsPath(inv.netns),
    CNI_IFNAME: inv.ifname,
    CNI_ARGS: cniArgs(inv.args),
    CNI_PATH: inv.path.join(':'),
  });
  const enter = [...(inv.pluginMountNs ? [`--mount=${inv.pluginMountNs}`] : []), ...(inv.pluginNetns ? [`--net=${netnsPath(inv.pluginNetns)}`] : [])];
  const [cmd, args] = enter.length ? ['nsenter', [...enter, '--', bin]] : [bin, []];
  const r = await run(cmd, args, { input: JSON.stringify(conf), env, timeoutMs: inv.timeoutMs ?? 30_000 });
  const fail = (code: number | undefined, msg: string, details?: string) =>
    new CniError(command, plugin.type, code, msg, details, r, list.name, inv.containerId);
  if (r.code !== 0) {
    // Spec: on failure a plugin prints {code, msg, details} on stdout; older ones only write stderr.
    try {
      const e = JSON.parse(r.stdout) as { code?: number; msg?: string; details?: string };
      if (typeof e.msg === 'string') throw fail(e.code, e.msg, e.details);
    } catch (e) {
      if (e instanceof CniError) throw e;
    }
    throw fail(undefined, `exit status ${r.code}`, (r.stderr.trim() || r.stdout.trim()) || undefined);
  }
  if (command !== 'ADD') return undefined;
  // A chained plugin that only observes may print nothing; the chain result is then unchanged.
  if (r.stdout.trim() === '') return prevResult;
  try {
    return JSON.parse(r.stdout) as CniResult;
  } catch {
    throw fail(undefined, 'ADD printed something that is not JSON', r.stdout.slice(0, 200));
  }
}

/**
 * ADD. If a plugin fails, the whole chain is DELeted (reverse order, best effort) before the
 * error is thrown, as a runtime tears down a sandbox whose setup failed: the IP allocated by
 * an earlier plugin's IPAM would leak otherwise.
 */
export async function cniAdd(list: CniConfList, inv: CniInvocation): Promise<CniResult> {
  checkPlugins(list, inv.path);
  let result: CniResult | undefined;
  for (const plugin of list.plugins) {
    try {
      result = await invoke('ADD', list, plugin, inv, result);
    } catch (e) {
      try {
        await cniDel(list, inv, result);
      } catch (cleanup) {
        if (e instanceof Error) e.message += `\n  (cleanup DEL also failed: ${(cleanup as Error).message})`;
      }
      throw e;
    }
  }
  if (!result) throw new Error(`CNI network "${list.name}" has no plugins`);
  return result;
}

/**
 * DEL, in reverse order, every plugin receiving the final ADD result as prevResult. Unlike
 * libcni, which stops at the first failing plugin, every plugin is called and the errors
 * are reported together: one broken plugin should not leak the others' resources.
 */
export async function cniDel(list: CniConfList, inv: CniInvocation, prevResult?: CniResult): Promise<void> {
  const errors: Error[] = [];
  for (const plugin of [...list.plugins].reverse()) {
    try {
      await invoke('DEL', list, plugin, inv, prevResult);
    } catch (e) {
      errors.push(e as Error);
    }
  }
  if (errors.length === 1) throw errors[0];
  if (errors.length > 1) throw new Error(`CNI DEL failed in ${errors.length} plugins:\n  ${errors.map((e) => e.message).join('\n  ')}`);
}

/** CHECK, in list order like libcni; a no-op when the list sets disableCheck. */
export async function cniCheck(list: CniConfList, inv: CniInvocation, prevResult: CniResult): Promise<void> {
  if (list.disableCheck) return;
  for (const plugin of list.plugins) await invoke('CHECK', list, plugin, inv, prevResult);
}
