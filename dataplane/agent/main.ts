/**
 * xmasq-agent entry point: `xmasq-agent [run]` serves one host until SIGTERM or
 * SIGINT; `xmasq-agent cleanup` removes what an agent left behind.
 * Built into dist/xmasq-agent.mjs (npm run build), which runs with plain node.
 */
import { existsSync } from 'node:fs';
import { basename } from 'node:path';
import { withNetns } from '../libbpf.ts';
import { packageVersion } from '../package.ts';
import { Agent, resolveNic } from './agent.ts';
import { ConfigError, USAGE, loadConfig, parseArgs, type AgentConfig } from './config.ts';
import { detachOurs, LINK_PIN_PREFIX, unpinAll } from './datapath.ts';
import { LOG_FORMATS, stderrLog, type Log, type LogFormat } from './log.ts';
import { ifIndexToName, ifNameToIndex } from './native.ts';
import { socketInUse } from './server.ts';
import { StateDir } from './state.ts';

async function run(cfg: AgentConfig, log: Log): Promise<number> {
  /*
   * The stop signals' listeners are installed once, before start, and never
   * removed. A stop signal while starting must not kill the process by default
   * action, half attached: it is held and acted on once start has settled (a
   * failed start undoes itself). And swapping listeners loses signals: Node
   * closes a signal's handle with its last listener, and a signal the kernel
   * delivered to the old handle but the loop had not yet read is dropped (a
   * SIGTERM sent right after the ready line was lost that way).
   */
  let early: NodeJS.Signals | undefined;
  let act: ((sig: NodeJS.Signals) => void) | undefined;
  const onStopSignal = (sig: NodeJS.Signals) => {
    if (act) return act(sig);
    if (early) return;
    early = sig;
    log.info(`${sig} while starting: acting on it once started`);
  };
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGUSR2'] as const) process.on(sig, onStopSignal);
  // The pid is the one to signal (SIGUSR2 for a hand-over): a supervisor such as npm may stand
  // between. Logged once the listeners are in place, so a signal sent on seeing it is never fatal.
  log.info(`xmasq-agent ${packageVersion()}, pid ${process.pid}, node ${process.version}`);
  const agent = new Agent(cfg, log);
  await agent.start();
  return new Promise<number>((resolve) => {
    let stopping = false;
    let handover = false;
    act = (sig) => {
      if (stopping) {
        // A kubelet's SIGTERM follows the preStop hook's SIGUSR2 (deploy/kubernetes): the hand-over goes on.
        if (handover) log.info(`${sig} while handing over: the hand-over goes on`);
        else if (sig !== 'SIGUSR2') log.warn(`${sig} again while stopping: still detaching, please wait`);
        return;
      }
      stopping = true;
      // SIGUSR2: stop for an upgrade or restart, leaving the datapath running.
      handover = sig === 'SIGUSR2';
      log.info(handover ? 'SIGUSR2: handing over (filters stay attached)' : `${sig}: stopping`);
      agent.stop(handover ? { handover: true } : undefined).then(({ errors }) => resolve(errors.length ? 1 : 0), (e: Error) => {
        log.error(`${handover ? 'handover' : 'stopping'} failed: ${e.message}`);
        resolve(1);
      });
    };
    process.on('SIGHUP', () => log.info('SIGHUP ignored: restart the agent to change its configuration (the pins keep every flow)'));
    // A bug must not leave filters attached with nobody to keep their maps right.
    const fatal = (e: unknown) => {
      log.error(`fatal: ${e instanceof Error ? e.stack ?? e.message : String(e)}`);
      if (stopping) return;
      stopping = true;
      agent.stop().finally(() => resolve(1));
    };
    process.on('uncaughtException', fatal);
    process.on('unhandledRejection', fatal);
    if (early) act(early);
  });
}

/**
 * Offline teardown: detaches any filter of ours at the NIC and the pods of
 * the state file and every tcx link pinned in the pin dir, unpins the maps
 * and removes the state files. Refuses while an agent runs, which would only
 * put everything back.
 */
