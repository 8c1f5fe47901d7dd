/**
 * xmasq-cni-install as a process (built into dist/xmasq-cni-install.mjs): the DaemonSet's
 * init container and its chain-keeping sidecar run it. What it does is in install.ts.
 */
import { main } from './install.ts';

main(process.argv.slice(2)).then((code) => process.exit(code));
