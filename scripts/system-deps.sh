#!/usr/bin/env bash
# Debian packages the tests and optional features use, installed when missing and we are root.
# Without them the tests that need them skip and say why.
#   slurmctld slurmd slurm-client: a private two-node SLURM cluster for the launch tests
#   libaio-dev: DeepSpeed's async-I/O op, for ZeRO-Infinity's NVMe offload (ds_configs/zero3_nvme.json)
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client libaio-dev)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: cannot install ${missing[*]} (not root, or no apt-get); tests that need them will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "system-deps: installing ${missing[*]} failed; tests that need them will skip" >&2
