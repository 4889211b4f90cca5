"""Side-by-side benchmarks of vsock_async against blocking sockets, bare asyncio and threads.

Run them all with ``python -m benchmarks`` from the repository root (see
docs/performance.md). Every benchmark drives the public API and alternates
rounds of ours and the baselines in one run.
"""
