"""The Remote Reference Protocol, pure.

Everything in this package is synchronous bookkeeping: no threads, processes,
queues, clocks, sleeping, pickling, logging or torch. Inputs are messages and
local operations (plus ``now`` where time matters); outputs are effects that
the caller carries out. ``tests/core/test_purity.py`` enforces the imports.

The runtime (``localrref.agent``) and the simulator (``localrref.testing``)
drive the very same :class:`RRefContext`; there is one implementation of the
protocol.
"""

from .effects import Complete, CreationSettled, Effect, Execute, Fail, Log, Released, Send
from .ids import GloballyUniqueId, IdGenerator
from .messages import MessageType
from .rref import OwnerRRef, RRefForkData, UserRRef
from .rref_context import RetryPolicy, RRefContext
from .shutdown import DelAllUsersAndUnforkedOwners

__all__ = [
    "Complete", "CreationSettled", "Effect", "Execute", "Fail", "Log", "Released", "Send",
    "GloballyUniqueId", "IdGenerator", "MessageType", "OwnerRRef", "RRefForkData", "UserRRef",
    "RetryPolicy", "RRefContext", "DelAllUsersAndUnforkedOwners",
]
