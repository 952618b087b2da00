"""One test (or a few) per operation of the seed's RRefContext, named after it.

Each drives a real RRefContext by hand: no simulator, no processes. Messages
a context sends are read off its effects and handed to the peer explicitly,
so every test states the exact order it exercises.
"""

import pytest

from localrref.core import effects as fx
from localrref.core.ids import GloballyUniqueId as G
from localrref.core.messages import (
    MessageType, PythonCall, PythonRemoteCall, RemoteRet, RRefAck, RRefChildAccept,
    RRefForkRequest, RRefUserDelete,
)
from localrref.core.rref import OwnerRRef, RRefForkData, UserRRef
from localrref.core.rref_context import PendingOwner, RetryPolicy, RRefContext, creation_error_for
from localrref.core.shutdown import DelAllUsersAndUnforkedOwners, ShutdownPhase
from localrref.errors import RPCTimeoutError, RRefCreationError, RRefInternalError, RRefLeakError


def sends(effects, kind=None):
    out = [e for e in effects if isinstance(e, fx.Send)]
    return [e for e in out if kind is None or e.message.type is MessageType(kind)]


def only(items):
    assert len(items) == 1, items
    return items[0]


def of(effects, cls):
    return [e for e in effects if isinstance(e, cls)]


def deliver(src_ctx, dst_ctx, send, now=0.0):
    """Hand one Send effect of src_ctx to dst_ctx; return dst's effects."""
    assert send.dst == dst_ctx.worker_id
    return dst_ctx.handle(src_ctx.worker_id, send.message, now=now)


@pytest.fixture
def world():
    return [RRefContext(w) for w in range(3)]


def remote_from_user(world, caller=0, owner=1, now=0.0):
    """user `caller` calls remote() on `owner`; the call is delivered and runs."""
    c, o = world[caller], world[owner]
    user = c.remote(owner, "payload", now=now)
    call = only(sends(c.take_effects(), "PYTHON_REMOTE_CALL"))
    execute = only(of(deliver(c, o, call, now), fx.Execute))
    reply = only(sends(o.finish_remote(execute.job_id, "value"), "REMOTE_RET"))
    return user, execute.owner, reply


# ---------------------------------------------------------------- creation

def test_createUserRRef_generates_rref_id_then_fork_id(world):
    ctx = world[0]
    user = ctx.create_user_rref(1)
    assert (user.rref_id, user.fork_id) == (G(0, 0), G(0, 1))
    assert user.owner == 1 and not user.confirmed and user.holds == 0
    assert ctx.pending_users == {}, "the caller adds the pending user where the RPC happens"


def test_createUserRRef_refuses_the_owner(world):
    with pytest.raises(ValueError, match="Cannot create UserRRef on owner."):
        world[0].create_user_rref(0)
    with pytest.raises(ValueError, match="RRef owner cannot create user RRef."):
        world[0].create_user_rref(0, rref_id=G(1, 0), fork_id=G(1, 1))


def test_createUserRRef_with_ids_keeps_them(world):
    user = world[2].create_user_rref(1, rref_id=G(0, 5), fork_id=G(0, 9))
    assert (user.rref_id, user.fork_id) == (G(0, 5), G(0, 9))


def test_createOwnerRRef_is_not_in_owners_until_shared(world):
    ctx = world[0]
    owner = ctx.create_owner_rref()
    assert owner.rref_id == G(0, 0) and ctx.owners == {}
    ctx.prepare_child_fork(owner)
    assert ctx.owners == {owner.rref_id: owner}


def test_getOrCreateRRef_owner_finds_its_owner_and_user_gets_new_user(world):
    owner_ctx = world[1]
    owner = owner_ctx.get_or_create_owner_rref(G(0, 0))
    data = RRefForkData(owner=1, rref_id=G(0, 0), fork_id=G(0, 7), parent=0)
    assert owner_ctx.get_or_create_rref(data) is owner
    user = world[2].get_or_create_rref(data)
    assert isinstance(user, UserRRef) and user.fork_id == G(0, 7)


def test_getOrCreateOwnerRRef_creates_once_and_checks_type(world):
    ctx = world[1]
    first = ctx.get_or_create_owner_rref(G(0, 0), "PyObject")
    assert ctx.get_or_create_owner_rref(G(0, 0), "PyObject") is first
    with pytest.raises(RRefInternalError, match="OwnerRRef type is PyObject, expected type is "
                                                 r"Tensor|Expect OwnerRRef to be a sub-type"):
        ctx.get_or_create_owner_rref(G(0, 0), "Tensor")
    tensor_owner = ctx.get_or_create_owner_rref(G(0, 1), "Tensor")
    assert ctx.get_or_create_owner_rref(G(0, 1), "Tensor") is tensor_owner
    with pytest.raises(RRefInternalError, match="OwnerRRef type is Tensor, expected type is "
                                                 "PyObject"):
        ctx.get_or_create_owner_rref(G(0, 1), "PyObject")


def test_getOwnerRRef_parks_a_fetch_until_creation(world):
    user_ctx, owner_ctx = world[0], world[1]
    user = user_ctx.remote(1, "payload", now=0.0)
    call = only(sends(user_ctx.take_effects(), "PYTHON_REMOTE_CALL"))
    fetch_id = user_ctx.fetch(user, now=0.0)
    fetch = only(sends(user_ctx.take_effects(), "PYTHON_RREF_FETCH_CALL"))
    # The fetch overtakes the remote call: the owner does not exist yet.
    assert deliver(user_ctx, owner_ctx, fetch) == []
    assert isinstance(owner_ctx.get_owner_rref(user.rref_id), PendingOwner)
    execute = only(of(deliver(user_ctx, owner_ctx, call), fx.Execute))
    assert owner_ctx.pending_owners == {}
    effects = owner_ctx.finish_remote(execute.job_id, 42)
    fetch_job = only(of(effects, fx.Execute))
    assert fetch_job.kind is fx.JobKind.FETCH and fetch_job.owner.value == 42
    ret = only(sends(owner_ctx.finish_call(fetch_job.job_id, "42"), "PYTHON_RREF_FETCH_RET"))
    done = only(of(deliver(owner_ctx, user_ctx, ret), fx.Complete))
    assert (done.request_id, done.payload) == (fetch_id, "42")


