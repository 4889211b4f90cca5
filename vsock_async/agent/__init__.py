"""The guest agent: answers the host's commands. Standard library only.

:mod:`.agent` dials or listens and keeps connections open; :mod:`.runner`
runs one v1 command in its own process group with capped output. On a
connection switched to protocol v2, :mod:`.v2` runs many processes at once,
each a :mod:`.process` (its EXEC checked by :mod:`.request`, its terminal from
:mod:`.terminal`).
"""

from .agent import AGENT_DEFAULT_ADDRESS as AGENT_DEFAULT_ADDRESS
from .agent import GuestAgent as GuestAgent
from .runner import DEFAULT_MAX_OUTPUT as DEFAULT_MAX_OUTPUT
from .runner import DEFAULT_OUTPUT_GRACE as DEFAULT_OUTPUT_GRACE

__all__ = ["AGENT_DEFAULT_ADDRESS", "DEFAULT_MAX_OUTPUT", "DEFAULT_OUTPUT_GRACE", "GuestAgent"]
