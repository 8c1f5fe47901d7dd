#!/bin/bash
# PID 1 of the test VM (vm-tests/qemu.ts boots the rpeer kernel with init= this file).
# The root file system is the host's / over 9p, read-only. This script gives the guest
# what a booted system has (proc, sys, devices, bpffs, tmpfs /run and /tmp), makes the
# clone writable through an overlay that lives in RAM (vitest, vite and tsx write
# caches into it), runs the in-guest suites, leaves their report on the "results"
# share and powers off. The host reads the report; nothing in the guest outlives it.
#
# Parameters arrive as environment variables from the kernel command line:
#   XMASQ_ROOT     the clone, as a path on the host (= in the guest), ending in /
#   XMASQ_FILTER   optional: only the guest test files whose path contains it
#   XMASQ_RUN      optional: "bench" runs vm-tests/guest/rpeer-bench.ts (rounds and
#                  seconds in XMASQ_BENCH_ROUNDS, XMASQ_BENCH_SECONDS) instead of the suites
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp LANG=C.UTF-8 TERM=dumb CI=1

say() { echo "xmasq-vm: $*"; }
finish() {
  say "powering off"
  sync
  umount /run/results 2>/dev/null
  # busybox's poweroff -f calls reboot(2) itself; systemctl's would need systemd.
  busybox poweroff -f
  # Should poweroff fail, PID 1 exiting panics the kernel and QEMU (-no-reboot) exits.
  exit 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/results
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /run/results; then
  say "cannot mount the results share; nothing could be reported"
  finish
fi
status() { echo "$1" > /run/results/status; }
status "booted"

# The host's root again, without the tmpfs mounts above: a clone under /tmp or /run
# is only visible there.
mkdir -p /run/host
mount --bind / /run/host
root=${XMASQ_ROOT:-}
if [ -z "$root" ] || [ ! -d "/run/host$root" ]; then
  say "XMASQ_ROOT=\"$root\" is not a directory of the host's root"
  status "no-root"
  finish
fi
# Exists already on the read-only root; under /tmp or /run it is made in the tmpfs.
mkdir -p "$root"
mkdir -p /run/overlay/upper /run/overlay/work
if ! mount -t overlay overlay -o "lowerdir=/run/host$root,upperdir=/run/overlay/upper,workdir=/run/overlay/work" "$root"; then
  say "cannot mount the overlay over $root"
  status "no-overlay"
  finish
fi

ip link set lo up
say "kernel $(uname -r), $(nproc) CPUs, clone at $root"
uname -r > /run/results/uname
cd "$root" || finish

status "running"
if [ "${XMASQ_RUN:-}" = bench ]; then
  node --import tsx vm-tests/guest/rpeer-bench.ts --out /run/results/bench.json \
    --rounds "${XMASQ_BENCH_ROUNDS:-3}" --seconds "${XMASQ_BENCH_SECONDS:-5}"
  code=$?
  say "rpeer-bench exited $code"
else
  node node_modules/vitest/vitest.mjs run --config vm-tests/guest/vitest.config.ts \
    --reporter=default --reporter=json --outputFile.json=/run/results/report.json ${XMASQ_FILTER:+"$XMASQ_FILTER"}
  code=$?
  say "vitest exited $code"
fi
echo "$code" > /run/results/exit-code
dmesg > /run/results/dmesg.txt 2>&1
status "done"
finish