def test_getOwnerRRef_forceCreated_asserts(world):
    with pytest.raises(RRefInternalError,
                       match=r"Expected OwnerRRef with id GloballyUniqueId\(created_on=0, "
                             r"local_id=3\) to be created."):
        world[1].get_owner_rref(G(0, 3), force_created=True)


def test_getOwnerRRef_returns_existing_owner(world):
    owner = world[1].get_or_create_owner_rref(G(0, 0))
    assert world[1].get_owner_rref(G(0, 0)) is owner


# ---------------------------------------------------------------- forking

def test_prepareChildFork_owner_registers_fork_early(world):
    ctx = world[0]
    owner = ctx.create_owner_rref()
    data = ctx.prepare_child_fork(owner)
    assert ctx.forks == {owner.rref_id: {data.fork_id}}
    assert ctx.owners[owner.rref_id] is owner
    assert ctx.pending_children == {}
    assert (data.owner, data.parent) == (0, 0)


def test_prepareChildFork_user_keeps_itself_as_pending_child(world):
    user, _, reply = remote_from_user(world)
    ctx = world[0]
    ctx.handle(1, reply.message, now=0.0)
    data = ctx.prepare_child_fork(user)
    assert ctx.pending_children == {data.fork_id: user}
    assert user.holds == 2  # the application's and the pending child's
    assert ctx.forks == {}, "a user never registers forks"


def test_prepareChildFork_refuses_timed_out_rref(world):
    ctx = world[0]
    user = ctx.remote(1, "payload", now=0.0, timeout=1.0)
    ctx.take_effects()
    ctx.on_tick(2.0)
    assert user.timed_out
    with pytest.raises(RRefCreationError,
                       match="RRef creation via rpc.remote\\(\\) timed out, and it is possible "
                             "that the RRef on the owner node does not exist."):
        ctx.prepare_child_fork(user)


def test_prepareChildFork_refuses_failed_rref_in_words(world):
    # The owner's exception travels pickled; the refusal names what happened
    # and where the error is, not the payload's bytes.
    c, o = world[0], world[1]
    user = c.remote(1, "payload", now=0.0)
    call = only(sends(c.take_effects(), "PYTHON_REMOTE_CALL"))
    execute = only(of(deliver(c, o, call), fx.Execute))
    reply = only(sends(o.fail_job(execute.job_id, b"\x80pickled ValueError"), "REMOTE_RET"))
    c.handle(1, reply.message, now=0.0)
    assert user.creation_failed
    with pytest.raises(RRefCreationError) as raised:
        c.prepare_child_fork(user)
    text = str(raised.value)
    assert "cannot be shared: its creation via rpc.remote() failed" in text
    assert "the function raised on the owner; to_here() raises that error" in text
    assert "payload" not in text and "pickled" not in text


def test_prepareChildFork_refuses_deleted_user(world):
    user, _, reply = remote_from_user(world)
    world[0].handle(1, reply.message, now=0.0)
    world[0].release(user)
    with pytest.raises(ValueError, match="Cannot call fork an UserRRef after deletion"):
        world[0].prepare_child_fork(user)


def test_abandon_child_fork_undoes_an_unsent_fork(world):
    ctx = world[0]
    owner = ctx.create_owner_rref()
    data = ctx.prepare_child_fork(owner)
    ctx.abandon_child_fork(data)
    assert ctx.forks == {} and ctx.owners == {}


def test_notifyOwnerAndParentOfFork_owner_to_self_drops_the_pickling_fork(world):
    ctx = world[0]
    owner = ctx.create_owner_rref()
    keep = ctx.prepare_child_fork(owner)
    data = ctx.prepare_child_fork(owner)
    received = ctx.get_or_create_rref(data)
    assert received is owner
    ctx.notify_owner_and_parent_of_fork(data.fork_id, 0, received)
    assert ctx.forks == {owner.rref_id: {keep.fork_id}}
    assert sends(ctx.take_effects()) == []


def test_notifyOwnerAndParentOfFork_owner_to_user_confirms_at_once(world):
    owner_ctx, user_ctx = world[0], world[1]
    owner = owner_ctx.create_owner_rref()
    data = owner_ctx.prepare_child_fork(owner)
    user = user_ctx.get_or_create_rref(data)
    user_ctx.notify_owner_and_parent_of_fork(data.fork_id, 0, user)
    assert user.confirmed and user_ctx.confirmed_users == {data.fork_id: user}
    assert sends(user_ctx.take_effects()) == [], "Early Fork Registration: no message needed"


def test_notifyOwnerAndParentOfFork_user_to_owner_sends_child_accept(world):
    user, owner, reply = remote_from_user(world)
    user_ctx, owner_ctx = world[0], world[1]
    user_ctx.handle(1, reply.message, now=0.0)
    data = user_ctx.prepare_child_fork(user)
    received = owner_ctx.get_or_create_rref(data)
    owner_ctx.notify_owner_and_parent_of_fork(data.fork_id, 0, received)
    accept = only(sends(owner_ctx.take_effects(), "RREF_CHILD_ACCEPT"))
    assert accept.dst == 0 and accept.message.fork_id == data.fork_id
    assert data.fork_id not in owner_ctx.forks[user.rref_id], "a phantom fork is never registered"
    assert owner_ctx.num_pending_futures == 1


def _call_owner_with_its_rref(world):
    """User 0 passes an RRef owned by 1 to worker 1 in a call; it arrives."""
    user, owner, reply = remote_from_user(world)
    user_ctx, owner_ctx = world[0], world[1]
    user_ctx.handle(1, reply.message, now=0.0)
    data = user_ctx.prepare_child_fork(user)
    request_id = user_ctx.rpc(1, "call", (data,), now=0.0)
    call = only(sends(user_ctx.take_effects(), "PYTHON_CALL"))
    execute = only(of(deliver(user_ctx, owner_ctx, call), fx.Execute))
    assert execute.rrefs == (owner,)
    return user, data, request_id, execute


