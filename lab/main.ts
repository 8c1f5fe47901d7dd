/**
 * The lab's entry point: `npm run lab -- up|down|status` (lab/cli.ts does the work).
 * A tool of the checkout, run from the sources by tsx; the product's `xmasq` knows
 * nothing of it.
 */
import { commandLine, intOption, UsageError, usageError } from '../testing/args.ts';
import { labDown, labStatus, labUp, printLabStatus } from './cli.ts';

const USAGE: Record<string, string> = {
  lab: `usage: npm run lab -- up [--name N] [--hosts N] [--pods N] [--no-offload] [--with-agents] [--k8s]
       npm run lab -- down [--name N]
       npm run lab -- status [--name N] [--json]

N hosts as network namespaces joined by a wire, with a Flannel-style VXLAN
overlay and pods from the real CNI plugins (see lab/README.md). Needs root;
everything it creates lives in its own namespaces. Progress goes to stderr.
npm run lab -- <command> --help for each command; npm run lab -- --version the checkout's version.`,
  up: `usage: npm run lab -- up [--name N] [--hosts N] [--pods N] [--no-offload] [--with-agents] [--k8s] [--json]

Creates the lab: hosts <N>-h1.., a wire, the overlay, and --pods pods per host
(<N>-h1-p1..) through the CNI chain bridge + host-local.

  --name N        the lab's name, the prefix of its namespaces (default xmq)
  --hosts N       hosts, 1..254 (default 2)
  --pods N        pods per host (default 2)
  --no-offload    checksum offload off on the wire and pod veths, so a capture
                  shows the checksums a receiver checks
  --with-agents   one xmasq-agent per host, left running in the background
                  (socket, pid file, log and state under
                  /run/xmasq-lab-agents/<name>/<host>, pins under
                  /sys/fs/bpf/xmasq-lab-<name>-<host>, /metrics on
                  127.0.0.1:9477 inside each host's netns); pods are created
                  after them, through the chain with the xmasq plugin last
  --k8s           the hosts are Kubernetes nodes: kube-proxy's iptables-mode
                  chains (KUBE-SERVICES, KUBE-MARK-MASQ, KUBE-POSTROUTING,
                  KUBE-FORWARD with its INVALID drop) and a policy engine's
                  LAB-POLICY chain on every host; declare Services and
                  policies with lab/k8s.ts (see lab/README.md)
  --json          print the lab's status as JSON when it is up

Talk to a host's agent with: npm run xmasq -- --socket /run/xmasq-lab-agents/<name>/h1/agent.sock status`,
  down: `usage: npm run lab -- down [--name N]

Stops the lab's agents (SIGTERM: they detach their filters), runs
xmasq-agent cleanup for each (pins, state), then deletes every pod (CNI DEL)
and namespace of the lab. Safe to repeat, and on a half-built lab.

  --name N        the lab's name (default xmq)`,
  status: `usage: npm run lab -- status [--name N] [--json]

The lab's hosts and pods, whether their namespaces exist, and for a lab with
agents: each agent's pid, mode, pods and counters, and whether each pod's masq
is attached. Exit status 1 when the lab is not up.

  --name N        the lab's name (default xmq)
  --json          as JSON`,
};

const progress = (line: string) => process.stderr.write(`lab: ${line}\n`);
const show = (json: boolean | undefined, human: string, raw: unknown) => process.stdout.write(`${json ? JSON.stringify(raw, null, 2) : human}\n`);

async function main(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub === undefined || sub === '--help' || sub === '-h' || sub === 'help') {
    process.stdout.write(`${USAGE.lab}\n`);
    return sub === undefined ? 2 : 0;
  }
  if (sub === '--version') {
    const { packageVersion } = await import('../dataplane/package.ts');
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  if (sub !== 'up' && sub !== 'down' && sub !== 'status') return usageError('lab', USAGE.lab, new Error(`unknown command "${sub}"; the commands are up, down, status`));
  const tool = `lab ${sub}`;
  const usage = USAGE[sub];
  if (sub === 'up') {
    const args = commandLine(tool, usage, rest, {
      name: { type: 'string' }, hosts: { type: 'string' }, pods: { type: 'string' },
      'no-offload': { type: 'boolean' }, 'with-agents': { type: 'boolean' }, k8s: { type: 'boolean' }, json: { type: 'boolean' },
    });
    if (typeof args === 'number') return args;
    const v = args.values;
    let hosts: number, pods: number;
    try {
      hosts = intOption('--hosts', v.hosts, 2, 1);
      pods = intOption('--pods', v.pods, 2, 0);
    } catch (e) {
      return usageError(tool, usage, e as Error);
    }
    await labUp({ name: v.name, hosts, pods, offload: !v['no-offload'], withAgents: v['with-agents'], k8s: v.k8s }, progress);
    const view = await labStatus(v.name);
    show(v.json, printLabStatus(view), view);
    return 0;
  }
  if (sub === 'down') {
    const args = commandLine(tool, usage, rest, { name: { type: 'string' } });
    if (typeof args === 'number') return args;
    await labDown(args.values.name, progress);
    return 0;
  }
  const args = commandLine(tool, usage, rest, { name: { type: 'string' }, json: { type: 'boolean' } });
  if (typeof args === 'number') return args;
  const view = await labStatus(args.values.name);
  show(args.values.json, printLabStatus(view), view);
  return view.up ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error) => {
    process.stderr.write(`lab: ${e instanceof UsageError ? '' : 'error: '}${e.message}\n`);
    process.exit(e instanceof UsageError ? 2 : 1);
  },
);
