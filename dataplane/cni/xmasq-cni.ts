/**
 * The `xmasq` CNI plugin as a process (built into dist/xmasq-cni.mjs, run by the `xmasq`
 * wrapper next to this file): env and stdin in, one JSON document on stdout, exit status
 * 0 or 1. The logic, the config fields and the error codes are in plugin.ts.
 */
import { readFileSync } from 'node:fs';
import { runCni } from './plugin.ts';

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