@pytest.mark.parametrize("answer", ["reply", "exception", "late reply"])
def test_a_users_rref_sent_to_its_owner_in_a_call_is_accepted_by_the_reply(world, answer):
    # NB(localrref): no RREF_CHILD_ACCEPT (nor its ack) for a fork that rode
    # in a request: the parent stays held until the function has answered.
    user_ctx, owner_ctx = world[0], world[1]
    user, data, request_id, execute = _call_owner_with_its_rref(world)
    assert sends(owner_ctx.take_effects()) == []
    assert user_ctx.pending_children == {data.fork_id: user}
    if answer == "late reply":
        user_ctx.cancel(request_id)
    effects = (owner_ctx.fail_job(execute.job_id, b"boom") if answer == "exception"
               else owner_ctx.finish_call(execute.job_id, "result"))
    deliver(owner_ctx, user_ctx, only(sends(effects)))
    assert user_ctx.pending_children == {} and user.holds == 1  # the application's, only
    assert user_ctx.get_debug_info()["num_pending_children"] == 0


def test_a_users_rref_sent_to_an_owner_that_dies_is_let_go(world):
    user_ctx = world[0]
    user, data, request_id, execute = _call_owner_with_its_rref(world)
    user_ctx.on_peer_gone(1, RuntimeError("gone"), now=1.0)
    assert user_ctx.pending_children == {}


def test_a_dead_users_forks_are_released_on_the_owner(world):
    # NB(localrref): as if the dead user had deleted them (torch keeps them
    # for ever: it never learns of deaths).
    user, owner, reply = remote_from_user(world)
    owner_ctx = world[1]
    assert owner_ctx.forks == {owner.rref_id: {user.fork_id}}
    effects = owner_ctx.on_peer_gone(0, RuntimeError("gone"), now=1.0)
    assert owner_ctx.forks == {} and owner_ctx.owners == {} and owner_ctx.fork_holders == {}
    assert only(of(effects, fx.Released)).rref_id == owner.rref_id


def test_a_fork_the_owner_sent_to_a_worker_that_dies_is_released(world):
    owner_ctx = world[1]
    rref = owner_ctx.create_owner_rref()
    data = owner_ctx.prepare_child_fork(rref)
    owner_ctx.rpc(2, "call", (data,), now=0.0)
    owner_ctx.take_effects()
    assert owner_ctx.fork_holders == {data.fork_id: (rref.rref_id, 2)}
    owner_ctx.on_peer_gone(0, RuntimeError("another one"), now=1.0)
    assert owner_ctx.forks == {rref.rref_id: {data.fork_id}}  # not the one that died
    owner_ctx.on_peer_gone(2, RuntimeError("gone"), now=1.0)
    assert owner_ctx.forks == {} and owner_ctx.owners == {}


def test_a_child_that_dies_before_accepting_releases_its_parent(world):
    user, owner, reply = remote_from_user(world)
    parent = world[0]
    parent.handle(1, reply.message, now=0.0)
    data = parent.prepare_child_fork(user)
    parent.rpc(2, "call", (data,), now=0.0)
    parent.take_effects()
    assert parent.pending_children == {data.fork_id: user} and user.holds == 2
    parent.on_peer_gone(2, RuntimeError("gone"), now=1.0)
    assert parent.pending_children == {} and parent.child_holders == {} and user.holds == 1


def test_a_forked_user_whose_owner_dies_unconfirmed_fails_and_lets_its_job_run(world):
    # The child got a fork of rank 1's RRef in a call; it asked the owner
    # (RREF_FORK_REQUEST), and the owner died before answering: the call
    # runs anyway, and the RRef fails every use naming the dead.
    user, owner, reply = remote_from_user(world)
    parent, child = world[0], world[2]
    parent.handle(1, reply.message, now=0.0)
    data = parent.prepare_child_fork(user)
    parent.rpc(2, "call", (data,), now=0.0)
    call = only(sends(parent.take_effects(), "PYTHON_CALL"))
    effects = deliver(parent, child, call)
    assert of(effects, fx.Execute) == []  # waits for the owner's confirmation
    only(sends(effects, "RREF_FORK_REQUEST"))
    effects = child.on_peer_gone(1, RuntimeError("worker 1 died"), now=1.0)
    execute = only(of(effects, fx.Execute))
    (forked,) = execute.rrefs
    assert child.pending_users == {} and forked.creation_failed
    assert list(child.requests.values()) == []  # the fork request was dropped
    child.fetch(forked, now=1.0)
    assert "worker 1 died" in str(only(of(child.take_effects(), fx.Fail)).error)
    # The parent hears of the death too: its pending child of a dead owner's RRef goes.
    parent.on_peer_gone(1, RuntimeError("worker 1 died"), now=1.0)
    assert parent.pending_children == {}


def test_a_call_that_was_never_sent_abandons_every_fork_it_carried(world):
    user, owner, reply = remote_from_user(world)
    user_ctx = world[0]
    user_ctx.handle(1, reply.message, now=0.0)
    to_owner, to_third = user_ctx.prepare_child_fork(user), user_ctx.prepare_child_fork(user)
    request_id = user_ctx.rpc(1, "call", (to_owner, to_third), now=0.0)
    user_ctx.take_effects()
    assert len(user_ctx.pending_children) == 2
    effects = user_ctx.on_send_failed(request_id, OSError("pipe"), now=0.0)
    assert user_ctx.pending_children == {} and user.holds == 1
    assert only(of(effects, fx.Fail)).request_id == request_id


def test_notifyOwnerAndParentOfFork_user_to_user_sends_fork_request(world):
    user, owner, reply = remote_from_user(world)
    world[0].handle(1, reply.message, now=0.0)
    data = world[0].prepare_child_fork(user)
    child = world[2].get_or_create_rref(data)
    world[2].notify_owner_and_parent_of_fork(data.fork_id, 0, child)
    request = only(sends(world[2].take_effects(), "RREF_FORK_REQUEST"))
    assert request.dst == 1 and request.message.fork_id == data.fork_id
    assert world[2].pending_users[data.fork_id].rref is child


# ---------------------------------------------------------------- pending children/users

def test_addPendingChild_twice_asserts(world):
    ctx = world[0]
    user = ctx.create_user_rref(1)
    ctx.add_pending_child(G(0, 9), user)
    with pytest.raises(RRefInternalError, match="attempt to add the same child fork twice"):
        ctx.add_pending_child(G(0, 9), user)