async function cleanup(cfg: AgentConfig, log: Log): Promise<number> {
  if (await socketInUse(cfg.socket)) {
    log.error(`an agent is running at ${cfg.socket}: stop it first (SIGTERM), or stop it with --cleanup set`);
    return 1;
  }
  const state = new StateDir(cfg.stateDir);
  let detached = 0;
  try {
    const nic = resolveNic(cfg);
    for (const where of ['ingress', 'egress'] as const) if (detachOurs(nic.ifindex, where)) detached++;
  } catch (e) {
    log.warn(`NIC filters not checked: ${(e as Error).message}`);
  }
  let pods: ReturnType<StateDir['readPods']>;
  try {
    // Whatever pin dir the agent recorded: cleanup may see the node's files under another
    // root (a debug pod's /host/sys/fs/bpf/xmasq for the agent's /sys/fs/bpf/xmasq), and
    // the pods' filters are to go all the same.
    pods = state.readPods(undefined);
  } catch (e) {
    log.warn(`pods not checked: ${(e as Error).message}`);
  }
  for (const p of pods ?? []) {
    try {
      if (ifIndexToName(p.hostVethIfindex) === p.hostVeth && detachOurs(p.hostVethIfindex, 'ingress')) detached++;
      if (p.netns) {
        // rpeer mode: masq sits on the pod's own device, inside its namespace.
        if (existsSync(p.netns)) {
          const idx = withNetns(p.netns, () => ifNameToIndex(p.ifname ?? 'eth0'));
          if (idx && detachOurs(idx, 'egress', p.netns)) detached++;
        }
      }
    } catch (e) {
      log.warn(`pod ${p.ip}: ${(e as Error).message}`);
    }
  }
  // The links are pinned beside the maps, whatever device or namespace they hold (a gone
  // device's too): unpinAll takes each off its hook before it removes the pin.
  let unpinned: ReturnType<typeof unpinAll>;
  try {
    unpinned = unpinAll(cfg.pinDir);
  } catch (e) {
    log.error(`cleanup: the pins in ${cfg.pinDir} not all removed (${(e as Error).message}); the state files in ${cfg.stateDir} are kept: run cleanup again once that is fixed`);
    return 1;
  }
  const { removed, leftover, linksDetached } = unpinned;
  const linkPins = removed.filter((p) => basename(p).startsWith(LINK_PIN_PREFIX)).length;
  const files = state.remove();
  log.info(`cleanup: detached ${detached} filter(s) and ${linksDetached} tcx link(s), removed ${removed.length} pin(s) (${removed.length - linkPins} of maps, ${linkPins} of tcx links) from ${cfg.pinDir} and ${files.length} state file(s) from ${cfg.stateDir}`);
  if (leftover.length) log.warn(`${cfg.pinDir} still holds ${leftover.join(', ')} (not XMasq map names): left alone`);
  return 0;
}

/** The --log-format flag as given, if it names a format: configuration errors are logged in it too. */
function formatFlag(argv: string[]): LogFormat {
  const i = argv.findIndex((a) => a === '--log-format' || a.startsWith('--log-format='));
  const v = i < 0 ? undefined : argv[i].includes('=') ? argv[i].slice(argv[i].indexOf('=') + 1) : argv[i + 1];
  return LOG_FORMATS.find((f) => f === v) ?? 'text';
}

async function main(argv: string[]): Promise<number> {
  const log0 = stderrLog(false, undefined, formatFlag(argv));
  let args;
  let cfg: AgentConfig;
  try {
    args = parseArgs(argv);
    if (args.command === 'help') {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    if (args.command === 'version') {
      process.stdout.write(`${packageVersion()}\n`);
      return 0;
    }
    cfg = loadConfig(args);
  } catch (e) {
    log0.error((e as Error).message);
    return 2;
  }
  const log = stderrLog(cfg.verbose, undefined, cfg.logFormat);
  try {
    return args.command === 'cleanup' ? await cleanup(cfg, log) : await run(cfg, log);
  } catch (e) {
    // ConfigErrors are the operator's to fix and say how; anything else gets its stack too when verbose.
    const err = e as Error;
    log.error(e instanceof ConfigError || !cfg.verbose ? err.message : err.stack ?? err.message);
    log.error('nothing is attached; exiting');
    return 1;
  }
}

main(process.argv.slice(2)).then((code) => process.exit(code));
