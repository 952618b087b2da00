"""RRefContext: the Remote Reference Protocol of one worker, pure.

A port of PyTorch's ``torch/csrc/distributed/rpc/rref_context.cpp`` (the
seed, ``shared/seeds/000_fb6b4510f5001a65.txt``) and of the request handlers
around it (``request_callback_no_python.cpp``, ``py_rref.cpp``,
``python_functions.cpp``), with the threads, futures and agent taken out.

Rules of this file:

1. Every decision about an RRef's lifetime is made here. The drivers (the
   runtime agent and the simulator) only carry out effects.
2. The code never asks "am I the caller or the callee": owner and user paths
   are written against the same tables, as in the seed.
3. No clock, no I/O, no pickling. Time enters as ``now`` arguments; messages
   leave as :class:`~localrref.core.effects.Send` effects; payloads are opaque.
4. The seed's ``TORCH_INTERNAL_ASSERT`` s stay, as :class:`RRefInternalError`
   naming the ids involved. Its idempotent paths stay idempotent, and are
   counted in :meth:`get_debug_info`.

Theory of operation (the seed's protocol, in one page):

* An RRef has one owner, holding the value in an :class:`OwnerRRef`, and any
  number of users, each a :class:`UserRRef` with its own *fork id*. The owner
  keeps ``forks[rref_id]``, the set of fork ids it knows to be alive, and keeps
  the value (``owners[rref_id]``) while that set is not empty.
* A fork is made when an RRef is serialised (``prepare_child_fork``) and
  becomes a UserRRef when deserialised (``get_or_create_rref`` followed by
  ``notify_owner_and_parent_of_fork``). Messages between two workers are *not*
  assumed to arrive in order, so:

  - if the parent is the owner, it registers the child's fork before sending
    (Early Fork Registration);
  - if the parent is a user, it keeps itself alive in ``pending_children``
    until the owner has accepted the child (``RREF_FORK_REQUEST`` from child to
    owner, ``RREF_ACK``, then ``RREF_CHILD_ACCEPT`` from child to parent); the
    child stays in ``pending_users`` until its fork request is acknowledged.

* A UserRRef that nothing holds any more sends ``RREF_USER_DELETE`` to the
  owner, once; the owner drops the fork and, with the last fork, the value.
* The three control messages travel with retries (torch's ``sendWithRetries``)
  and their handlers are idempotent, so a message delivered twice is harmless.
  Every outgoing request, its state, timer and retries live in
  ``requests.py`` (a table of transitions); this file says what each outcome
  means for the protocol (:meth:`RRefContext._step`).

localrref departs from the seed in a few places, each marked ``NB(localrref)``
where it happens: the owner of a ``remote()`` is created when the call
*arrives* (not after its arguments are confirmed), a failed user function is
reported in ``REMOTE_RET``, a fork request that overtakes the ``remote()``
creating its owner waits for it, a reply that arrives after its request
timed out still has its RRefs accounted for, and a fork that a user passes
in a call or ``remote()`` is accepted by the reply to that request rather
than by ``RREF_CHILD_ACCEPT`` and its ack (the function runs only once the
owner knows the fork, so the reply comes after).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RPCTimeoutError, RRefCreationError, RRefInternalError, RRefLeakError
from .effects import (
    Complete, CreationSettled, Execute, Fail, JobKind, Log, Released, RemoteFailure, Send,
)
from .ids import GloballyUniqueId, IdGenerator
from .requests import RETRYABLE_KINDS, Event, Outcome, Request, RequestKind, RequestTable
from .messages import (
    ExceptionMessage, Message, PythonCall, PythonRemoteCall, PythonRet, PythonRRefFetchCall,
    PythonRRefFetchRet, RemoteRet, RRefAck, RRefChildAccept, RRefForkRequest, RRefUserDelete,
)
from .rref import OwnerRRef, PyObjectType, RRefForkData, TensorType, UserRRef

__all__ = ["RRefContext", "RetryPolicy", "RequestKind", "PendingOwner", "PendingRRefsWaiter",
           "creation_error_for"]

# Debug-info keys: torch's four, then localrref's own.
NUM_OWNER_RREFS = "num_owner_rrefs"
NUM_PENDING_FUTURES = "num_pending_futures"
NUM_PENDING_USERS = "num_pending_users"
NUM_FORKS = "num_forks"

TIMED_OUT_CREATION_MESSAGE = (
    "RRef creation via rpc.remote() timed out, and it is possible that the RRef on "
    "the owner node does not exist."
)

LEAK_WARNING_HEADER = (
    "Detected RRef Leaks during shutdown. This usually occurs when the application code "
    "still holds references to RRef instances when calling shutdown(). If the program has "
    "completed correctly and the process is exiting, it is OK to ignore these leaks. "
    "However, if you program will keep running after this, these leaks could result in "
    "memory leaks on RRef owners. Please make sure all RRefs are out of scope and Python GC "
    "has deleted them before calling shutdown(): \n"
)


def rpc_timeout_message(timeout: float) -> str:
    # torch's wording (rpc/agent_utils / TensorPipe agent), so callers that
    # match on it keep working.
    return (f"RPC ran for more than set timeout ({int(timeout * 1000)} ms) and will "
            f"now be marked with an error")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """torch's ``RpcRetryOptions`` for the control messages.

    A failed send is retried after ``retry_duration * backoff ** n`` seconds,
    at most ``max_retries`` times; an acknowledgement that does not come
    within ``ack_timeout`` counts as a failed send (torch uses the agent's
    default RPC timeout there).
    """

    max_retries: int = 5
    retry_duration: float = 1.0
    backoff: float = 1.5
    ack_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.retry_duration <= 0 or self.backoff < 1 or self.ack_timeout <= 0:
            raise ValueError(f"invalid retry policy: {self}")

    def delay(self, retry_count: int) -> float:
        return self.retry_duration * self.backoff ** retry_count


@dataclass(slots=True)
class PendingUserState:
    """A UserRRef waiting for its owner's confirmation (seed: PendingUserState)."""

    rref: UserRRef
    confirmed: bool = False
    waiters: list = field(default_factory=list)


@dataclass(slots=True)
class PendingRRefsWaiter:
    """The future ``waitForThreadLocalPendingRRefs`` returns, as a countdown.

    ``job`` runs once ``remaining`` reaches zero.
    """

    remaining: int
    job: object = None

    @property
    def done(self) -> bool:
        return self.remaining == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitingFetch:
    """A PYTHON_RREF_FETCH_CALL that arrived before its OwnerRRef existed."""

    src: int
    request_id: int
    payload: object = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitingForkRequest:
    """An RREF_FORK_REQUEST that arrived before its OwnerRRef existed."""

    src: int
    request_id: int
    fork_id: GloballyUniqueId


@dataclass(slots=True)
class PendingOwner:
    """An OwnerRRef asked for before it exists (seed: the ``pendingOwners_`` future).

    ``waiters`` (:class:`WaitingFetch`, :class:`WaitingForkRequest`) are
    replayed once ``getOrCreateOwnerRRef`` creates the owner.
    """

    rref_id: GloballyUniqueId
    waiters: list = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class _Job:
    job_id: int
    kind: JobKind
    src: int
    request_id: int
    payload: object
    rrefs: tuple
    owner: OwnerRRef | None = None
    fork_id: GloballyUniqueId | None = None