def test_addPendingChild_refuses_owner(world):
    with pytest.raises(RRefInternalError, match="OwnerRRef should not have a pending child"):
        world[0].add_pending_child(G(0, 9), world[0].create_owner_rref())


def test_delPendingChild_is_idempotent_and_counted(world):
    ctx = world[0]
    user = ctx.create_user_rref(1)
    ctx.acquire(user)
    ctx.add_pending_child(G(0, 9), user)
    ctx.del_pending_child(G(0, 9))
    ctx.del_pending_child(G(0, 9))
    assert ctx.pending_children == {}
    assert ctx.get_debug_info()["duplicate_child_accepts"] == 1
    assert user.holds == 1


def test_addPendingUser_twice_asserts(world):
    ctx = world[0]
    user = ctx.create_user_rref(1)
    ctx.add_pending_user(user.fork_id, user)
    with pytest.raises(RRefInternalError, match="attempt to add the same UserRRef twice"):
        ctx.add_pending_user(user.fork_id, user)


def test_addPendingUser_refuses_owner(world):
    with pytest.raises(RRefInternalError, match="Attempt to add an OwnerRRef as a pending User"):
        world[0].add_pending_user(G(0, 1), world[0].create_owner_rref())


def test_delPendingUser_of_unknown_fork_asserts(world):
    with pytest.raises(RRefInternalError, match="attempt to delete a non-exist UserRRef"):
        world[0].del_pending_user(G(4, 4))


def test_delPendingUser_confirms_and_moves_to_confirmed_users(world):
    ctx = world[0]
    user = ctx.create_user_rref(1)
    ctx.acquire(user)
    ctx.add_pending_user(user.fork_id, user)
    ctx.del_pending_user(user.fork_id)
    assert user.confirmed and ctx.confirmed_users == {user.fork_id: user}
    assert ctx.pending_users == {} and user.holds == 1


def test_getPendingUser(world):
    ctx = world[0]
    user = ctx.create_user_rref(1)
    ctx.add_pending_user(user.fork_id, user)
    assert ctx.get_pending_user(user.fork_id) is user
    with pytest.raises(RRefInternalError, match="Pending user with forkId .* not found"):
        ctx.get_pending_user(G(9, 9))


def test_addConfirmedUser(world):
    ctx = world[0]
    user = ctx.create_user_rref(1)
    ctx.add_confirmed_user(user.fork_id, user)
    assert ctx.get_debug_info()["num_confirmed_users"] == 1


# ---------------------------------------------------------------- creation outcomes

def test_confirmPendingUser_on_success(world):
    user, owner, reply = remote_from_user(world)
    effects = world[0].handle(1, reply.message, now=0.0)
    settled = only(of(effects, fx.CreationSettled))
    assert settled.rref is user and settled.error is None
    assert user.confirmed and world[0].pending_users == {}


def test_confirmPendingUser_on_timeout_marks_timed_out(world):
    ctx = world[0]
    user = ctx.remote(1, "payload", now=0.0, timeout=0.5)
    ctx.take_effects()
    assert ctx.next_deadline() == 0.5
    effects = ctx.on_tick(0.5)
    settled = only(of(effects, fx.CreationSettled))
    # The creation future fails with the timeout (torch's _get_future());
    # later uses of the RRef with the creation error.
    assert isinstance(settled.error, RPCTimeoutError) and user.timed_out
    assert "RPC ran for more than set timeout" in str(settled.error)
    assert ctx.pending_users == {} and user.fork_id in ctx.confirmed_users
    with pytest.raises(RRefCreationError, match="RRef creation via rpc.remote\\(\\) timed out"):
        ctx.prepare_child_fork(user)


def test_confirmPendingUser_on_remote_error_remembers_it(world):
    ctx = world[0]
    user = ctx.remote(1, "payload", now=0.0)
    call = only(sends(ctx.take_effects(), "PYTHON_REMOTE_CALL"))
    execute = only(of(deliver(ctx, world[1], call), fx.Execute))
    reply = only(sends(world[1].fail_job(execute.job_id, "ZeroDivisionError"), "REMOTE_RET"))
    assert execute.owner.error == "ZeroDivisionError"
    settled = only(of(ctx.handle(1, reply.message, now=0.0), fx.CreationSettled))
    assert settled.error.payload == "ZeroDivisionError" and not user.confirmed
    request_id = ctx.fetch(user, now=0.0)
    failed = only(of(ctx.take_effects(), fx.Fail))
    assert failed.request_id == request_id and failed.error.payload == "ZeroDivisionError"


def test_confirmPendingUser_fork_mismatch_asserts(world):
    ctx = world[0]
    user = ctx.remote(1, "payload", now=0.0)
    with pytest.raises(RRefInternalError, match="confirmed pending user"):
        ctx.confirm_pending_user(user.fork_id, reply=RemoteRet(
            request_id=0, rref_id=user.rref_id, fork_id=G(7, 7)))


def test_finishCreatingOwnerRRef_success_drops_self_fork(world):
    ctx = world[0]
    owner = ctx.remote(0, "payload", now=0.0)
    assert ctx.forks == {owner.rref_id: {owner.rref_id}}
    call = only(sends(ctx.take_effects(), "PYTHON_REMOTE_CALL"))
    execute = only(of(ctx.handle(0, call.message, now=0.0), fx.Execute))
    assert execute.owner is owner
    reply = only(sends(ctx.finish_remote(execute.job_id, "v"), "REMOTE_RET"))
    effects = ctx.handle(0, reply.message, now=0.0)
    assert only(of(effects, fx.CreationSettled)).error is None
    assert ctx.forks == {} and ctx.owners == {}, "an unshared self-remote leaves no state"
    assert owner.value == "v"


def test_finishCreatingOwnerRRef_timeout_marks_owner(world):
    ctx = world[0]
    owner = ctx.remote(0, "payload", now=0.0, timeout=1.0)
    ctx.take_effects()
    effects = ctx.on_tick(1.5)
    assert owner.timed_out and ctx.owners == {} and ctx.forks == {}
    assert isinstance(only(of(effects, fx.CreationSettled)).error, RPCTimeoutError)


