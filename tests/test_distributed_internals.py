"""The private distributed API behind symphony_dask/_harmony/cluster/internals.py, on a real cluster.

Each wrapper there stands for one internal of distributed that Harmony's chunk groups rely on; a
distributed upgrade that changes one fails here, naming it, instead of hanging a Harmony run.
"""

import contextlib

import distributed
import pytest
from distributed import get_worker
from distributed.comm import CommClosedError

from symphony_dask._harmony.cluster.actor import Lost, actor_call
from symphony_dask._harmony.cluster.internals import (
    actor_address,
    call_actor,
    connection,
    is_actor_lost_error,
    missing_actor_key,
)


def _changed(internal: str) -> str:
    return (
        f"distributed {distributed.__version__} changed {internal}; update symphony_dask/_harmony/cluster/internals.py"
    )


class Adder:
    """A small actor: a coroutine method, a plain one and one that fails."""

    def __init__(self, start: int) -> None:
        self.start = start

    async def add(self, x: int, y: int) -> int:
        return self.start + x + y

    def add_in_thread(self, x: int) -> int:
        return self.start + x

    async def worker_address(self) -> str:
        return get_worker().address

    async def fail(self) -> None:
        raise ValueError("as asked")

    async def call_peer(self, peer) -> int:
        """Call ``peer`` with this worker's connection pool, as a leading group calls its peers."""
        return await call_actor(connection(get_worker(), actor_address(peer)), peer, "add", 1, 2)


class _Elsewhere:
    """Stands for an actor that its worker does not hold (released, or its worker restarted)."""

    def __init__(self, key: str, address: str) -> None:
        self.key = key
        self._address = address


pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client(module_local_cluster):
    _, client = module_local_cluster(n_workers=1, processes=True)
    return client


@pytest.fixture()
def actor(client):
    future = client.submit(Adder, 10, actor=True, pure=False)
    yield future.result()
    client.cancel(future)


@contextlib.contextmanager
def _uses(internal: str):
    """Turn an unexpected error from ``internal`` into a failure that names it."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as err:
        raise AssertionError(_changed(internal)) from err


def _address_of(actor) -> str:
    with _uses("Actor._address"):
        return actor_address(actor)


def test_actor_address_is_its_worker(client, actor):
    (worker,) = client.scheduler_info(n_workers=-1)["workers"]
    with _uses("Actor._address"):
        assert actor_address(actor) == worker, _changed("Actor._address")


def test_actor_execute_runs_the_method(client, actor):
    with _uses("Client.rpc (a client's connection pool)"):
        rpc = connection(client, _address_of(actor))
    with _uses("the worker's actor_execute handler"):
        assert client.sync(call_actor, rpc, actor, "add", 1, 2) == 13, _changed("the worker's actor_execute handler")
        assert client.sync(call_actor, rpc, actor, "add_in_thread", 5) == 15, _changed("actor_execute (plain methods)")
    with _uses("get_worker() inside an actor's coroutine method"):
        where = client.sync(call_actor, rpc, actor, "worker_address")
        assert where == _address_of(actor), _changed("get_worker() inside an actor's coroutine method")
    with _uses("Worker.rpc (a worker's connection pool)"):
        from_the_worker = client.sync(call_actor, rpc, actor, "call_peer", actor)
        assert from_the_worker == 13, _changed("Worker.rpc (a worker's connection pool)")


def test_actor_execute_answers_as_expected(client, actor):
    """The response format that call_actor reads, and an error of the method raised again."""

    async def raw(method: str, *args):
        rpc = connection(client, _address_of(actor))
        return await rpc.actor_execute(function=method, actor=actor.key, args=list(args), kwargs={})

    with _uses("the worker's actor_execute handler"):
        ok = client.sync(raw, "add", 1, 2)
        error = client.sync(raw, "fail")
    assert set(ok) == {"status", "result"}, _changed(f"actor_execute's answer ({ok!r})")
    assert ok["status"] == "OK" and ok["result"] == 13, _changed(f"actor_execute's answer ({ok!r})")
    assert set(error) == {"status", "exception"}, _changed(f"actor_execute's error answer ({error!r})")
    assert error["status"] == "error", _changed(f"actor_execute's error answer ({error!r})")
    assert isinstance(error["exception"], ValueError), _changed(f"actor_execute's error answer ({error!r})")
    with _uses("actor_execute's error answer"), pytest.raises(ValueError, match="as asked"):
        client.sync(call_actor, connection(client, _address_of(actor)), actor, "fail")


def test_a_missing_actor_is_lost(client, actor):
    """A worker that lacks the actor answers with a KeyError of its key: the group counts as lost."""
    gone = _Elsewhere("harmony-not-there", _address_of(actor))
    rpc = connection(client, _address_of(actor))
    with _uses("actor_execute for an actor the worker lacks"), pytest.raises(KeyError) as raised:
        client.sync(call_actor, rpc, gone, "add", 1, 2)
    assert missing_actor_key(raised.value) == "harmony-not-there", _changed(
        f"actor_execute for an actor the worker lacks ({raised.value!r})"
    )
    lost = client.sync(actor_call, rpc, gone, "add", 1, 2)
    assert isinstance(lost, Lost), _changed(f"actor_execute for an actor the worker lacks ({lost!r})")
    assert isinstance(lost.cause, KeyError)


def test_an_actor_whose_worker_went_away_is_lost(client):
    """Actor's own error once its task is gone (not reached by Harmony's direct calls, recognized all the same)."""
    future = client.submit(Adder, 0, actor=True, pure=False)
    actor = future.result()
    client.cancel(future)
    with _uses("Actor's error for a lost worker"), pytest.raises(RuntimeError) as raised:
        _ = actor.add
    assert is_actor_lost_error(raised.value), _changed(f"Actor's error for a lost worker ({raised.value!r})")


def test_a_closed_comm_is_an_oserror():
    """Calls whose worker is gone raise distributed's CommClosedError, taken as an OSError."""
    assert issubclass(CommClosedError, OSError), _changed("CommClosedError (no longer an OSError)")
