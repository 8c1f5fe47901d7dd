/**
 * The agent's state files (pods.json, policy.json): the pods it serves and
 * the rules it installed, so that a restart can reconcile the pinned maps
 * with them. Written whole to a temporary file and renamed over the old one,
 * so a crash mid-write leaves the previous version, never half a file.
 */
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { PodRecord, PolicyRuleRecord } from './protocol.ts';

export const STATE_VERSION = 1;

export interface PodsFile {
  version: number;
  /** The pins these pods' entries live in: a state dir serves one pin dir. */
  pinDir: string;
  pods: PodRecord[];
}

export interface PolicyFile {
  version: number;
  pinDir: string;
  rules: PolicyRuleRecord[];
}

export class StateDir {
  constructor(readonly dir: string) {}

  get podsFile(): string {
    return join(this.dir, 'pods.json');
  }

  get policyFile(): string {
    return join(this.dir, 'policy.json');
  }

  /** pinDir undefined: whatever pin dir the file names (cleanup). */
  private read<T extends { version: number; pinDir: string }>(file: string, pinDir: string | undefined, what: string): T | undefined {
    if (!existsSync(file)) return undefined;
    let v: T;
    try {
      v = JSON.parse(readFileSync(file, 'utf8')) as T;
    } catch (e) {
      throw new Error(`state file ${file} is unreadable (${(e as Error).message}): fix it, or remove it to start without the ${what} it held`);
    }
    if (!v || typeof v !== 'object' || v.version !== STATE_VERSION) {
      throw new Error(`state file ${file} has version ${JSON.stringify((v as { version?: unknown })?.version)}, this agent writes ${STATE_VERSION}: remove it to start without the ${what} it held`);
    }
    if (pinDir !== undefined && v.pinDir !== pinDir) {
      throw new Error(`state file ${file} belongs to the pins in ${v.pinDir}, not ${pinDir}: set --state-dir to a directory of its own for each pin dir`);
    }
    return v;
  }

  readPods(pinDir: string | undefined): PodRecord[] | undefined {
    const f = this.read<PodsFile>(this.podsFile, pinDir, 'pods');
    if (f && !Array.isArray(f.pods)) throw new Error(`state file ${this.podsFile} has no "pods" array: remove it to start without pods`);
    return f?.pods;
  }

  readPolicy(pinDir: string): PolicyRuleRecord[] | undefined {
    const f = this.read<PolicyFile>(this.policyFile, pinDir, 'rules');
    if (f && !Array.isArray(f.rules)) throw new Error(`state file ${this.policyFile} has no "rules" array: remove it to start without rules`);
    return f?.rules;
  }

  private write(file: string, value: object): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const tmp = `${file}.tmp-${process.pid}`;
    writeFileSync(tmp, `${JSON.stringify(value, null, 2)}\n`, { mode: 0o600 });
    renameSync(tmp, file);
  }

  writePods(pinDir: string, pods: PodRecord[]): void {
    this.write(this.podsFile, { version: STATE_VERSION, pinDir, pods } satisfies PodsFile);
  }

  writePolicy(pinDir: string, rules: PolicyRuleRecord[]): void {
    this.write(this.policyFile, { version: STATE_VERSION, pinDir, rules } satisfies PolicyFile);
  }

  /** Removes both files; returns the ones that existed. */
  remove(): string[] {
    const gone: string[] = [];
    for (const f of [this.podsFile, this.policyFile]) {
      if (existsSync(f)) {
        rmSync(f, { force: true });
        gone.push(f);
      }
    }
    return gone;
  }
}