@pytest.mark.parametrize("dst", [1, 0], ids=["to_user", "to_self"])
def test_a_remote_whose_send_fault_injection_failed_counts_as_timed_out(world, dst):
    # Seed: RRef::handleError takes the faulty agent's INTENTIONAL_FAILURE
    # for a timeout: the creation future fails with the send's error, every
    # later use with torch's "RRef creation via rpc.remote() timed out".
    ctx = world[0]
    rref = ctx.remote(dst, "payload", now=0.0)
    call = only(sends(ctx.take_effects(), "PYTHON_REMOTE_CALL"))
    injected = RuntimeError("send failed on purpose")
    effects = ctx.on_send_failed(call.message.request_id, injected, now=0.0, intentional=True)
    assert only(of(effects, fx.CreationSettled)).error is injected
    assert rref.timed_out and rref.creation_failed
    assert "RRef creation via rpc.remote() timed out" in str(creation_error_for(rref))
    assert ctx.pending_users == {} and len(ctx.requests) == 0


def test_a_remote_whose_send_failed_otherwise_keeps_the_error(world):
    ctx = world[0]
    user = ctx.remote(1, "payload", now=0.0)
    call = only(sends(ctx.take_effects(), "PYTHON_REMOTE_CALL"))
    error = OSError("pipe")
    effects = ctx.on_send_failed(call.message.request_id, error, now=0.0)
    assert only(of(effects, fx.CreationSettled)).error is error
    assert not user.timed_out and creation_error_for(user) is error


def test_finishCreatingOwnerRRef_rejects_a_fork_reply(world):
    ctx = world[0]
    owner = ctx.remote(0, "payload", now=0.0)
    with pytest.raises(RRefInternalError, match="Expecting an OwnerRRef as RemoteRet but got a fork"):
        ctx.finish_creating_owner_rref(owner.rref_id, reply=RemoteRet(
            request_id=0, rref_id=owner.rref_id, fork_id=G(0, 99)))


def test_finishForkRequest_confirms_child_and_accepts_to_parent(world):
    user, owner, reply = remote_from_user(world)
    world[0].handle(1, reply.message, now=0.0)
    data = world[0].prepare_child_fork(user)
    child = world[2].get_or_create_rref(data)
    world[2].notify_owner_and_parent_of_fork(data.fork_id, 0, child)
    request = only(sends(world[2].take_effects(), "RREF_FORK_REQUEST"))
    ack = only(sends(deliver(world[2], world[1], request), "RREF_ACK"))
    assert data.fork_id in world[1].forks[user.rref_id]
    accept = only(sends(deliver(world[1], world[2], ack), "RREF_CHILD_ACCEPT"))
    assert child.confirmed and world[2].pending_users == {}
    assert accept.dst == 0
    deliver(world[2], world[0], accept)
    assert world[0].pending_children == {}


@pytest.mark.parametrize("answer", ["reply", "exception"])
def test_a_users_rref_passed_to_another_user_in_a_call_is_accepted_by_the_reply(world, answer):
    # NB(localrref): a pipeline stage's input. The child confirms its fork
    # with the owner as in the seed, but sends no RREF_CHILD_ACCEPT (nor gets
    # its ack): the function runs only after the owner's ack, so its reply
    # tells the parent that the owner knows the child.
    user, owner, reply = remote_from_user(world)
    parent_ctx, owner_ctx, child_ctx = world[0], world[1], world[2]
    parent_ctx.handle(1, reply.message, now=0.0)
    data = parent_ctx.prepare_child_fork(user)
    parent_ctx.rpc(2, "call", (data,), now=0.0)
    call = only(sends(parent_ctx.take_effects(), "PYTHON_CALL"))
    request = only(sends(deliver(parent_ctx, child_ctx, call), "RREF_FORK_REQUEST"))
    ack = only(sends(deliver(child_ctx, owner_ctx, request), "RREF_ACK"))
    assert data.fork_id in owner_ctx.forks[user.rref_id]
    effects = deliver(owner_ctx, child_ctx, ack)
    assert sends(effects) == [], "no RREF_CHILD_ACCEPT"
    execute = only(of(effects, fx.Execute))
    assert parent_ctx.pending_children == {data.fork_id: user}, "held until the reply"
    assert child_ctx.num_pending_futures == 0
    effects = (child_ctx.fail_job(execute.job_id, b"boom") if answer == "exception"
               else child_ctx.finish_call(execute.job_id, "result"))
    deliver(child_ctx, parent_ctx, only(sends(effects)))
    assert parent_ctx.pending_children == {} and user.holds == 1  # the application's, only


def test_a_users_rref_returned_to_another_user_is_still_accepted_by_a_message(world):
    # A fork in a reply: the child (the caller) owes its parent (the callee)
    # an RREF_CHILD_ACCEPT, as in the seed; no reply will carry it.
    user, owner, reply = remote_from_user(world)
    parent_ctx, owner_ctx, child_ctx = world[0], world[1], world[2]
    parent_ctx.handle(1, reply.message, now=0.0)
    request_id = child_ctx.rpc(0, "call", now=0.0)
    call = only(sends(child_ctx.take_effects(), "PYTHON_CALL"))
    execute = only(of(deliver(child_ctx, parent_ctx, call), fx.Execute))
    data = parent_ctx.prepare_child_fork(user)
    ret = only(sends(parent_ctx.finish_call(execute.job_id, "rref", (data,))))
    request = only(sends(deliver(parent_ctx, child_ctx, ret), "RREF_FORK_REQUEST"))
    ack = only(sends(deliver(child_ctx, owner_ctx, request), "RREF_ACK"))
    accept = only(sends(deliver(owner_ctx, child_ctx, ack), "RREF_CHILD_ACCEPT"))
    assert accept.dst == 0 and request_id is not None
    deliver(child_ctx, parent_ctx, accept)
    assert parent_ctx.pending_children == {}


# ---------------------------------------------------------------- owner fork bookkeeping

def test_addSelfAsFork_twice_asserts(world):
    ctx = world[0]
    owner = ctx.create_owner_rref()
    ctx.add_self_as_fork(owner)
    assert ctx.forks[owner.rref_id] == {owner.rref_id}
    with pytest.raises(RRefInternalError, match="Attempt to add self as fork twice"):
        ctx.add_self_as_fork(owner)


