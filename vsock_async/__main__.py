"""``python -m vsock_async``: the command-line tool (see :mod:`vsock_async.cli`)."""

import sys

from .cli import main

sys.exit(main())
