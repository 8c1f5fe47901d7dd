/**
 * The `xmasq` CNI plugin as a process (built into dist/xmasq-cni.mjs, run by the `xmasq`
 * wrapper next to this file): env and stdin in, one JSON document on stdout, exit status
 * 0 or 1. The logic, the config fields and the error codes are in plugin.ts. A runtime
 * passes no arguments; --version and --help are for people.
 */
import { readFileSync } from 'node:fs';
import { DEFAULT_SOCKET } from '../agent/protocol.ts';
import { packageVersion } from '../package.ts';
import { DEFAULT_AGENT_TIMEOUT_MS, SUPPORTED_VERSIONS, runCni } from './plugin.ts';

const HELP = `usage: CNI_COMMAND=ADD|DEL|CHECK|STATUS|GC|VERSION CNI_CONTAINERID=… CNI_NETNS=… CNI_IFNAME=… CNI_PATH=… xmasq < config.json
       xmasq --help | --version

The xmasq CNI plugin, chained last after the plugin that wires the pod (bridge,
Calico, Antrea…): on ADD it tells this host's xmasq-agent about the pod (IPv4, MAC,
host-side veth) so the agent can attach masq; on DEL it has the agent purge every
cache entry of the pod's IP. It passes prevResult through unchanged.
A container runtime runs it, with the CNI_* variables set and the network config on
stdin (CNI ${SUPPORTED_VERSIONS.join(', ')}); it prints a result or a CNI error on stdout.

config fields of its own (all optional), in the chain's entry {"type": "xmasq", …}:
  "agentSocket"     the agent's unix socket (default ${DEFAULT_SOCKET})
  "required"        false (default): any agent problem is logged on stderr and the pod
                    comes up on the overlay alone; true: ADD and CHECK fail with a code
  "agentTimeoutMs"  how long one exchange with the agent may take (default ${DEFAULT_AGENT_TIMEOUT_MS})`;

const arg = process.argv[2];
if (arg === '--version' || arg === '--help' || arg === '-h') {
  process.stdout.write(`${arg === '--version' ? packageVersion() : HELP}\n`);
  process.exit(0);
}

function fail(msg: string): never {
  // Last resort for what runCni cannot catch (a throw in a socket callback): still a CNI
  // error on stdout, never a Node stack trace.
  process.stdout.write(`${JSON.stringify({ cniVersion: '1.1.0', code: 999, msg: `xmasq plugin bug: ${msg}`, details: '' })}\n`);
  process.exit(1);
}
process.on('uncaughtException', (e) => fail(e?.message ?? String(e)));
process.on('unhandledRejection', (e) => fail((e as Error)?.message ?? String(e)));

let stdin: string | undefined;
try {
  // A runtime always gives a pipe; a terminal means someone ran us by hand without input.
  stdin = process.stdin.isTTY ? '' : readFileSync(0, 'utf8');
} catch {
  stdin = undefined;
}

const { stdout, exitCode } = await runCni({ env: process.env, stdin, log: (line) => process.stderr.write(`${line}\n`) });
if (stdout) process.stdout.write(`${stdout}\n`);
// Exit now: a connect still pending after the agent deadline must not keep us alive.
// (stdout and stderr to pipes and files are synchronous on Linux, so nothing is lost.)
process.exit(exitCode);
