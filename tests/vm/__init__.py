"""The real-kernel VM test tier: a throw-away QEMU guest where AF_VSOCK really connects.

`image` builds (and caches) the kernel and initramfs, `runner` boots QEMU under a hard
deadline, `plugin` runs every `@pytest.mark.vm` test of a session in one boot and reports
each guest outcome on its host-side twin. docs/testing.md explains the tier.
"""
