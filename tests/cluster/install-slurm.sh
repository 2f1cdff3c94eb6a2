#!/usr/bin/env bash
# Install a single-node SLURM (Debian bookworm: Slurm 22.05) and munge for tests/cluster/test_slurm.py.
# Idempotent: does nothing when the daemons and clients are already on PATH. Needs root (CI runs as root).
# No daemon is started or configured here: the test's harness (tests/cluster/slurm.py) does that itself.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
if have slurmctld && have slurmd && have munged && have sbatch && have squeue && have mungekey; then
  echo "install-slurm: already installed ($(slurmctld -V 2>/dev/null || true))"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-slurm: needs root to apt-get install slurm-wlm munge; the SLURM test will be skipped" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# slurm-wlm pulls slurmctld + slurmd + slurm-client; --no-install-recommends keeps out slurmdbd/mysql
apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
echo "install-slurm: installed $(slurmctld -V)"
