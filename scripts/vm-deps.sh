#!/usr/bin/env bash
# Install what the test tiers need on the host from Debian's packages: QEMU and busybox for
# the VM tier and, optionally, systemd (systemd-analyze, -sysusers, -tmpfiles) for the checks
# of deploy/systemd. Does nothing when all are there; tests/vm/image.py runs it when QEMU or
# busybox is missing. Fails only when the VM tier's packages cannot be had: without systemd,
# tests/deploy skips its systemd checks and says why.
set -euo pipefail
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v busybox >/dev/null || missing+=(busybox-static)
optional=()
command -v systemd-analyze >/dev/null || optional+=(systemd)
[ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    [ ${#missing[@]} -eq 0 ] && exit 0
    echo "vm-deps: the VM tier needs ${missing[*]}; as root on Debian or Ubuntu run:" \
        "apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq; then
    [ ${#missing[@]} -eq 0 ] || exit 1
fi
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ ${#optional[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${optional[@]}" ||
        echo "vm-deps: could not install ${optional[*]}: tests/deploy skips its systemd checks" >&2
fi
