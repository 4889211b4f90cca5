#!/bin/sh
# PID 1 of the VM-tier guest: mount the kernel filesystems, load the vsock modules, run the
# per-run payload /vmrun/run.sh with the console as its terminal, report its exit status on
# the report port (ttyS1) and power off. Only inside this guest may AF_VSOCK connect.
export PATH=/bin HOME=/root TERM=dumb VSOCK_ASYNC_IN_VM=1 VSOCK_ASYNC_VM_REPORT=/dev/ttyS1
unset VSOCK_ASYNC_FORBID_VSOCK_CONNECT
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Terminals for protocol v2's pty= (the agent announces "pty" only when devpts is there).
mkdir -p /dev/pts
mount -t devpts -o ptmxmode=0666 devpts /dev/pts
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
# /tmp stays on the initramfs root: a tmpfs mounted there would hide payload files under it.
echo "vm-init: up after $(cut -d' ' -f1 /proc/uptime) s; loading the vsock modules"
for module in /lib/vsock-modules/*.ko; do
    insmod "$module" || echo "vm-init: insmod $module failed"
done
# Raw mode, or the tty layer rewrites the line endings of the report.
stty -F /dev/ttyS1 raw -echo
sh /vmrun/run.sh </dev/null
status=$?
echo "vm-init: payload exited with status $status; powering off"
echo "{\"event\": \"exit\", \"status\": $status}" >/dev/ttyS1
sync
poweroff -f
