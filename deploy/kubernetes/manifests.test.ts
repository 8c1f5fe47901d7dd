/**
 * deploy/kubernetes/xmasq.yaml, checked without a cluster, three ways:
 *
 * - the API's own schema for each Kubernetes version we say we support, through
 *   kubernetes-models (1.27.1, 1.33.0 and 1.36.0; the README's "Kubernetes" section);
 * - no field the API does not know (the schema lets unknown fields through; kubectl's
 *   strict validation, and the API server's, would not): every key is looked up in the
 *   models' TypeScript types, for each version;
 * - what the API server checks beyond the schema (Bidirectional propagation only in a
 *   privileged container; every mount names a volume) and what XMasq needs: the agent's
 *   args parse with the agent's own parser, the probes ask where --metrics-listen
 *   listens, the preStop hook hands over with SIGUSR2 to the pid the command records,
 *   the mounts the agent and discovery use are there, every added capability is
 *   explained in a comment, the installer's args parse with the installer's parser.
 *
 * Each check is also run on broken copies of the manifest, which it must reject.
 *
 * kubernetes-models 4.4.2 (1.27.1) and 4.5.1 (1.33.0) are installed under aliases beside
 * 5.1.0 (1.36.0). 5.x declares Node.js 22 (npm ci warns EBADENGINE on 20): its validators
 * are plain generated JavaScript and run on 20, as this file shows.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import ts from 'typescript';
import { parseAllDocuments } from 'yaml';
import { beforeAll, describe, expect, it } from 'vitest';
import { ROOT } from '../../scripts/bundle.ts';
import { loadConfig, parseArgs, parseListen } from '../../dataplane/agent/config.ts';
import { parseInstallArgs } from '../../dataplane/cni/install.ts';

const FILE = join(ROOT, 'deploy/kubernetes/xmasq.yaml');
const TEXT = readFileSync(FILE, 'utf8');

/** The Kubernetes versions the manifest is validated for, and the package holding each one's schema. */
export const KUBERNETES_VERSIONS = { '1.27': 'kubernetes-models-1.27', '1.33': 'kubernetes-models-1.33', '1.36': 'kubernetes-models' } as const;
type Version = keyof typeof KUBERNETES_VERSIONS;

/** Where a model class and its interface live in kubernetes-models, by apiVersion and kind. */
const MODELS: Record<string, { module: string; iface: string }> = {
  'apps/v1 DaemonSet': { module: 'apps/v1/DaemonSet', iface: 'IDaemonSet' },
};

type Obj = Record<string, unknown>;
type Doc = Obj & { apiVersion: string; kind: string };
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);
const clone = <T>(v: T): T => structuredClone(v);

function load(text: string): Doc[] {
  return parseAllDocuments(text).map((d) => {
    if (d.errors.length) throw new Error(`YAML: ${d.errors.map((e) => e.message).join('; ')}`);
    return d.toJS() as Doc;
  }).filter(Boolean);
}

// --- the schema -------------------------------------------------------------------------

