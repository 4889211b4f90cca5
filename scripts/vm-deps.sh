#!/usr/bin/env bash
# Install what the VM tier needs on the host, QEMU and busybox, from Debian's packages.
# Does nothing when both are there; tests/vm/image.py runs it when one is missing.
set -euo pipefail
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v busybox >/dev/null || missing+=(busybox-static)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "vm-deps: the VM tier needs ${missing[*]}; as root on Debian or Ubuntu run:" \
        "apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
