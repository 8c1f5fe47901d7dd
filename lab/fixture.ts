/**
 * The setup most lab suites share, as vitest hooks: a two-host lab with an xmasq-agent
 * per host (upWithAgents), pods added through the CNI chain, and at the end the agents
 * stopped and the lab taken down. A suite's own hooks registered after it run after
 * its beforeAll and before its afterAll.
 */
import { afterAll, beforeAll } from 'vitest';
import { upWithAgents, type AgentLabOptions, type LabAgents } from './agents.ts';
import type { Lab, LabPod } from './lab.ts';

export interface LabWithAgents {
  lab: Lab;
  agents: LabAgents;
  /** The pods, in the order asked for. */
  pods: LabPod[];
}

/**
 * Registers the hooks. `pods` are [host, pod name] pairs; `ready` hands the suite its
 * lab, agents and pods once they are up.
 */
export function labWithAgents(o: AgentLabOptions & { pods: Array<[host: string, pod: string]> }, ready: (f: LabWithAgents) => void): void {
  let up: { lab: Lab; agents: LabAgents } | undefined;
  beforeAll(async () => {
    up = await upWithAgents(o);
    const pods: LabPod[] = [];
    for (const [host, pod] of o.pods) pods.push(await up.lab.addPod(host, pod));
    ready({ ...up, pods });
  }, 120_000);
  afterAll(async () => {
    await up?.agents.teardown();
    await up?.lab.down();
  });
}