class RRefContext:
    """The RRef tables and protocol handlers of one worker.

    Single-threaded by contract: the driver serialises calls (the runtime
    holds one lock around every call). Every method leaves its effects in an
    internal list that :meth:`take_effects` drains; the entry points a driver
    uses most (:meth:`handle`, :meth:`on_tick`, ...) return them directly.
    """

    def __init__(self, worker_id: int, *, retry: RetryPolicy | None = None) -> None:
        self.worker_id = worker_id
        self.retry = retry or RetryPolicy()
        self._ids = IdGenerator(worker_id)
        # The seed's tables, with its names.
        self.owners: dict[GloballyUniqueId, OwnerRRef] = {}
        self.pending_owners: dict[GloballyUniqueId, PendingOwner] = {}
        self.forks: dict[GloballyUniqueId, set[GloballyUniqueId]] = {}
        self.pending_users: dict[GloballyUniqueId, PendingUserState] = {}
        self.pending_children: dict[GloballyUniqueId, UserRRef] = {}
        self.confirmed_users: dict[GloballyUniqueId, UserRRef] = {}
        self.num_pending_futures = 0
        self.destroyed = False
        # recordThreadLocalPendingRRefs: one "thread" here, since the core is
        # single-threaded; the recording never outlives one handle() call.
        self._recording = False
        self._user_table: list[PendingUserState] = []
        # Fetches waiting for an owner's value, by rref id.
        self._value_waiters: dict[GloballyUniqueId, list[WaitingFetch]] = {}
        # request id -> (its destination, the forks of RRefs it owns that the
        # request carries): their parent is released by the reply (see
        # notify_owner_and_parent_of_fork), late or not.
        self._children_in_requests: dict[int, tuple[int, tuple]] = {}
        # NB(localrref): who holds each fork, where this worker knows it, so
        # that a worker's death releases what only it held (torch never
        # learns of deaths). On an owner: fork id -> (rref id, the worker
        # holding that fork); on a parent: pending child fork id -> the
        # worker it was sent to.
        self.fork_holders: dict[GloballyUniqueId, tuple[GloballyUniqueId, int]] = {}
        self.child_holders: dict[GloballyUniqueId, int] = {}
        # Outgoing requests, their states and timers (requests.py).
        self.requests = RequestTable(max_retries=self.retry.max_retries, delay=self.retry.delay)
        self._next_job_id = 0
        self.jobs: dict[int, _Job] = {}
        self._now = 0.0
        self._effects: list = []
        self.counters: dict[str, int] = {
            "duplicate_user_deletes": 0,
            "duplicate_child_accepts": 0,
            "duplicate_fork_requests": 0,
            "late_replies": 0,
            "retries": 0,
            "abandoned_requests": 0,
        }

    # ------------------------------------------------------------------
    # Driver plumbing
    # ------------------------------------------------------------------

    def take_effects(self) -> list:
        """Hand the accumulated effects to the driver (h2's ``data_to_send``)."""
        effects, self._effects = self._effects, []
        return effects

    def _emit(self, effect) -> None:
        self._effects.append(effect)

    def _log(self, level: str, text: str) -> None:
        self._effects.append(Log(level=level, text=text))

    def _advance(self, now: float | None) -> None:
        # Threads of a driver read the clock before taking its lock, so two
        # calls may arrive with their `now`s swapped by a hair: time only
        # moves forward here.
        if now is not None and now > self._now:
            self._now = now

    def gen_globally_unique_id(self) -> GloballyUniqueId:
        """Seed: ``genGloballyUniqueId``."""
        return self._ids.next()

    # ------------------------------------------------------------------
    # Creating RRefs (seed: createUserRRef, createOwnerRRef, getOrCreate*)
    # ------------------------------------------------------------------

    def create_user_rref(self, owner: int, type_name: str = PyObjectType, *,
                         rref_id: GloballyUniqueId | None = None,
                         fork_id: GloballyUniqueId | None = None) -> UserRRef:
        """Seed: both ``createUserRRef`` overloads.

        Without ids this is the creator's form: the RRef id, then the fork id,
        are generated here, in that order so ids are deterministic. The caller
        must add the new user to ``pending_users`` where the RPC happens.
        """
        if owner == self.worker_id:
            if rref_id is None:
                raise ValueError("Cannot create UserRRef on owner.")
            raise ValueError("RRef owner cannot create user RRef.")
        if (rref_id is None) != (fork_id is None):
            raise ValueError("pass both rref_id and fork_id, or neither")
        if rref_id is None:
            rref_id = self.gen_globally_unique_id()
            fork_id = self.gen_globally_unique_id()
        return UserRRef(owner, rref_id, fork_id, type_name)

    def create_owner_rref(self, type_name: str = PyObjectType) -> OwnerRRef:
        """Seed: ``createOwnerRRef``.

        Deliberately not put in ``owners``, or nothing would ever remove it;
        ``prepare_child_fork`` adds it the first time it is shared.
        """
        return OwnerRRef(self.worker_id, self.gen_globally_unique_id(), type_name)

    def get_or_create_rref(self, fork_data: RRefForkData):
        """Seed: ``getOrCreateRRef``: the owner finds its OwnerRRef, a user gets a new UserRRef."""
        if fork_data.owner == self.worker_id:
            return self.get_or_create_owner_rref(fork_data.rref_id, fork_data.type_name)
        return self.create_user_rref(fork_data.owner, fork_data.type_name,
                                     rref_id=fork_data.rref_id, fork_id=fork_data.fork_id)

    def get_or_create_owner_rref(self, rref_id: GloballyUniqueId,
                                 type_name: str = PyObjectType, *,
                                 from_remote_call: bool = False) -> OwnerRRef:
        """Seed: ``getOrCreateOwnerRRef``, with its type check.

        Creating an owner completes the pending-owner "future": fetches and
        fork requests that arrived first are replayed now.

        NB(localrref): an owner made because a *fork* of it arrived (a user
        passed the RRef to its owner before the owner saw the ``remote()``
        creating it) is ``awaiting_creation`` until that call arrives, and is
        not released meanwhile even if every fork it knows goes away: in the
        seed it would be, and the call would then create a second OwnerRRef,
        leaving the user function that received the first one a value that
        never comes.
        """
        owner = self.owners.get(rref_id)
        if owner is None:
            owner = OwnerRRef(self.worker_id, rref_id, type_name)
            owner.awaiting_creation = not from_remote_call
            self.owners[rref_id] = owner
            pending = self.pending_owners.pop(rref_id, None)
            if pending is not None:
                for waiter in pending.waiters:
                    self._replay_owner_waiter(owner, waiter)
            return owner
        # Why a special case for tensors: a tensor type may have been refined
        # (shapes, requires_grad) on the owner, while forks carry the plain
        # TensorType; the subtype relation is all that must hold.
        if type_name == TensorType:
            if owner.type_name != TensorType:
                raise RRefInternalError(
                    f"Expect OwnerRRef to be a sub-type of TensorType, but got {owner.type_name} "
                    f"(RRef {rref_id})")
        elif owner.type_name != type_name:
            raise RRefInternalError(
                f"OwnerRRef type is {owner.type_name}, expected type is {type_name} "
                f"(RRef {rref_id})")
        if from_remote_call:
            owner.awaiting_creation = False
        return owner

    def get_owner_rref(self, rref_id: GloballyUniqueId, force_created: bool = False):
        """Seed: ``getOwnerRRef``.

        Returns the OwnerRRef if it exists, else the :class:`PendingOwner`
        (creating it) on which the caller parks its request. With
        ``force_created`` a missing owner is an internal error.
        """
        owner = self.owners.get(rref_id)
        if owner is not None:
            return owner
        if force_created:
            raise RRefInternalError(f"Expected OwnerRRef with id {rref_id} to be created.")
        pending = self.pending_owners.get(rref_id)
        if pending is None:
            pending = self.pending_owners[rref_id] = PendingOwner(rref_id)
        return pending

    # ------------------------------------------------------------------
    # Forking (seed: prepareChildFork, notifyOwnerAndParentOfFork)
    # ------------------------------------------------------------------

    def prepare_child_fork(self, rref) -> RRefForkData:
        """Seed: ``prepareChildFork``, run while serialising ``rref``.

        Raises :class:`RRefCreationError` for an RRef whose creation is known
        to have timed out (the seed's check) or failed (localrref's addition:
        every use of a failed RRef raises), and ``ValueError`` for a user
        already deleted on its owner (seed: ``UserRRef::fork``).
        """
        if rref.timed_out:
            raise RRefCreationError(TIMED_OUT_CREATION_MESSAGE)
        if rref.creation_error is not None:
            raise RRefCreationError(
                f"RRef {rref.rref_id} cannot be shared: its creation via rpc.remote() failed "
                f"({_describe(rref.creation_error)})")
        if not rref.is_owner and rref.deleted_on_owner:
            raise ValueError(
                f"User RRef with RRefId={rref.rref_id} and ForkId={rref.fork_id} has been "
                f"deleted. Cannot call fork an UserRRef after deletion.")
        fork_data = RRefForkData(owner=rref.owner, rref_id=rref.rref_id,
                                 fork_id=self.gen_globally_unique_id(), parent=self.worker_id,
                                 type_name=rref.type_name)
        if rref.is_owner:
            # Note [Early Fork Registration]: the owner registers the child's
            # fork now instead of waiting for RREF_FORK_REQUEST or
            # RREF_CHILD_ACCEPT; it had to keep the OwnerRRef alive somewhere
            # until the child's confirmation anyway.
            self.add_fork_of_owner(rref.rref_id, fork_data.fork_id)
            # A locally created OwnerRRef enters the table the first time it
            # is shared, and leaves it with its last fork.
            self.owners[rref.rref_id] = rref
        else:
            # Note [Useful Phantom Fork ID for User to Owner Call]: even if the
            # receiver is the owner (and will make no UserRRef of this fork),
            # the parent must stay alive until the receiver acknowledges, or
            # its RREF_USER_DELETE could reach the owner first and free the
            # value before the user function runs.
            self.add_pending_child(fork_data.fork_id, rref)
        return fork_data

    def abandon_child_fork(self, fork_data: RRefForkData) -> None:
        """Undo ``prepare_child_fork`` for a message that was never sent.

        NB(localrref): torch has no such path; a call whose arguments fail to
        serialise after an RRef was forked leaks that fork. Here the driver
        calls this for every fork of a message it could not send.
        """
        if fork_data.owner == self.worker_id:
            self.del_fork_of_owner(fork_data.rref_id, fork_data.fork_id)
        else:
            self.del_pending_child(fork_data.fork_id)

    def notify_owner_and_parent_of_fork(self, fork_id: GloballyUniqueId, parent: int,
                                        rref, *, in_request: bool = False) -> None:
        """Seed: ``notifyOwnerAndParentOfFork``, run while deserialising a fork.

        The four cases: owner to self, owner to user, user to owner, user to
        user. ``in_request``: the fork came in a call or ``remote()`` from its
        parent, which will get a reply.
        """
        if parent == rref.owner:
            if parent == self.worker_id:
                # The owner sent the RRef to itself: drop the fork that
                # pickling added.
                deleted = self.del_fork_of_owner(rref.rref_id, fork_id)
                if deleted is not None and deleted.rref_id != rref.rref_id:
                    raise RRefInternalError(
                        f"Deleting a fork of {rref.rref_id} triggered deleting the OwnerRRef "
                        f"of {deleted.rref_id}")
            else:
                # The owner forked to us and registered the fork before
                # sending (Early Fork Registration): nothing to tell anyone.
                rref.confirmed = True
                self.add_confirmed_user(fork_id, rref)
            return
        if rref.is_owner:
            # A user sent the RRef to its owner: the fork id is a phantom
            # (no UserRRef is made), but the parent waits for our accept.
            if in_request:
                # NB(localrref): the reply to the request is the accept (see
                # _release_children_of): the parent keeps its RRef alive
                # until the function has run and answered, and two messages
                # (RREF_CHILD_ACCEPT and its ack) are saved per call; an RRef
                # proxy passes its RRef to the owner on every call.
                return
            self._send_with_retries(parent, RequestKind.CHILD_ACCEPT,
                                    lambda rid: RRefChildAccept(request_id=rid, fork_id=fork_id))
        else:
            if in_request and parent != self.worker_id:
                # NB(localrref): the reply to the request is the accept here
                # too: the function runs only once the owner has acknowledged
                # our fork request, so its reply reaches the parent after the
                # owner knows the fork. Two messages saved per RRef a user
                # passes on to another user (a pipeline's stage input).
                parent = None
            self._send_with_retries(
                rref.owner, RequestKind.FORK_REQUEST,
                lambda rid: RRefForkRequest(request_id=rid, rref_id=rref.rref_id, fork_id=fork_id),
                fork_id=fork_id, parent=parent)
            self.add_pending_user(fork_id, rref)

    # ------------------------------------------------------------------
    # Pending children and users
    # ------------------------------------------------------------------

    def add_pending_child(self, fork_id: GloballyUniqueId, rref: UserRRef) -> None:
        """Seed: ``addPendingChild``: hold the parent until the child is accepted."""
        if rref.is_owner:
            raise RRefInternalError(
                f"OwnerRRef should not have a pending child (RRef {rref.rref_id}, "
                f"fork {fork_id}).")
        if fork_id in self.pending_children:
            raise RRefInternalError(
                f"Inconsistent states: attempt to add the same child fork twice "
                f"(fork {fork_id} of RRef {rref.rref_id}).")
        self.pending_children[fork_id] = rref
        rref.holds += 1

    def del_pending_child(self, fork_id: GloballyUniqueId) -> None:
        """Seed: ``delPendingChild``; idempotent, as RREF_CHILD_ACCEPT may come twice."""
        rref = self.pending_children.pop(fork_id, None)
        self.child_holders.pop(fork_id, None)
        if rref is None:
            self.counters["duplicate_child_accepts"] += 1
            self._log("info", f"Ignoring duplicate request to delete child UserRRef with "
                              f"ForkId = {fork_id}")
            return
        self._drop_hold(rref)

    def add_pending_user(self, fork_id: GloballyUniqueId, rref: UserRRef) -> None:
        """Seed: ``addPendingUser``: the user lives at least until the owner confirms it."""
        if rref.is_owner:
            raise RRefInternalError(
                f"Attempt to add an OwnerRRef as a pending User (RRef {rref.rref_id}).")
        if fork_id in self.pending_users:
            raise RRefInternalError(
                f"Inconsistent states: attempt to add the same UserRRef twice "
                f"(fork {fork_id} of RRef {rref.rref_id}).")
        state = PendingUserState(rref)
        if self._recording:
            self._user_table.append(state)
        self.pending_users[fork_id] = state
        rref.holds += 1

    def del_pending_user(self, fork_id: GloballyUniqueId) -> None:
        """Seed: ``delPendingUser``: confirm the user and let its waiters run."""
        state = self.pending_users.pop(fork_id, None)
        if state is None:
            raise RRefInternalError(
                f"Inconsistent states: attempt to delete a non-exist UserRRef (fork {fork_id}).")
        rref = state.rref
        if not rref.creation_failed:
            rref.confirmed = True
        self.add_confirmed_user(fork_id, rref)
        state.confirmed = True
        for waiter in state.waiters:
            self._count_down(waiter)
        state.waiters.clear()
        self._drop_hold(rref)

    def get_pending_user(self, fork_id: GloballyUniqueId) -> UserRRef:
        """Seed: ``getPendingUser``."""
        state = self.pending_users.get(fork_id)
        if state is None:
            raise RRefInternalError(f"Pending user with forkId {fork_id} not found")
        return state.rref

    def add_confirmed_user(self, fork_id: GloballyUniqueId, rref: UserRRef) -> None:
        """Seed: ``addConfirmedUser``; ``delAllUsersAndUnforkedOwners`` deletes these."""
        self.confirmed_users[fork_id] = rref

    # ------------------------------------------------------------------
    # Per-request pending RRefs (seed: record / wait / clear)
    # ------------------------------------------------------------------

    def record_thread_local_pending_rrefs(self) -> None:
        """Seed: ``recordThreadLocalPendingRRefs``."""
        if self._user_table:
            raise RRefInternalError("User RRef Table should be empty when start recording")
        self._recording = True

    def wait_for_thread_local_pending_rrefs(self) -> PendingRRefsWaiter:
        """Seed: ``waitForThreadLocalPendingRRefs``: a countdown over the recorded users."""
        unconfirmed = [s for s in self._user_table if not s.confirmed]
        waiter = PendingRRefsWaiter(remaining=len(unconfirmed))
        for state in unconfirmed:
            state.waiters.append(waiter)
        self._user_table.clear()
        self._recording = False
        return waiter

    def clear_recorded_pending_rrefs_on_error(self) -> None:
        """Seed: ``clearRecordedPendingRRefsOnError``."""
        self._user_table.clear()
        self._recording = False

    def _count_down(self, waiter: PendingRRefsWaiter) -> None:
        waiter.remaining -= 1
        if waiter.remaining == 0 and waiter.job is not None:
            self._start_job(waiter.job)

    # ------------------------------------------------------------------
    # Owner-side fork bookkeeping
    # ------------------------------------------------------------------

    def add_self_as_fork(self, rref: OwnerRRef) -> None:
        """Seed: ``addSelfAsFork``: a remote() to self counts as one fork of itself."""
        self.owners[rref.rref_id] = rref
        forks = self.forks.setdefault(rref.rref_id, set())
        if rref.rref_id in forks:
            raise RRefInternalError(f"Attempt to add self as fork twice {rref.rref_id}")
        forks.add(rref.rref_id)

    def add_fork_of_owner(self, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> None:
        """Seed: ``addForkOfOwner``: a second notification of one fork is a bug."""
        forks = self.forks.setdefault(rref_id, set())
        if fork_id in forks:
            raise RRefInternalError(
                f"Got fork notification twice on the same RRef {fork_id} (RRef {rref_id})")
        forks.add(fork_id)

    def add_fork_of_owner_if_not_present(self, rref_id: GloballyUniqueId,
                                         fork_id: GloballyUniqueId) -> None:
        """Seed: ``addForkOfOwnerIfNotPresent``; idempotent for retried fork requests."""
        forks = self.forks.setdefault(rref_id, set())
        if fork_id in forks:
            self.counters["duplicate_fork_requests"] += 1
            self._log("info", f"Ignoring duplicate request to add Fork of OwnerRRef with "
                              f"RRefId = {rref_id}, ForkId = {fork_id}")
            return
        forks.add(fork_id)

    def del_fork_of_owner(self, rref_id: GloballyUniqueId,
                          fork_id: GloballyUniqueId) -> OwnerRRef | None:
        """Seed: ``delForkOfOwner``; idempotent, releases the owner with its last fork.

        Returns the OwnerRRef it removed from ``owners``, if any.
        """
        forks = self.forks.get(rref_id)
        if forks is None:
            self.counters["duplicate_user_deletes"] += 1
            self._log("info", f"Could not find OwnerRRef with RRefId = {rref_id}, likely because "
                              f"it was deleted by a previously retried message")
            return None
        self.fork_holders.pop(fork_id, None)
        if fork_id in forks:
            forks.discard(fork_id)
        else:
            self.counters["duplicate_user_deletes"] += 1
            self._log("info", f"Could not find UserRRef instance, RRefId = {rref_id}, ForkId = "
                              f"{fork_id}, likely because it was deleted by a previously retried "
                              f"message")
        if forks:
            return None
        del self.forks[rref_id]
        owner = self.owners.get(rref_id)
        if owner is not None and owner.awaiting_creation:
            return None
        owner = self.owners.pop(rref_id, None)
        if owner is not None:
            self._emit(Released(rref_id=rref_id))
        return owner

    # ------------------------------------------------------------------
    # Deleting users
    # ------------------------------------------------------------------

    def acquire(self, rref: UserRRef) -> None:
        """The driver took one more handle on ``rref`` (an application reference)."""
        if rref.is_owner:
            return
        rref.holds += 1

    def release(self, rref) -> None:
        """The driver dropped one handle on ``rref``; the last one deletes the user.

        This is ``UserRRef::release_resources`` / ``tryDel``; drivers call it
        from a safe place (never inside ``__del__``).
        """
        if rref.is_owner:
            return
        self._drop_hold(rref)

    def _drop_hold(self, rref: UserRRef) -> None:
        if rref.holds <= 0:
            raise RRefInternalError(
                f"UserRRef {rref.fork_id} of RRef {rref.rref_id} released more often than held")
        rref.holds -= 1
        if rref.holds == 0:
            self.try_del(rref)

    def try_del(self, rref: UserRRef) -> None:
        """Seed: ``UserRRef::tryDel``: tell the owner once."""
        if not rref.deleted_on_owner:
            rref.deleted_on_owner = True
            self.del_user(rref.owner, rref.rref_id, rref.fork_id)

    def del_user(self, owner: int, rref_id: GloballyUniqueId, fork_id: GloballyUniqueId) -> None:
        """Seed: ``delUser``: RREF_USER_DELETE with retries (the owner's side is idempotent)."""
        if not self.destroyed:
            self._send_with_retries(
                owner, RequestKind.USER_DELETE,
                lambda rid: RRefUserDelete(request_id=rid, rref_id=rref_id, fork_id=fork_id))
        self.confirmed_users.pop(fork_id, None)

    # ------------------------------------------------------------------
    # Creation outcomes (seed: callback::confirmPendingUser,
    # callback::finishCreatingOwnerRRef, finishForkRequest)
    # ------------------------------------------------------------------

    def confirm_pending_user(self, expected_fork_id: GloballyUniqueId, *,
                             reply: RemoteRet | None = None, error: object = None,
                             timed_out: bool = False) -> None:
        """Seed: ``callback::confirmPendingUser``, on a user's ``remote()`` outcome."""
        if reply is not None and error is None and not timed_out:
            if reply.fork_id != expected_fork_id:
                raise RRefInternalError(
                    f"REMOTE_RET for fork {reply.fork_id} confirmed pending user "
                    f"{expected_fork_id}")
            rref = self.get_pending_user(expected_fork_id)
            if reply.error is not None:
                rref.creation_error = RemoteFailure(reply.error)
        else:
            # [Best Effort Error handling for Remote calls]: remember the
            # error on the RRef so later uses fail instead of hanging.
            rref = self.get_pending_user(expected_fork_id)
            self._handle_error(rref, error, timed_out)
        self.del_pending_user(expected_fork_id)
        self._settle_creation(rref, error if timed_out else None)

    def finish_creating_owner_rref(self, rref_id: GloballyUniqueId, *,
                                   reply: RemoteRet | None = None, error: object = None,
                                   timed_out: bool = False) -> OwnerRRef | None:
        """Seed: ``callback::finishCreatingOwnerRRef``: a remote() to self finished."""
        if reply is not None and error is None and not timed_out:
            if reply.rref_id != reply.fork_id:
                raise RRefInternalError(
                    f"Expecting an OwnerRRef as RemoteRet but got a fork "
                    f"(RRef {reply.rref_id}, fork {reply.fork_id}).")
            owner = self.get_owner_rref(rref_id, force_created=True)
            if reply.error is not None:
                owner.creation_error = RemoteFailure(reply.error)
        else:
            owner = self.get_owner_rref(rref_id, force_created=True)
            self._handle_error(owner, error, timed_out)
        deleted = self.del_fork_of_owner(rref_id, rref_id)
        self._settle_creation(owner, error if timed_out else None)
        return deleted

    def _handle_error(self, rref, error: object, timed_out: bool) -> None:
        # Seed: RRef::handleError: a timeout marks the RRef timed out; any
        # other error is remembered (torch only logs it).
        if timed_out:
            rref.timed_out = True
        else:
            rref.creation_error = error if error is not None else RRefCreationError(
                f"creation of RRef {rref.rref_id} failed")

    def _settle_creation(self, rref, timeout_error: object = None) -> None:
        """Settle the creation future; one that timed out fails with the timeout
        itself (as torch's ``_get_future()`` does), later uses with
        :data:`TIMED_OUT_CREATION_MESSAGE`."""
        error = None
        if rref.timed_out:
            error = timeout_error if timeout_error is not None else RRefCreationError(
                TIMED_OUT_CREATION_MESSAGE)
        elif rref.creation_error is not None:
            error = rref.creation_error
        self._emit(CreationSettled(rref=rref, error=error))
        if error is not None and not rref.is_owner:
            # NB(localrref): a to_here() already waiting on this RRef wakes
            # now with the creation error (open in torch: #39411, #44771).
            for request in list(self.requests.values()):
                if request.kind is RequestKind.FETCH and request.rref is rref:
                    outcome = self.requests.step(request, Event.CREATION_FAILED, now=self._now)
                    if outcome is Outcome.FAILED:
                        self._emit(Fail(request_id=request.request_id,
                                        error=creation_error_for(rref)))

    def finish_fork_request(self, fork_id: GloballyUniqueId, parent: int | None) -> None:
        """Seed: ``finishForkRequest``: the owner knows the fork; release the parent
        (None: the reply to the request that brought the fork releases it)."""
        self.del_pending_user(fork_id)
        if parent is None:
            return
        self._send_with_retries(parent, RequestKind.CHILD_ACCEPT,
                                lambda rid: RRefChildAccept(request_id=rid, fork_id=fork_id))

    # ------------------------------------------------------------------
    # Requests the application makes
    # ------------------------------------------------------------------

    def rpc(self, dst: int, payload: object, rrefs: tuple = (), *, now: float,
            timeout: float = 0.0) -> int:
        """Send a PYTHON_CALL; the outcome is a Complete/Fail with the returned request id.

        ``rrefs`` are the fork data ``prepare_child_fork`` produced while the
        driver serialised ``payload``. ``timeout`` 0 means no limit.
        """
        self._advance(now)
        request = self._start_request(
            RequestKind.CALL, dst,
            lambda rid: PythonCall(request_id=rid, payload=payload, rrefs=tuple(rrefs)),
            timeout=timeout)
        self._note_children(request.request_id, dst, rrefs)
        self._note_recipient(dst, rrefs)
        return request.request_id

    def remote(self, dst: int, payload: object, rrefs: tuple = (), *, now: float,
               timeout: float = 0.0, type_name: str = PyObjectType):
        """Send a PYTHON_REMOTE_CALL and return the new RRef's record.

        A UserRRef comes with one hold for the caller. For ``dst`` equal to
        this worker the result is the OwnerRRef (seed: the two branches of
        ``pyRemotePythonUdf``).
        """
        self._advance(now)
        if dst == self.worker_id:
            owner = self.create_owner_rref(type_name)
            self.add_self_as_fork(owner)
            self._start_request(
                RequestKind.REMOTE_SELF, dst,
                lambda rid: PythonRemoteCall(request_id=rid, payload=payload,
                                             rref_id=owner.rref_id, fork_id=owner.rref_id,
                                             type_name=type_name, rrefs=tuple(rrefs)),
                rref=owner, timeout=timeout)
            return owner
        user = self.create_user_rref(dst, type_name)
        request = self._start_request(
            RequestKind.REMOTE, dst,
            lambda rid: PythonRemoteCall(request_id=rid, payload=payload, rref_id=user.rref_id,
                                         fork_id=user.fork_id, type_name=type_name,
                                         rrefs=tuple(rrefs)),
            rref=user, fork_id=user.fork_id, timeout=timeout)
        self._note_children(request.request_id, dst, rrefs)
        self._note_recipient(dst, rrefs)
        self.add_pending_user(user.fork_id, user)
        user.holds += 1
        return user

    def fetch(self, rref: UserRRef, *, now: float, timeout: float = 0.0,
              payload: object = None) -> int:
        """Send a PYTHON_RREF_FETCH_CALL for a user's value (``to_here``).

        A user whose creation failed gets its Fail right away. ``payload``
        reaches the owner's FETCH job untouched.
        """
        self._advance(now)
        if rref.is_owner:
            raise ValueError(f"fetch() is for UserRRefs; {rref!r} is local to this worker")
        if rref.deleted_on_owner:
            raise ValueError(f"UserRRef {rref.fork_id} of RRef {rref.rref_id} was deleted; it "
                             f"cannot be fetched")
        if rref.creation_failed:
            request_id = self.requests.reserve_id()
            self._emit(Fail(request_id=request_id, error=creation_error_for(rref)))
            return request_id
        request = self._start_request(
            RequestKind.FETCH, rref.owner,
            lambda rid: PythonRRefFetchCall(request_id=rid, rref_id=rref.rref_id,
                                            payload=payload),
            rref=rref, timeout=timeout)
        # NB(localrref): the fetch holds the user until the owner answers,
        # even if the caller stops waiting: otherwise the user's
        # RREF_USER_DELETE could overtake the fetch and free the value first.
        rref.holds += 1
        return request.request_id

    def cancel(self, request_id: int) -> None:
        """Forget a CALL or FETCH the application no longer waits for.

        A reply that still comes is treated as late: its RRefs are accounted
        for and released.
        """
        request = self.requests.get(request_id)
        if request is not None:
            self._step(request, Event.CANCELLED)

    def _start_request(self, kind: RequestKind, dst: int, make, *, timeout: float = 0.0,
                       **fields) -> Request:
        request = self.requests.new(kind, dst, make, now=self._now, timeout=timeout, **fields)
        self._emit(Send(dst=dst, message=request.message))
        return request

    def _note_children(self, request_id: int, dst: int, rrefs: tuple) -> None:
        # The forks of our UserRRefs that the reply will accept: those to
        # their owner and those to another user (notify_owner_and_parent_of_fork).
        if dst == self.worker_id:
            return
        forks = tuple(f.fork_id for f in rrefs if f.owner != self.worker_id)
        if forks:
            self._children_in_requests[request_id] = (dst, forks)

    def _note_recipient(self, dst: int, rrefs: tuple) -> None:
        """The forks in ``rrefs`` go to ``dst``: remember who will hold them."""
        for fork_data in rrefs:
            if fork_data.owner == self.worker_id:
                if fork_data.fork_id in self.forks.get(fork_data.rref_id, ()):
                    self.fork_holders[fork_data.fork_id] = (fork_data.rref_id, dst)
            elif fork_data.owner != dst and fork_data.fork_id in self.pending_children:
                self.child_holders[fork_data.fork_id] = dst

    def _release_children_of(self, request_id: int) -> None:
        """The reply to ``request_id`` came: its owner has every fork it carried."""
        entry = self._children_in_requests.pop(request_id, None)
        if entry is not None:
            for fork_id in entry[1]:
                self.del_pending_child(fork_id)

    def _send_with_retries(self, dst: int, kind: RequestKind, make, **extra) -> None:
        # torch's RpcAgent::sendWithRetries plus the ++/-- of numPendingFutures
        # around it in the seed.
        self.num_pending_futures += 1
        self._start_request(kind, dst, make, timeout=self.retry.ack_timeout, **extra)

    def next_deadline(self) -> float | None:
        """When the driver must call :meth:`on_tick` next (None: no timer armed)."""
        return self.requests.next_deadline()

    def on_tick(self, now: float) -> list:
        """Fire timers due at ``now``: retries of control messages and timeouts."""
        self._advance(now)
        for request in self.requests.due(now):
            self._step(request, Event.TIMER)
        return self.take_effects()

    def on_send_failed(self, request_id: int, error: object = None, *, now: float,
                       peer_gone: bool = False, intentional: bool = False) -> list:
        """The transport could not deliver the message of ``request_id``.

        Control messages are retried with backoff (torch's faulty-agent
        "failed sends"), unless ``peer_gone``: the destination is dead, and
        a control message to it is dropped (its tables died with it), as in
        :meth:`on_peer_gone`. Anything else fails its request.
        ``intentional``: fault injection failed the send; a ``remote()``
        whose message it failed is then timed out (seed: ``RRef::handleError``
        takes the faulty agent's INTENTIONAL_FAILURE for a timeout), so its
        RRef fails every later use with torch's "RRef creation ... timed out".
        """
        self._advance(now)
        request = self.requests.get(request_id)
        if request is not None:
            if not request.is_control:
                # The message never left: nobody will accept its forks.
                self._children_in_requests.pop(request_id, None)
                for fork_data in getattr(request.message, "rrefs", ()):
                    self.abandon_child_fork(fork_data)
            timed_out = intentional and not peer_gone and request.kind in (
                RequestKind.REMOTE, RequestKind.REMOTE_SELF)
            self._step(request, Event.PEER_GONE if peer_gone else Event.SEND_FAILED,
                       error if error is not None else RRefInternalError(
                           f"send of request {request_id} to worker {request.dst} failed"),
                       timed_out=timed_out)
        return self.take_effects()

    def on_peer_gone(self, rank: int, error: object, *, now: float) -> list:
        """Worker ``rank`` died: fail at once everything that waited on it.

        Calls and fetches to it fail with ``error``; a ``remote()`` it owned
        fails its creation; control messages to it are dropped (its tables
        died with it); the forks it held of our RRefs are released, as are
        the children we forked to it or of its RRefs; users of its RRefs that
        it never confirmed fail. Nothing here waits for a timeout.
        """
        self._advance(now)
        for request in list(self.requests.values()):
            if request.dst == rank:
                self._step(request, Event.PEER_GONE, error)
        for request_id, (dst, _) in list(self._children_in_requests.items()):
            if dst == rank:
                self._release_children_of(request_id)
        # NB(localrref): what only the dead held, or what waited on it.
        # Forks it held of RRefs we own: as if it had deleted them.
        for fork_id, (rref_id, holder) in list(self.fork_holders.items()):
            if holder == rank:
                self.del_fork_of_owner(rref_id, fork_id)
        # Children we forked to it, or of RRefs it owned: no accept will come.
        for fork_id, rref in list(self.pending_children.items()):
            if rref.owner == rank or self.child_holders.get(fork_id) == rank:
                self.del_pending_child(fork_id)
        # Users of its RRefs that it never confirmed (their fork requests
        # were dropped above): they fail every use from now on, and jobs
        # waiting for them run (and see that).
        for fork_id, state in list(self.pending_users.items()):
            if state.rref.owner == rank:
                self.confirm_pending_user(fork_id, error=error)
        return self.take_effects()

    def _step(self, request: Request, event: Event, error: object = None, *,
              timed_out: bool = False) -> Outcome:
        """Move ``request`` on (requests.py) and carry out what the outcome means here.

        ``timed_out``: a FAILED outcome counts as a timeout for the caller
        (the failure ``error`` is what the creation future fails with)."""
        outcome = self.requests.step(request, event, now=self._now)
        kind = request.kind
        if kind in RETRYABLE_KINDS:
            if outcome is Outcome.RESEND:
                self.counters["retries"] += 1
                self._emit(Send(dst=request.dst, message=request.message))
            elif outcome is Outcome.GIVE_UP:
                # Seed: the future errors and handleExceptionSilent logs it.
                self.num_pending_futures -= 1
                self.counters["abandoned_requests"] += 1
                reason = error if event is not Event.TIMER else RPCTimeoutError(
                    rpc_timeout_message(request.timeout))
                self._log("error", f"Giving up on {request.message.type.value} to worker "
                                   f"{request.dst} after {request.retries} retries"
                                   f"{'' if reason is None else ': ' + _describe(reason)}")
            elif outcome is Outcome.DROPPED:
                self.num_pending_futures -= 1
            return outcome
        if kind is RequestKind.FETCH and outcome in (Outcome.DONE, Outcome.DROPPED,
                                                      Outcome.FAILED) \
                and request.request_id not in self.requests:
            self._drop_hold(request.rref)  # the fetch's hold (see fetch)
        if outcome is Outcome.TIMED_OUT:
            self._tell_caller(request, None, timed_out=True)
        elif outcome is Outcome.FAILED:
            self._tell_caller(request, error, timed_out=timed_out)
        return outcome

    def _tell_caller(self, request: Request, error: object, *, timed_out: bool = False) -> None:
        if timed_out and error is None:
            error = RPCTimeoutError(rpc_timeout_message(request.timeout))
        if request.kind is RequestKind.REMOTE:
            self.confirm_pending_user(request.fork_id, error=error, timed_out=timed_out)
        elif request.kind is RequestKind.REMOTE_SELF:
            self.finish_creating_owner_rref(request.rref.rref_id, error=error,
                                            timed_out=timed_out)
        else:
            self._emit(Fail(request_id=request.request_id, error=error))

    # ------------------------------------------------------------------
    # Jobs: the driver runs user functions and reports back
    # ------------------------------------------------------------------

    def _new_job(self, kind: JobKind, src: int, request_id: int, payload: object, rrefs: tuple,
                 owner: OwnerRRef | None = None,
                 fork_id: GloballyUniqueId | None = None) -> _Job:
        job = _Job(job_id=self._next_job_id, kind=kind, src=src, request_id=request_id,
                   payload=payload, rrefs=rrefs, owner=owner, fork_id=fork_id)
        self._next_job_id += 1
        # The driver's hold on each argument, released with release() once
        # the function is done with it. Taken now, not when the job starts:
        # a job waits until *every* argument is confirmed, and the first
        # confirmation drops that user's pending hold; without the job's hold
        # in place it would reach zero and be deleted on its owner before the
        # function could fetch it (seed: the request's deserialised arguments
        # hold their UserRRefs from the start).
        for rref in rrefs:
            if not rref.is_owner:
                rref.holds += 1
        return job

    def _start_job(self, job: _Job) -> None:
        self.jobs[job.job_id] = job
        self._emit(Execute(job_id=job.job_id, kind=job.kind, src=job.src, payload=job.payload,
                           rrefs=job.rrefs, owner=job.owner))

    def finish_call(self, job_id: int, payload: object, rrefs: tuple = ()) -> list:
        """A CALL or FETCH job produced ``payload`` (``rrefs``: forks made serialising it)."""
        job = self._pop_job(job_id, (JobKind.CALL, JobKind.FETCH))
        reply_type = PythonRet if job.kind is JobKind.CALL else PythonRRefFetchRet
        self._note_recipient(job.src, rrefs)
        self._emit(Send(dst=job.src, message=reply_type(request_id=job.request_id,
                                                        payload=payload, rrefs=tuple(rrefs))))
        return self.take_effects()

    def finish_remote(self, job_id: int, value: object) -> list:
        """A REMOTE job produced ``value``: it becomes the OwnerRRef's value."""
        job = self._pop_job(job_id, (JobKind.REMOTE,))
        job.owner.set_value(value)
        self._owner_ready(job)
        return self.take_effects()

    def fail_job(self, job_id: int, error_payload: object) -> list:
        """The job raised; ``error_payload`` is what the requester will see."""
        job = self._pop_job(job_id, (JobKind.CALL, JobKind.FETCH, JobKind.REMOTE))
        if job.kind is JobKind.REMOTE:
            job.owner.set_error(error_payload)
            self._owner_ready(job, error=error_payload)
        else:
            self._emit(Send(dst=job.src, message=ExceptionMessage(request_id=job.request_id,
                                                                  payload=error_payload)))
        return self.take_effects()

    def _pop_job(self, job_id: int, kinds: tuple) -> _Job:
        job = self.jobs.pop(job_id, None)
        if job is None:
            raise RRefInternalError(f"job {job_id} is not running on worker {self.worker_id}")
        if job.kind not in kinds:
            self.jobs[job_id] = job
            raise RRefInternalError(f"job {job_id} is a {job.kind.value} job, not one of "
                                    f"{[k.value for k in kinds]}")
        return job

    def _owner_ready(self, job: _Job, error: object = None) -> None:
        self._emit(Send(dst=job.src, message=RemoteRet(
            request_id=job.request_id, rref_id=job.owner.rref_id, fork_id=job.fork_id,
            error=error)))
        for waiter in self._value_waiters.pop(job.owner.rref_id, ()):
            self._serve_fetch(job.owner, waiter)

    def _serve_fetch(self, owner: OwnerRRef, fetch: WaitingFetch) -> None:
        if owner.has_value:
            self._start_job(self._new_job(JobKind.FETCH, fetch.src, fetch.request_id,
                                          fetch.payload, (), owner=owner))
        else:
            self._value_waiters.setdefault(owner.rref_id, []).append(fetch)

    # ------------------------------------------------------------------
    # Incoming messages
    # ------------------------------------------------------------------

    def handle(self, src: int, message: Message, *, now: float) -> list:
        """Process one message from worker ``src``; return the effects."""
        self._advance(now)
        match message:
            case PythonCall():
                self._on_call(src, message)
            case PythonRemoteCall():
                self._on_remote_call(src, message)
            case PythonRRefFetchCall():
                self._on_fetch(src, message)
            case RRefForkRequest():
                self._on_fork_request(src, message)
            case RRefChildAccept():
                # Seed (callee side): processRRefChildAccept.
                self.del_pending_child(message.fork_id)
                self._ack(src, message)
            case RRefUserDelete():
                # Seed (callee side): processRRefUserDelete.
                self.del_fork_of_owner(message.rref_id, message.fork_id)
                self._ack(src, message)
            case PythonRet() | PythonRRefFetchRet():
                self._on_value_reply(src, message)
            case RemoteRet():
                self._on_remote_ret(message)
            case RRefAck():
                self._on_ack(message)
            case ExceptionMessage():
                self._on_exception(message)
            case _:
                raise TypeError(f"not a protocol message: {message!r}")
        return self.take_effects()

    def _ack(self, src: int, message: Message) -> None:
        self._emit(Send(dst=src, message=RRefAck(request_id=message.request_id)))

    def _receive_rrefs(self, src: int, fork_datas: tuple, *, in_request: bool = False) -> tuple:
        # The deserialisation side of every fork that rode in a message.
        received = []
        for fork_data in fork_datas:
            rref = self.get_or_create_rref(fork_data)
            self.notify_owner_and_parent_of_fork(fork_data.fork_id, src, rref,
                                                 in_request=in_request)
            received.append(rref)
        return tuple(received)

    def _receive_request_rrefs(self, src: int, fork_datas: tuple) -> tuple[tuple, PendingRRefsWaiter]:
        self.record_thread_local_pending_rrefs()
        try:
            rrefs = self._receive_rrefs(src, fork_datas, in_request=True)
        except BaseException:
            self.clear_recorded_pending_rrefs_on_error()
            raise
        return rrefs, self.wait_for_thread_local_pending_rrefs()

    def _run_when_confirmed(self, waiter: PendingRRefsWaiter, job: _Job) -> None:
        # Since pytorch#34497 a user function runs only once every RRef among
        # its arguments is confirmed by its owner.
        if waiter.done:
            self._start_job(job)
        else:
            waiter.job = job

    def _on_call(self, src: int, message: PythonCall) -> None:
        rrefs, waiter = self._receive_request_rrefs(src, message.rrefs)
        job = self._new_job(JobKind.CALL, src, message.request_id, message.payload, rrefs)
        self._run_when_confirmed(waiter, job)

    def _on_remote_call(self, src: int, message: PythonRemoteCall) -> None:
        rrefs, waiter = self._receive_request_rrefs(src, message.rrefs)
        # Seed (callee side): assignOwnerRRef.
        # NB(localrref): done on arrival rather than after the arguments are
        # confirmed, so a caller that times out while the arguments are still
        # pending cannot send its RREF_USER_DELETE before the fork exists.
        if message.rref_id == message.fork_id:
            # A remote() to self: the caller put the OwnerRRef in owners.
            owner = self.owners.get(message.rref_id)
            if owner is None:
                # Only possible if our own request already timed out and
                # finishCreatingOwnerRRef let the owner go; the reply would
                # meet no request. torch hits its forceCreated assert here.
                for rref in rrefs:
                    if not rref.is_owner:
                        self._drop_hold_if_unheld(rref)
                self._log("warning", f"Dropping remote() to self for RRef {message.rref_id}: "
                                     f"its creation already timed out")
                return
        else:
            owner = self.get_or_create_owner_rref(message.rref_id, message.type_name,
                                                  from_remote_call=True)
            self.add_fork_of_owner(message.rref_id, message.fork_id)
            self.fork_holders[message.fork_id] = (message.rref_id, src)
        job = self._new_job(JobKind.REMOTE, src, message.request_id, message.payload, rrefs,
                            owner=owner, fork_id=message.fork_id)
        self._run_when_confirmed(waiter, job)

    def _drop_hold_if_unheld(self, rref: UserRRef) -> None:
        if rref.holds == 0:
            self.try_del(rref)

    def _on_fetch(self, src: int, message: PythonRRefFetchCall) -> None:
        # Seed (callee side): processPythonRRefFetchCall via getOwnerRRef.
        fetch = WaitingFetch(src=src, request_id=message.request_id, payload=message.payload)
        found = self.get_owner_rref(message.rref_id)
        if isinstance(found, PendingOwner):
            found.waiters.append(fetch)
        else:
            self._serve_fetch(found, fetch)

    def _on_fork_request(self, src: int, message: RRefForkRequest) -> None:
        # Seed (callee side): processRRefForkRequest.
        # NB(localrref): a fork request that overtook the PYTHON_REMOTE_CALL
        # creating its owner waits for it (getOwnerRRef), instead of
        # registering a fork of an RRef this worker has never heard of.
        found = self.get_owner_rref(message.rref_id)
        if isinstance(found, PendingOwner):
            found.waiters.append(WaitingForkRequest(src=src, request_id=message.request_id,
                                                    fork_id=message.fork_id))
            return
        self.add_fork_of_owner_if_not_present(message.rref_id, message.fork_id)
        self.fork_holders[message.fork_id] = (message.rref_id, src)
        self._ack(src, message)

    def _replay_owner_waiter(self, owner: OwnerRRef,
                             waiter: WaitingFetch | WaitingForkRequest) -> None:
        match waiter:
            case WaitingFetch():
                self._serve_fetch(owner, waiter)
            case WaitingForkRequest():
                self.add_fork_of_owner_if_not_present(owner.rref_id, waiter.fork_id)
                self.fork_holders[waiter.fork_id] = (owner.rref_id, waiter.src)
                self._emit(Send(dst=waiter.src, message=RRefAck(request_id=waiter.request_id)))

    def _on_value_reply(self, src: int, message: PythonRet | PythonRRefFetchRet) -> None:
        self._release_children_of(message.request_id)
        rrefs = self._receive_rrefs(src, message.rrefs)
        expected = RequestKind.CALL if isinstance(message, PythonRet) else RequestKind.FETCH
        request = self.requests.get(message.request_id)
        if request is not None and request.kind is expected:
            if self._step(request, Event.ANSWERED) is Outcome.DONE:
                for rref in rrefs:
                    if not rref.is_owner:
                        rref.holds += 1  # the driver's hold
                self._emit(Complete(request_id=message.request_id, payload=message.payload,
                                    rrefs=rrefs))
                return
        # NB(localrref): the caller gave up on this reply (timeout or
        # cancel). torch drops it, leaking every RRef inside; here they
        # are notified like any other and released at once.
        self.counters["late_replies"] += 1
        for rref in rrefs:
            if not rref.is_owner:
                self._drop_hold_if_unheld(rref)

    def _on_remote_ret(self, message: RemoteRet) -> None:
        self._release_children_of(message.request_id)
        request = self.requests.get(message.request_id)
        if request is None:
            self.counters["late_replies"] += 1
            return
        if request.kind not in (RequestKind.REMOTE, RequestKind.REMOTE_SELF):
            raise RRefInternalError(f"REMOTE_RET answers request {message.request_id}, a "
                                    f"{request.kind.value} request")
        self._step(request, Event.ANSWERED)
        if request.kind is RequestKind.REMOTE:
            self.confirm_pending_user(request.fork_id, reply=message)
        else:
            self.finish_creating_owner_rref(request.rref.rref_id, reply=message)

    def _on_ack(self, message: RRefAck) -> None:
        request = self.requests.get(message.request_id)
        if request is None:
            self.counters["late_replies"] += 1
            return
        if not request.is_control:
            raise RRefInternalError(f"RREF_ACK answers request {message.request_id}, a "
                                    f"{request.kind.value} request")
        self.requests.step(request, Event.ANSWERED, now=self._now)
        if request.kind is RequestKind.FORK_REQUEST:
            self.finish_fork_request(request.fork_id, request.parent)
        # Decrease after finishForkRequest, which sends a new message, so the
        # count never reads zero in between (the seed's comment).
        self.num_pending_futures -= 1

    def _on_exception(self, message: ExceptionMessage) -> None:
        self._release_children_of(message.request_id)
        request = self.requests.get(message.request_id)
        if request is None:
            self.counters["late_replies"] += 1
            return
        if self._step(request, Event.ANSWERED) is Outcome.DONE:
            self._tell_caller(request, RemoteFailure(message.payload))

    # ------------------------------------------------------------------
    # Shutdown and leak checks
    # ------------------------------------------------------------------

    def has_pending_users_or_children(self) -> bool:
        return bool(self.pending_users) or bool(self.pending_children)

    def delete_all_confirmed_users(self) -> None:
        """Step 2 of ``delAllUsersAndUnforkedOwners``: tryDel every confirmed user."""
        confirmed, self.confirmed_users = self.confirmed_users, {}
        for rref in confirmed.values():
            self.try_del(rref)

    def sweep_unforked_owners(self) -> list[GloballyUniqueId]:
        """Step 3 of ``delAllUsersAndUnforkedOwners``.

        An owner no fork ever reached gets no delete message (e.g. a remote()
        to self that timed out), so it is dropped here.
        """
        unforked = [rref_id for rref_id in self.owners if rref_id not in self.forks]
        for rref_id in unforked:
            self._log("info", f"Removing unforked OwnerRRef with RRefId: {rref_id}")
            del self.owners[rref_id]
            self._emit(Released(rref_id=rref_id))
        return unforked

    def leaks(self) -> list[tuple[GloballyUniqueId, GloballyUniqueId]]:
        """Every (rref id, fork id) still registered on this owner, sorted."""
        return sorted((rref_id, fork_id) for rref_id, forks in self.forks.items()
                      for fork_id in forks)

    def check_rref_leaks(self, ignore_rref_leak: bool) -> list[str]:
        """Seed: ``checkRRefLeaks``: one line per leaking fork.

        The warning goes out as a Log effect; with ``ignore_rref_leak`` False
        a leak raises :class:`RRefLeakError` carrying the same lines.
        """
        lines = [f"Leaking RRef {rref_id} with fork Id {fork_id}"
                 for rref_id, fork_id in self.leaks()]
        if lines:
            listing = "\n".join(lines) + "\n"
            self._log("warning", LEAK_WARNING_HEADER + listing)
            if not ignore_rref_leak:
                raise RRefLeakError(listing)
        return lines

    def destroy_instance(self, ignore_rref_leak: bool = True) -> list[OwnerRRef]:
        """Seed: ``destroyInstance``: stop sending deletes, check leaks, drop owners."""
        self.destroyed = True
        self.check_rref_leaks(ignore_rref_leak)
        deleted = list(self.owners.values())
        self.owners.clear()
        self.pending_owners.clear()
        return deleted

    def get_debug_info(self) -> dict[str, int]:
        """Seed: ``getDebugInfo`` (torch's four keys), plus localrref's counters."""
        info = {
            NUM_OWNER_RREFS: len(self.owners),
            NUM_PENDING_FUTURES: self.num_pending_futures,
            NUM_PENDING_USERS: len(self.pending_users),
            NUM_FORKS: sum(len(forks) for forks in self.forks.values()),
            "num_pending_children": len(self.pending_children),
            "num_confirmed_users": len(self.confirmed_users),
            "num_pending_owners": len(self.pending_owners),
            "num_outstanding_requests": len(self.requests),
            "num_running_jobs": len(self.jobs),
        }
        info.update(self.counters)
        return info

    def tables_empty(self) -> bool:
        """True when this worker holds no protocol state at all."""
        return not (self.owners or self.pending_owners or self.forks or self.pending_users
                    or self.pending_children or self.confirmed_users or self.requests
                    or self.jobs or self._value_waiters or self.num_pending_futures
                    or self._children_in_requests)


def creation_error_for(rref) -> object:
    """What a use of ``rref``, whose creation failed, fails with."""
    if rref.timed_out:
        return RRefCreationError(TIMED_OUT_CREATION_MESSAGE)
    return rref.creation_error


def _describe(error: object) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    if isinstance(error, RemoteFailure):
        # The payload is the owner's pickled exception, for the driver to
        # rebuild; its bytes say nothing to a reader.
        return "the function raised on the owner; to_here() raises that error"
    return repr(error)
