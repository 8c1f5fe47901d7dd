#!/bin/sh
# npm run test:unit: the suites that need neither root nor a kernel feature (no BPF, no
# network namespace): the import rules, the packet codec, the model's own properties, the
# cluster simulator, the agent's pure parts, the manifests. Run as root, it drops to
# nobody first, so that a suite that comes to need root fails here instead of passing.
set -eu
cd "$(dirname "$0")/.."
SUITES="testing sim/model sim/cluster/events.test.ts sim/cluster/frames.test.ts sim/cluster/traffic.test.ts sim/cluster/conntrack.test.ts sim/cluster/agent.test.ts dataplane/agent/caches.test.ts dataplane/agent/log.test.ts dataplane/agent/server.test.ts deploy/kubernetes"
if [ "$(id -u)" = 0 ]; then
  # vitest's globalSetup rebuilds dist/ only when a bundle changed: bring it up to date as root.
  npm run build:js --silent
  # nobody cannot write the checkout: npm's and node's caches go to a directory of its own, and
  # vitest loads its config without writing a bundled copy into node_modules (--configLoader runner).
  cache=$(mktemp -d /tmp/xmasq-unit.XXXXXX)
  chown nobody:nogroup "$cache"
  trap 'rm -rf "$cache"' EXIT
  setpriv --reuid=nobody --regid=nogroup --clear-groups \
    env HOME="$cache" XDG_CACHE_HOME="$cache" npx vitest run --configLoader runner $SUITES "$@"
  exit
fi
exec npx vitest run $SUITES "$@"
