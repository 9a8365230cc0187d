#!/usr/bin/env bash
# Debian packages megadeep's optional features need, installed only when missing (and only as root;
# otherwise it says what to install). libaio-dev: DeepSpeed's async-I/O op, used by ZeRO-Infinity's
# NVMe offload (ds_configs/zero3_nvme.json).
set -euo pipefail
PACKAGES=(libaio-dev)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${missing[*]}; install them (e.g. sudo apt-get install ${missing[*]}) — " \
       "features that need them are skipped until then" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
