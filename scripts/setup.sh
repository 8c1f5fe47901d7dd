#!/usr/bin/env bash
# Installs what XMasq needs on a fresh Debian 12 machine (run as root), then
# the npm dependencies, then builds the BPF objects. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs packages and the tests load BPF programs)" >&2
  exit 1
fi

# Node.js is not installed here: Debian 12's own nodejs is 18, and this project needs 20 or later
# (vitest 4, tsx; package.json "engines"). Install it first.
if ! command -v node >/dev/null 2>&1; then
  echo "setup.sh: node is not installed; install Node.js 20 or later first (Debian 12's nodejs package is 18)" >&2
  exit 1
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "setup.sh: node $(node --version) is too old; this project needs Node.js 20 or later (Debian 12's nodejs package is 18)" >&2
  exit 1
fi

packages=(clang-16 llvm-16 libbpf-dev libbpf1 bpftool libelf-dev make iproute2 ethtool tcpdump
  containernetworking-plugins iputils-ping util-linux procps docker.io busybox-static iperf3 gcc libc6-dev
  # npm run demo: request/response measured with sockperf, the tool users compare with
  sockperf
  # perf: where the time goes (npm run demo -- --profile, npm run bench:prog -- --profile)
  linux-perf
  # the host stack XMasq defers to: iptables (kube-proxy-style rules in the lab), conntrack (to look at
  # the table the programs consult: conntrack -L)
  conntrack iptables
  # lab/podman.test.ts: a container runtime nobody here wrote (podman 4.3; the test selects its CNI
  # network backend and gives it roots of its own; apt does not start its units: policy-rc.d below)
  podman
  # lab/daemonset.test.ts builds the container image (npm run image) when the lab's dockerd has none of this checkout
  mmdebstrap
  # systemd-analyze, which checks deploy/systemd/xmasq-agent.service
  systemd
  # npm run test:vm: the kernel source, what building it needs (pahole for BTF), QEMU
  linux-source-6.1 bc flex bison libssl-dev dwarves cpio patch xz-utils qemu-system-x86)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # docker.io's install script would start the stock docker.service, which
  # adds docker0 and NAT rules to the host; the tests start their own dockerd.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The agent and the tests pin and share maps through bpffs.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi

echo "setup: npm ci"
npm ci --no-audit --no-fund
echo "setup: building BPF objects"
make -C bpf
echo "setup: building the agent, CLI and CNI plugin bundles (dist/)"
npm run build:js --silent
