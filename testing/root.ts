/**
 * Where the checkout is, for every suite and tool that starts a command of it
 * (the agent, the CLI, the CNI plugin) or reads a file of it by path.
 */
import { fileURLToPath } from 'node:url';

/** The checkout's root, with a trailing slash. */
export const ROOT = fileURLToPath(new URL('..', import.meta.url));
/** The checkout's tsx, to run a TypeScript entry point in a child process. */
export const TSX = `${ROOT}node_modules/.bin/tsx`;