async function schemaErrors(doc: Doc, version: Version): Promise<string | undefined> {
  const m = MODELS[`${doc.apiVersion} ${doc.kind}`];
  if (!m) return `${doc.apiVersion} ${doc.kind}: not a kind this test knows (add it to MODELS)`;
  const mod = (await import(`${KUBERNETES_VERSIONS[version]}/${m.module}`)) as Record<string, new (d: unknown) => { validate(): void }>;
  try {
    new mod[doc.kind](doc).validate();
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}

// --- unknown fields, against the models' types ------------------------------------------

let checker: ts.TypeChecker;
const rootTypes = new Map<string, ts.Type>();

/** One program over the models' declarations: a virtual file declares one value per version and kind. */
function loadTypes(): void {
  const virtual = join(ROOT, 'deploy/kubernetes/__manifest_types__.ts');
  const lines: string[] = [];
  for (const [v, pkg] of Object.entries(KUBERNETES_VERSIONS)) {
    for (const [key, m] of Object.entries(MODELS)) {
      const id = `${m.iface}_${v.replace('.', '_')}`;
      lines.push(`import type { ${m.iface} as ${id} } from '${pkg}/${m.module}';`, `export declare const ${id}_value: ${id};`);
      rootTypes.set(`${v} ${key}`, undefined as unknown as ts.Type);
    }
  }
  const options: ts.CompilerOptions = { module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext, target: ts.ScriptTarget.ES2022, strict: true, noEmit: true, skipLibCheck: true, types: [] };
  const host = ts.createCompilerHost(options);
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (name, lang, ...rest) => name === virtual ? ts.createSourceFile(name, lines.join('\n'), lang) : getSourceFile(name, lang, ...rest);
  const fileExists = host.fileExists.bind(host);
  host.fileExists = (name) => name === virtual || fileExists(name);
  const program = ts.createProgram([virtual], options, host);
  checker = program.getTypeChecker();
  const sf = program.getSourceFile(virtual)!;
  const exports = checker.getExportsOfModule(checker.getSymbolAtLocation(sf)!);
  for (const [v] of Object.entries(KUBERNETES_VERSIONS)) {
    for (const [key, m] of Object.entries(MODELS)) {
      const sym = exports.find((s) => s.name === `${m.iface}_${v.replace('.', '_')}_value`);
      if (!sym) throw new Error(`no type for ${key} in Kubernetes ${v}`);
      const t = checker.getTypeOfSymbol(sym);
      if (checker.getPropertiesOfType(t).length === 0) throw new Error(`${m.iface} of ${KUBERNETES_VERSIONS[v as Version]} did not resolve`);
      rootTypes.set(`${v} ${key}`, t);
    }
  }
}

/** The object-shaped parts of a type (a union such as IntOrString, or T | undefined, narrowed). */
function objectParts(t: ts.Type): ts.Type[] {
  const parts = t.isUnion() ? t.types : [t];
  return parts.filter((p) => (p.flags & ts.TypeFlags.Object) !== 0);
}

/** Paths of keys in value that type does not declare. */
function unknownFields(value: unknown, t: ts.Type, path: string, out: string[]): void {
  if (Array.isArray(value)) {
    const arr = objectParts(t).find((p) => checker.isArrayType(p));
    if (!arr) return;
    const elem = checker.getTypeArguments(arr as ts.TypeReference)[0];
    value.forEach((v, i) => unknownFields(v, elem, `${path}[${i}]`, out));
    return;
  }
  if (!isObj(value)) return;
  const shapes = objectParts(t).filter((p) => !checker.isArrayType(p));
  if (!shapes.length) return;
  const shape = shapes[0];
  const index = checker.getIndexTypeOfType(shape, ts.IndexKind.String);
  for (const [k, v] of Object.entries(value)) {
    const prop = shape.getProperty(k);
    if (prop) unknownFields(v, checker.getTypeOfSymbol(prop), `${path}.${k}`, out);
    else if (index) unknownFields(v, index, `${path}.${k}`, out);
    else out.push(`${path}.${k}`);
  }
}

function unknownFieldsOf(doc: Doc, version: Version): string[] {
  const t = rootTypes.get(`${version} ${doc.apiVersion} ${doc.kind}`);
  if (!t) return [`${doc.apiVersion} ${doc.kind}: not a kind this test knows`];
  const out: string[] = [];
  unknownFields(doc, t, doc.kind, out);
  return out;
}

// --- the rules beyond the schema --------------------------------------------------------

interface Container extends Obj {
  name: string;
  command?: string[];
  args?: string[];
  securityContext?: { privileged?: boolean; capabilities?: { add?: string[]; drop?: string[] } };
  volumeMounts?: Array<{ name: string; mountPath: string; mountPropagation?: string; readOnly?: boolean }>;
  lifecycle?: { preStop?: { exec?: { command: string[] } } };
  livenessProbe?: { httpGet?: { host?: string; port: number | string; path: string } };
  readinessProbe?: Container['livenessProbe'];
  startupProbe?: Container['livenessProbe'];
}
interface PodSpec {
  hostNetwork?: boolean;
  hostPID?: boolean;
  containers: Container[];
  initContainers?: Container[];
  volumes?: Array<{ name: string; hostPath?: { path: string } }>;
}
const podSpec = (doc: Doc) => ((doc.spec as Obj).template as Obj).spec as unknown as PodSpec;
const container = (doc: Doc, name: string) => [...podSpec(doc).containers, ...(podSpec(doc).initContainers ?? [])].find((c) => c.name === name);

/** What is wrong with the DaemonSet as XMasq and the API server see it, beyond the schema. */
function problems(doc: Doc, text: string): string[] {
  const out: string[] = [];
  const spec = podSpec(doc);
  const all = [...(spec.initContainers ?? []), ...spec.containers];
  const volumes = new Map((spec.volumes ?? []).map((v) => [v.name, v]));
  const used = new Set<string>();
  for (const c of all) {
    for (const m of c.volumeMounts ?? []) {
      used.add(m.name);
      if (!volumes.has(m.name)) out.push(`${c.name}: mounts volume ${m.name}, which the pod does not have`);
      // The API server: "Bidirectional mount propagation is available only to privileged containers".
      if (m.mountPropagation === 'Bidirectional' && c.securityContext?.privileged !== true) out.push(`${c.name}: Bidirectional propagation on ${m.mountPath} needs a privileged container`);
    }
  }
  for (const v of volumes.keys()) if (!used.has(v)) out.push(`volume ${v} is mounted by no container`);
  if (!spec.hostNetwork) out.push('hostNetwork must be true: the agent works in the host\'s network namespace');
  if (!spec.hostPID) out.push('hostPID must be true: discovery opens /proc/<pid>/ns/net of the host\'s processes');

  const agent = container(doc, 'agent');
  if (!agent) return [...out, 'no container named agent'];
  // The agent's flags, through its own parser and checks (the command is `sh -c … exec xmasq-agent "$@"`).
  const cmd = agent.command ?? [];
  if (!/exec xmasq-agent "\$@"/.test(cmd[2] ?? '') || !/echo \$\$ > (\S+)/.test(cmd[2] ?? '')) out.push('agent: the command must record its pid and exec xmasq-agent "$@"');
  const pidFile = /echo \$\$ > (\S+)/.exec(cmd[2] ?? '')?.[1];
  let listen = '127.0.0.1:9477';
  try {
    const cfg = loadConfig(parseArgs(agent.args ?? []));
    if (cfg.metricsListen === 'off') out.push('agent: --metrics-listen off leaves the probes nothing to ask');
    else listen = cfg.metricsListen;
    for (const [dir, what] of [[cfg.pinDir, 'the pins'], [cfg.stateDir, 'the state files'], [cfg.socket, 'the socket']] as const) {
      if (!(agent.volumeMounts ?? []).some((m) => dir === m.mountPath || dir.startsWith(`${m.mountPath}/`))) out.push(`agent: ${what} (${dir}) are on no host mount: they would die with the container`);
    }
  } catch (e) {
    out.push(`agent args: ${(e as Error).message}`);
  }
  const { host, port } = parseListen(listen);
  for (const p of ['startupProbe', 'livenessProbe', 'readinessProbe'] as const) {
    const g = agent[p]?.httpGet;
    if (!g) out.push(`agent: no ${p} on /healthz`);
    else if (g.path !== '/healthz' || Number(g.port) !== port || (g.host ?? '<pod IP>') !== host) out.push(`agent: ${p} asks ${g.host ?? '<pod IP>'}:${g.port}${g.path}, the agent serves /healthz on ${listen}`);
  }
  const preStop = agent.lifecycle?.preStop?.exec?.command.join(' ') ?? '';
  if (!pidFile || !preStop.includes(`cat ${pidFile}`) || !/kill -USR2 \$pid/.test(preStop)) out.push(`agent: preStop must send SIGUSR2 to the pid in ${pidFile ?? 'the pid file'} (hand-over)`);
  if (pidFile && !(agent.volumeMounts ?? []).some((m) => pidFile.startsWith(`${m.mountPath}/`))) out.push(`agent: the pid file ${pidFile} is on no mount`);
  const mounts = new Map((agent.volumeMounts ?? []).map((m) => [m.mountPath, m]));
  if (mounts.get('/sys/fs/bpf')?.mountPropagation !== 'HostToContainer') out.push('agent: /sys/fs/bpf must be the host\'s, HostToContainer');
  if (mounts.get('/var/run/netns')?.mountPropagation !== 'HostToContainer') out.push('agent: /var/run/netns must be the host\'s, HostToContainer (pods made later)');
  if (agent.securityContext?.privileged) out.push('agent: privileged; the capabilities suffice');
  const caps = agent.securityContext?.capabilities;
  if (!caps?.drop?.includes('ALL')) out.push('agent: capabilities must drop ALL and add what it needs');
  for (const cap of ['BPF', 'NET_ADMIN']) if (!caps?.add?.includes(cap)) out.push(`agent: capability ${cap} missing (the agent checks for it at start)`);
  for (const cap of caps?.add ?? []) if (!new RegExp(`^\\s*# ${cap}: `, 'm').test(text)) out.push(`agent: capability ${cap} has no comment saying what it is for`);

  for (const name of ['install-cni', 'cni-chain']) {
    const c = container(doc, name);
    if (!c) {
      out.push(`no container ${name}`);
      continue;
    }
    try {
      const p = parseInstallArgs(c.args ?? [], { root: '/opt/xmasq', node: '/usr/local/bin/node' });
      if (p.command !== 'install' || p.watch !== (name === 'cni-chain')) out.push(`${name}: must run install${name === 'cni-chain' ? ' --watch' : ''}`);
      for (const dir of [p.options.binDir, p.options.netDir]) if (!(c.volumeMounts ?? []).some((m) => m.mountPath === dir)) out.push(`${name}: ${dir} is not a host mount`);
    } catch (e) {
      out.push(`${name} args: ${(e as Error).message}`);
    }
  }
  if (!spec.initContainers?.some((c) => c.name === 'install-cni')) out.push('install-cni must be an init container');
  return out;
}

// --- the tests --------------------------------------------------------------------------

let docs: Doc[];
let ds: Doc;
beforeAll(() => {
  docs = load(TEXT);
  ds = docs.find((d) => d.kind === 'DaemonSet')!;
  loadTypes();
});

describe('deploy/kubernetes/xmasq.yaml', () => {
  it('is one DaemonSet in kube-system, and nothing that needs RBAC', () => {
    expect(docs.map((d) => `${d.apiVersion} ${d.kind}`)).toEqual(['apps/v1 DaemonSet']);
    expect((ds.metadata as Obj).namespace).toBe('kube-system');
  });

  for (const v of Object.keys(KUBERNETES_VERSIONS) as Version[]) {
    it(`passes the schema of Kubernetes ${v}, with no field it does not know`, async () => {
      for (const d of docs) {
        expect(await schemaErrors(d, v)).toBeUndefined();
        expect(unknownFieldsOf(d, v)).toEqual([]);
      }
    });
  }

  it('gives the agent what it needs, and nothing checks fail', () => {
    expect(problems(ds, TEXT)).toEqual([]);
  });
});

describe('broken copies of it are rejected', () => {
  const broken = (edit: (d: Doc) => void) => {
    const d = clone(ds);
    edit(d);
    return d;
  };

  it('by the schema: a wrong type, a missing required field, a value outside an enum', async () => {
    const cases: Array<[Doc, RegExp]> = [
      [broken((d) => { (container(d, 'agent')!.livenessProbe!.httpGet!.port as unknown) = [9477]; }), /port/],
      [broken((d) => { delete (d.spec as Obj).selector; }), /selector/],
      [broken((d) => { container(d, 'agent')!.volumeMounts![0].mountPropagation = 'Both'; }), /mountPropagation|allowed values/],
    ];
    for (const v of Object.keys(KUBERNETES_VERSIONS) as Version[]) {
      for (const [d, why] of cases) expect(await schemaErrors(d, v), `Kubernetes ${v}`).toMatch(why);
    }
  });

  it('by the field check: a misspelt field, wherever it is', () => {
    const d = broken((x) => {
      const m = container(x, 'agent')!.volumeMounts![0] as Obj;
      m.mountPropogation = m.mountPropagation;
      delete m.mountPropagation;
      (podSpec(x) as unknown as Obj).hostPid = true;
    });
    for (const v of Object.keys(KUBERNETES_VERSIONS) as Version[]) {
      expect(unknownFieldsOf(d, v).sort()).toEqual(['DaemonSet.spec.template.spec.containers[0].volumeMounts[0].mountPropogation', 'DaemonSet.spec.template.spec.hostPid']);
    }
  });

  it('by the field check: a field newer than the oldest version supported', () => {
    // appArmorProfile came with Kubernetes 1.30: the 1.27 schema does not know it.
    const d = broken((x) => { (container(x, 'agent')!.securityContext as Obj).appArmorProfile = { type: 'Unconfined' }; });
    expect(unknownFieldsOf(d, '1.27')).toEqual(['DaemonSet.spec.template.spec.containers[0].securityContext.appArmorProfile']);
    expect(unknownFieldsOf(d, '1.33')).toEqual([]);
  });

  it('by the rules: Bidirectional without privileged, a flag the agent does not have, probes on another port, no hand-over, a capability without a reason', () => {
    const cases: Array<[(d: Doc) => void, string, RegExp]> = [
      [(d) => { delete container(d, 'mount-bpffs')!.securityContext!.privileged; }, TEXT, /mount-bpffs: Bidirectional propagation on \/sys\/fs\/bpf needs a privileged container/],
      [(d) => { container(d, 'agent')!.args = ['--service-cdir', '10.96.0.0/12']; }, TEXT, /agent args: unknown flag --service-cdir/],
      [(d) => { container(d, 'agent')!.args = ['--service-cidr', '10.96.0.1/12']; }, TEXT, /has host bits set/],
      [(d) => { container(d, 'agent')!.args = ['--metrics-listen', '127.0.0.1:9478']; }, TEXT, /livenessProbe asks 127.0.0.1:9477\/healthz, the agent serves \/healthz on 127.0.0.1:9478/],
      [(d) => { delete container(d, 'agent')!.readinessProbe!.httpGet!.host; }, TEXT, /readinessProbe asks <pod IP>:9477/],
      [(d) => { container(d, 'agent')!.lifecycle!.preStop!.exec!.command = ['sh', '-c', 'kill -TERM 1']; }, TEXT, /preStop must send SIGUSR2/],
      [(d) => { container(d, 'agent')!.volumeMounts = container(d, 'agent')!.volumeMounts!.filter((m) => m.name !== 'run-xmasq'); }, TEXT, /the state files \(\/run\/xmasq\) are on no host mount/],
      [(d) => { container(d, 'agent')!.securityContext!.capabilities!.add!.push('SYS_MODULE'); }, TEXT, /capability SYS_MODULE has no comment/],
      [(d) => { container(d, 'agent')!.securityContext!.capabilities!.add = ['SYS_ADMIN']; }, TEXT, /capability BPF missing/],
      [(d) => { container(d, 'cni-chain')!.args = ['install', '--bin-dir', '/host/opt/cni/bin', '--net-dir', '/host/etc/cni/net.d']; }, TEXT, /cni-chain: must run install --watch/],
      [(d) => { container(d, 'install-cni')!.args = ['install', '--net-dir', '/etc/cni/net.d']; }, TEXT, /install-cni: \/opt\/cni\/bin is not a host mount/],
      [(d) => { (podSpec(d) as unknown as Obj).hostPID = false; }, TEXT, /hostPID must be true/],
    ];
    for (const [edit, text, why] of cases) {
      const found = problems(broken(edit), text);
      expect(found.some((p) => why.test(p)), `${why}: got ${JSON.stringify(found)}`).toBe(true);
    }
  });
});
