/**
 * The `xmasq` CNI plugin, last in a chain after the plugin that wires the pod
 * (bridge, ptp…). It changes nothing in the result: it tells the host's
 * xmasq-agent about the pod (ADD) or that it is gone (DEL), so the agent can
 * attach masq and, on DEL, purge every cache entry of the pod's IP before
 * IPAM can hand that IP to another pod (DEL runs in reverse order, so this
 * plugin's DEL runs before the IPAM plugin's).
 *
 * Network config fields (all optional):
 *   "agentSocket": the agent's socket (default /run/xmasq/agent.sock)
 *   "required":    fail ADD when the agent is unreachable (default false: the
 *                  pod then works on the overlay alone, and the error is logged)
 *
 * Protocol: CNI spec 1.0 — env CNI_COMMAND/CNI_CONTAINERID/CNI_NETNS/
 * CNI_IFNAME/CNI_PATH, network config on stdin, result on stdout, errors as
 * {"cniVersion","code","msg","details"} on stdout with a non-zero exit.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { AgentClient, AgentNotRunningError, DEFAULT_SOCKET } from '../agent/protocol.ts';

const SUPPORTED = ['0.4.0', '1.0.0'];

interface CniInterface { name: string; mac?: string; sandbox?: string }
interface CniResult { cniVersion?: string; interfaces?: CniInterface[]; ips?: Array<{ address: string; interface?: number }> }
interface NetConf { cniVersion: string; name: string; type: string; agentSocket?: string; required?: boolean; prevResult?: CniResult }

class CniFailure extends Error {
  constructor(readonly code: number, msg: string, readonly details = '') {
    super(msg);
  }
}

/** The pod as the agent wants it, from the result of the plugins before us. */
export function podFromResult(r: CniResult | undefined, ifname: string): { ip: string; mac: string; hostVeth: string } {
  if (!r?.interfaces?.length || !r.ips?.length) {
    throw new CniFailure(7, 'xmasq must be chained after a plugin that creates the pod interface (no prevResult with interfaces and ips)');
  }
  const podIdx = r.interfaces.findIndex((i) => i.name === ifname && i.sandbox);
  if (podIdx < 0) throw new CniFailure(7, `prevResult has no interface "${ifname}" in a sandbox`);
  const ip = r.ips.find((x) => x.interface === podIdx && x.address.includes('.')) ?? r.ips.find((x) => x.address.includes('.'));
  if (!ip) throw new CniFailure(7, 'prevResult has no IPv4 address for the pod (xmasq accelerates IPv4 only)');
  // The host end of the pod's veth: the non-sandbox interface that is not the bridge.
  // bridge lists [bridge, host veth, pod]; ptp lists [host veth, pod].
  const hostSide = r.interfaces.filter((i) => !i.sandbox);
  const hostVeth = hostSide.length > 1 ? hostSide[hostSide.length - 1] : hostSide[0];
  if (!hostVeth) throw new CniFailure(7, 'prevResult has no host-side interface for the pod');
  const mac = r.interfaces[podIdx].mac;
  if (!mac) throw new CniFailure(7, `prevResult gives no MAC for ${ifname}`);
  return { ip: ip.address.split('/')[0], mac, hostVeth: hostVeth.name };
}

function ifindexOf(dev: string): number {
  try {
    return JSON.parse(execFileSync('ip', ['-j', 'link', 'show', 'dev', dev], { encoding: 'utf8' }))[0].ifindex;
  } catch {
    throw new CniFailure(11, `host-side veth "${dev}" not found in the host network namespace`);
  }
}

async function main(): Promise<string | undefined> {
  const cmd = process.env.CNI_COMMAND;
  if (cmd === 'VERSION') return JSON.stringify({ cniVersion: '1.0.0', supportedVersions: SUPPORTED });
  let conf: NetConf;
  try {
    conf = JSON.parse(readFileSync(0, 'utf8'));
  } catch (e) {
    throw new CniFailure(6, `network config on stdin is not JSON: ${(e as Error).message}`);
  }
  if (!SUPPORTED.includes(conf.cniVersion)) throw new CniFailure(1, `cniVersion ${conf.cniVersion} is not supported (${SUPPORTED.join(', ')})`);
  const socket = conf.agentSocket ?? DEFAULT_SOCKET;
  const ifname = process.env.CNI_IFNAME ?? 'eth0';
  const netns = process.env.CNI_NETNS ?? '';
  const out = JSON.stringify({ ...(conf.prevResult ?? {}), cniVersion: conf.cniVersion });

  switch (cmd) {
    case 'ADD': {
      const pod = podFromResult(conf.prevResult, ifname);
      const hostVethIfindex = ifindexOf(pod.hostVeth);
      try {
        await AgentClient.request(socket, { op: 'add', pod: { ip: pod.ip, mac: pod.mac, hostVethIfindex, netns: netns || undefined, ifname } });
      } catch (e) {
        if (e instanceof AgentNotRunningError && !conf.required) {
          process.stderr.write(`xmasq: ${e.message}; pod ${pod.ip} stays on the overlay\n`);
        } else {
          throw new CniFailure(11, `xmasq-agent refused pod ${pod.ip}: ${(e as Error).message}`);
        }
      }
      return out;
    }
    case 'DEL': {
      // DEL must succeed when there is nothing to undo; the agent also drops
      // pods whose veth is gone when it starts.
      const ip = conf.prevResult?.ips?.find((x) => x.address.includes('.'))?.address.split('/')[0];
      if (!ip) return undefined;
      try {
        await AgentClient.request(socket, { op: 'del', ip });
      } catch (e) {
        if (!(e instanceof AgentNotRunningError)) throw new CniFailure(11, `xmasq-agent could not forget pod ${ip}: ${(e as Error).message}`);
        process.stderr.write(`xmasq: ${e.message}; nothing to forget for ${ip}\n`);
      }
      return undefined;
    }
    case 'CHECK': {
      const pod = podFromResult(conf.prevResult, ifname);
      const r = await AgentClient.request(socket, { op: 'list' });
      if (!r.pods.some((p) => p.ip === pod.ip && p.attached)) throw new CniFailure(11, `xmasq-agent has no attached pod ${pod.ip}`);
      return undefined;
    }
    default:
      throw new CniFailure(4, `unknown CNI_COMMAND "${cmd ?? ''}" (want ADD, DEL, CHECK or VERSION)`);
  }
}

main().then(
  (out) => {
    if (out) process.stdout.write(`${out}\n`);
  },
  (e: unknown) => {
    const f = e instanceof CniFailure ? e : new CniFailure(999, (e as Error).message ?? String(e));
    process.stdout.write(`${JSON.stringify({ cniVersion: '1.0.0', code: f.code, msg: f.message, details: f.details })}\n`);
    process.exitCode = 1;
  },
);