def test_addForkOfOwner_second_notification_asserts(world):
    ctx = world[1]
    ctx.add_fork_of_owner(G(0, 0), G(0, 1))
    with pytest.raises(RRefInternalError, match="Got fork notification twice on the same RRef"):
        ctx.add_fork_of_owner(G(0, 0), G(0, 1))


def test_addForkOfOwnerIfNotPresent_is_idempotent_and_counted(world):
    ctx = world[1]
    ctx.add_fork_of_owner_if_not_present(G(0, 0), G(0, 1))
    ctx.add_fork_of_owner_if_not_present(G(0, 0), G(0, 1))
    assert ctx.forks == {G(0, 0): {G(0, 1)}}
    assert ctx.get_debug_info()["duplicate_fork_requests"] == 1


def test_delForkOfOwner_is_idempotent_and_releases_with_last_fork(world):
    ctx = world[1]
    owner = ctx.get_or_create_owner_rref(G(0, 0), from_remote_call=True)
    ctx.add_fork_of_owner(G(0, 0), G(0, 1))
    ctx.add_fork_of_owner(G(0, 0), G(2, 5))
    assert ctx.del_fork_of_owner(G(0, 0), G(0, 1)) is None
    assert ctx.del_fork_of_owner(G(0, 0), G(0, 1)) is None  # a retried delete
    assert ctx.owners == {G(0, 0): owner}
    assert ctx.del_fork_of_owner(G(0, 0), G(2, 5)) is owner
    assert ctx.owners == {} and ctx.forks == {}
    assert only(of(ctx.take_effects(), fx.Released)).rref_id == G(0, 0)
    assert ctx.del_fork_of_owner(G(0, 0), G(2, 5)) is None  # after the owner is gone
    assert ctx.get_debug_info()["duplicate_user_deletes"] == 2


def test_delForkOfOwner_keeps_an_owner_awaiting_its_remote_call(world):
    ctx = world[1]
    early = ctx.get_or_create_owner_rref(G(0, 0))  # a fork arrived before the remote()
    assert early.awaiting_creation
    ctx.add_fork_of_owner(G(0, 0), G(2, 5))
    ctx.del_fork_of_owner(G(0, 0), G(2, 5))
    assert ctx.owners == {G(0, 0): early}
    assert ctx.get_or_create_owner_rref(G(0, 0), from_remote_call=True) is early
    assert not early.awaiting_creation


# ---------------------------------------------------------------- deleting users

def test_delUser_sends_delete_with_retries_and_forgets_confirmed(world):
    user, owner, reply = remote_from_user(world)
    ctx = world[0]
    ctx.handle(1, reply.message, now=0.0)
    ctx.release(user)
    delete = only(sends(ctx.take_effects(), "RREF_USER_DELETE"))
    assert delete.message == RRefUserDelete(request_id=delete.message.request_id,
                                            rref_id=user.rref_id, fork_id=user.fork_id)
    assert ctx.confirmed_users == {} and ctx.num_pending_futures == 1
    ack = only(sends(deliver(ctx, world[1], delete), "RREF_ACK"))
    assert world[1].owners == {}
    deliver(world[1], ctx, ack)
    assert ctx.num_pending_futures == 0 and ctx.tables_empty() and world[1].tables_empty()


def test_delUser_after_destroy_sends_nothing(world):
    ctx = world[0]
    ctx.destroy_instance()
    ctx.del_user(1, G(1, 0), G(0, 1))
    assert sends(ctx.take_effects()) == []


def test_delUser_is_deferred_while_pending(world):
    ctx = world[0]
    user = ctx.remote(1, "payload", now=0.0)
    call = only(sends(ctx.take_effects(), "PYTHON_REMOTE_CALL"))
    ctx.release(user)  # dropped before the owner confirmed it
    assert sends(ctx.take_effects(), "RREF_USER_DELETE") == []
    execute = only(of(deliver(ctx, world[1], call), fx.Execute))
    reply = only(sends(world[1].finish_remote(execute.job_id, 1), "REMOTE_RET"))
    effects = ctx.handle(1, reply.message, now=0.0)
    assert len(sends(effects, "RREF_USER_DELETE")) == 1


def test_user_delete_retries_with_torch_backoff(world):
    ctx = RRefContext(0, retry=RetryPolicy(max_retries=2, retry_duration=1.0, backoff=1.5,
                                           ack_timeout=10.0))
    ctx.del_user(1, G(1, 0), G(0, 1))
    delete = only(sends(ctx.take_effects()))
    rid = delete.message.request_id
    assert ctx.on_send_failed(rid, now=0.0) == []
    assert ctx.next_deadline() == 1.0
    assert sends(ctx.on_tick(1.0)) == [delete]
    ctx.on_send_failed(rid, now=1.0)
    assert ctx.next_deadline() == 2.5  # 1.0 * 1.5 ** 1 later
    assert sends(ctx.on_tick(2.5)) == [delete]
    effects = ctx.on_send_failed(rid, now=2.5)
    assert "Giving up on RREF_USER_DELETE" in only(of(effects, fx.Log)).text
    assert ctx.num_pending_futures == 0 and len(ctx.requests) == 0


def test_a_user_delete_to_a_dead_owner_is_dropped_at_once_not_retried(world):
    ctx = RRefContext(0, retry=RetryPolicy(max_retries=5, retry_duration=1.0))
    ctx.del_user(1, G(1, 0), G(0, 1))
    rid = only(sends(ctx.take_effects())).message.request_id
    assert ctx.on_send_failed(rid, RuntimeError("rank 1 died"), now=0.0, peer_gone=True) == []
    assert ctx.num_pending_futures == 0 and len(ctx.requests) == 0
    assert ctx.next_deadline() is None


def test_user_delete_ack_timeout_counts_as_failed_send(world):
    ctx = RRefContext(0, retry=RetryPolicy(ack_timeout=5.0))
    ctx.del_user(1, G(1, 0), G(0, 1))
    delete = only(sends(ctx.take_effects()))
    assert ctx.on_tick(5.0) == []
    assert sends(ctx.on_tick(6.0)) == [delete]
    assert ctx.get_debug_info()["retries"] == 1


