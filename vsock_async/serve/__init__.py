"""The ``serve`` daemon: a guest registry behind an HTTP control API, and its client.

Importing this package needs only the standard library; aiohttp is imported
by :mod:`.control_api`, which the daemon loads when it starts.
"""