# ---------------------------------------------------------------- pending RRef recording

def test_recordThreadLocalPendingRRefs_twice_with_leftovers_asserts(world):
    ctx = world[0]
    ctx.record_thread_local_pending_rrefs()
    ctx.add_pending_user(G(1, 1), ctx.create_user_rref(1, rref_id=G(1, 0), fork_id=G(1, 1)))
    with pytest.raises(RRefInternalError, match="User RRef Table should be empty"):
        ctx.record_thread_local_pending_rrefs()
    ctx.clear_recorded_pending_rrefs_on_error()
    ctx.record_thread_local_pending_rrefs()


def test_waitForThreadLocalPendingRRefs_counts_down_to_the_job(world):
    user, owner, reply = remote_from_user(world)
    world[0].handle(1, reply.message, now=0.0)
    data = world[0].prepare_child_fork(user)
    call = PythonCall(request_id=0, payload="f", rrefs=(data,))
    effects = world[2].handle(0, call, now=0.0)
    assert of(effects, fx.Execute) == [], "must wait until the argument RRef is confirmed"
    request = only(sends(effects, "RREF_FORK_REQUEST"))
    ack = only(sends(deliver(world[2], world[1], request), "RREF_ACK"))
    execute = only(of(deliver(world[1], world[2], ack), fx.Execute))
    assert execute.rrefs[0].fork_id == data.fork_id and execute.rrefs[0].confirmed


def test_waitForThreadLocalPendingRRefs_with_nothing_pending_is_done(world):
    ctx = world[0]
    ctx.record_thread_local_pending_rrefs()
    assert ctx.wait_for_thread_local_pending_rrefs().done


def test_clearRecordedPendingRRefsOnError_resets_recording(world):
    ctx = world[0]
    ctx.record_thread_local_pending_rrefs()
    ctx.add_pending_user(G(1, 1), ctx.create_user_rref(1, rref_id=G(1, 0), fork_id=G(1, 1)))
    ctx.clear_recorded_pending_rrefs_on_error()
    assert ctx.wait_for_thread_local_pending_rrefs().remaining == 0


# ---------------------------------------------------------------- shutdown and leaks

def test_delAllUsersAndUnforkedOwners_waits_then_deletes_then_waits_for_owners(world):
    user, owner, reply = remote_from_user(world)
    user_ctx, owner_ctx = world[0], world[1]
    on_user = DelAllUsersAndUnforkedOwners(user_ctx, now=0.0, timeout=10.0)
    assert on_user.poll(0.0) == [] and on_user.phase is ShutdownPhase.WAIT_PENDING
    user_ctx.handle(1, reply.message, now=1.0)
    delete = only(sends(on_user.poll(1.0), "RREF_USER_DELETE"))
    assert on_user.done  # this worker owns nothing
    on_owner = DelAllUsersAndUnforkedOwners(owner_ctx, now=1.0, timeout=10.0)
    assert on_owner.poll(1.0) == [] and on_owner.phase is ShutdownPhase.WAIT_OWNERS
    owner_ctx.handle(0, delete.message, now=2.0)
    on_owner.poll(2.0)
    assert on_owner.done and on_owner.timed_out == []
    assert user.deleted_on_owner and owner_ctx.owners == {}


def test_delAllUsersAndUnforkedOwners_sweeps_unforked_owners(world):
    ctx = world[0]
    ctx.owners[G(0, 5)] = OwnerRRef(0, G(0, 5), "PyObject")
    machine = DelAllUsersAndUnforkedOwners(ctx, now=0.0, timeout=1.0)
    effects = machine.poll(0.0)
    assert machine.done and ctx.owners == {}
    assert any("Removing unforked OwnerRRef" in e.text for e in of(effects, fx.Log))


def test_delAllUsersAndUnforkedOwners_deadlines_are_the_callers(world):
    ctx = world[0]
    ctx.remote(1, "payload", now=0.0)  # never confirmed
    ctx.get_or_create_owner_rref(G(2, 0), from_remote_call=True)
    ctx.add_fork_of_owner(G(2, 0), G(2, 1))  # a fork nobody will delete
    machine = DelAllUsersAndUnforkedOwners(ctx, now=0.0, timeout=5.0)
    assert machine.poll(4.9) == [] or not machine.done
    effects = machine.poll(5.0)
    assert machine.phase is ShutdownPhase.WAIT_OWNERS
    assert any("Timed out waiting for pending UserRRefs" in e.text for e in of(effects, fx.Log))
    machine.poll(9.9)
    assert not machine.done
    effects = machine.poll(10.0)
    assert machine.done and machine.timed_out == [ShutdownPhase.WAIT_PENDING,
                                                   ShutdownPhase.WAIT_OWNERS]
    assert any("Timed out waiting for pending OwnerRRefs" in e.text for e in of(effects, fx.Log))
    with pytest.raises(ValueError):
        DelAllUsersAndUnforkedOwners(ctx, now=0.0, timeout=0)


def test_checkRRefLeaks_lists_every_leak_in_the_seed_wording(world):
    ctx = world[1]
    ctx.add_fork_of_owner(G(0, 0), G(0, 1))
    ctx.add_fork_of_owner(G(0, 0), G(2, 3))
    lines = ctx.check_rref_leaks(ignore_rref_leak=True)
    assert lines == [
        "Leaking RRef GloballyUniqueId(created_on=0, local_id=0) with fork Id "
        "GloballyUniqueId(created_on=0, local_id=1)",
        "Leaking RRef GloballyUniqueId(created_on=0, local_id=0) with fork Id "
        "GloballyUniqueId(created_on=2, local_id=3)",
    ]
    warning = only(of(ctx.take_effects(), fx.Log))
    assert warning.level == "warning"
    assert warning.text.startswith("Detected RRef Leaks during shutdown.")
    with pytest.raises(RRefLeakError, match="Leaking RRef .* with fork Id"):
        ctx.check_rref_leaks(ignore_rref_leak=False)


def test_checkRRefLeaks_without_leaks_is_silent(world):
    assert world[0].check_rref_leaks(ignore_rref_leak=False) == []
    assert world[0].take_effects() == []


def test_destroyInstance_checks_leaks_and_drops_owners(world):
    ctx = world[0]
    owner = ctx.create_owner_rref()
    ctx.owners[owner.rref_id] = owner
    ctx.get_owner_rref(G(1, 1))  # a pending owner
    assert ctx.destroy_instance(ignore_rref_leak=False) == [owner]
    assert ctx.owners == {} and ctx.pending_owners == {} and ctx.destroyed
    leaky = world[1]
    leaky.add_fork_of_owner(G(0, 0), G(0, 1))
    with pytest.raises(RRefLeakError):
        leaky.destroy_instance(ignore_rref_leak=False)


def test_getDebugInfo_has_torchs_keys_and_counts_tables(world):
    user, owner, reply = remote_from_user(world)
    info = world[1].get_debug_info()
    assert {k: info[k] for k in ("num_owner_rrefs", "num_pending_futures",
                                 "num_pending_users", "num_forks")} == {
        "num_owner_rrefs": 1, "num_pending_futures": 0, "num_pending_users": 0, "num_forks": 1}
    assert world[0].get_debug_info()["num_pending_users"] == 1


# ---------------------------------------------------------------- calls, timeouts, late replies

def test_rpc_timeout_fails_with_torchs_message(world):
    ctx = world[0]
    rid = ctx.rpc(1, "f", now=0.0, timeout=2.0)
    ctx.take_effects()
    failed = only(of(ctx.on_tick(2.0), fx.Fail))
    assert failed.request_id == rid and isinstance(failed.error, RPCTimeoutError)
    assert "RPC ran for more than set timeout (2000 ms)" in str(failed.error)


def test_late_reply_rrefs_are_notified_and_released(world):
    owner_ctx, caller = world[1], world[0]
    rid = caller.rpc(1, "f", now=0.0, timeout=1.0)
    call = only(sends(caller.take_effects()))
    caller.on_tick(1.0)  # the caller gives up
    execute = only(of(deliver(caller, owner_ctx, call), fx.Execute))
    local = owner_ctx.create_owner_rref()
    data = owner_ctx.prepare_child_fork(local)
    ret = only(sends(owner_ctx.finish_call(execute.job_id, "r", (data,))))
    effects = deliver(owner_ctx, caller, ret)
    assert of(effects, fx.Complete) == []
    delete = only(sends(effects, "RREF_USER_DELETE"))
    deliver(caller, owner_ctx, delete)
    assert owner_ctx.owners == {} and owner_ctx.forks == {}
    assert caller.get_debug_info()["late_replies"] == 1 and rid == 0


def test_fetch_waiting_wakes_when_creation_times_out(world):
    ctx = world[0]
    user = ctx.remote(1, "payload", now=0.0, timeout=1.0)
    ctx.take_effects()
    rid = ctx.fetch(user, now=0.1)
    ctx.take_effects()
    failed = [e for e in ctx.on_tick(1.0) if isinstance(e, fx.Fail)]
    assert [f.request_id for f in failed] == [rid]
    assert "timed out" in str(failed[0].error)


def test_fetch_holds_the_user_until_the_owner_answers(world):
    user, owner, reply = remote_from_user(world)
    ctx = world[0]
    ctx.handle(1, reply.message, now=0.0)
    rid = ctx.fetch(user, now=0.0, timeout=1.0)
    fetch = only(sends(ctx.take_effects()))
    ctx.release(user)
    assert sends(ctx.take_effects()) == [], "no delete may overtake the fetch"
    assert only(of(ctx.on_tick(1.0), fx.Fail)).request_id == rid
    job = only(of(deliver(ctx, world[1], fetch), fx.Execute))
    ret = only(sends(world[1].finish_call(job.job_id, "v")))
    assert len(sends(deliver(world[1], ctx, ret), "RREF_USER_DELETE")) == 1


def test_handle_rejects_non_messages(world):
    with pytest.raises(TypeError, match="not a protocol message"):
        world[0].handle(1, "hello", now=0.0)


def test_time_never_goes_backwards(world):
    ctx = world[0]
    ctx.on_tick(5.0)
    ctx.rpc(1, "f", now=4.0, timeout=1.0)  # a caller that read the clock a little earlier
    assert ctx.next_deadline() == 6.0


def test_unexpected_reply_kinds_are_internal_errors(world):
    ctx = world[0]
    rid = ctx.rpc(1, "f", now=0.0)
    with pytest.raises(RRefInternalError, match="RREF_ACK answers request"):
        ctx.handle(1, RRefAck(request_id=rid), now=0.0)
    with pytest.raises(RRefInternalError, match="REMOTE_RET answers request"):
        ctx.handle(1, RemoteRet(request_id=rid, rref_id=G(0, 0), fork_id=G(0, 1)), now=0.0)


def test_fork_request_before_creation_waits_for_the_owner(world):
    owner_ctx = world[1]
    request = RRefForkRequest(request_id=3, rref_id=G(0, 0), fork_id=G(2, 1))
    assert owner_ctx.handle(2, request, now=0.0) == []
    call = PythonRemoteCall(request_id=0, payload="p", rref_id=G(0, 0), fork_id=G(0, 1))
    effects = owner_ctx.handle(0, call, now=0.0)
    ack = only(sends(effects, "RREF_ACK"))
    assert ack.dst == 2 and ack.message.request_id == 3
    assert owner_ctx.forks[G(0, 0)] == {G(0, 1), G(2, 1)}


def test_duplicate_child_accept_and_user_delete_messages_are_harmless(world):
    owner_ctx = world[1]
    owner_ctx.get_or_create_owner_rref(G(0, 0), from_remote_call=True)
    owner_ctx.add_fork_of_owner(G(0, 0), G(0, 1))
    delete = RRefUserDelete(request_id=4, rref_id=G(0, 0), fork_id=G(0, 1))
    for _ in range(2):
        assert only(sends(owner_ctx.handle(0, delete, now=0.0))).message == RRefAck(request_id=4)
    accept = RRefChildAccept(request_id=5, fork_id=G(9, 9))
    assert only(sends(owner_ctx.handle(0, accept, now=0.0))).message == RRefAck(request_id=5)
    assert owner_ctx.tables_empty()
