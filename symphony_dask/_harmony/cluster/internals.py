"""The private ``distributed`` API that Harmony's chunk groups rely on, one small function each.

The client and the group that leads a clustering iteration call the groups' dask actors directly
through the worker's ``actor_execute`` handler, without :class:`distributed.Actor`'s per-call future
machinery, which costs more Python per call than a block's work on a small group. None of what that
takes is public API of ``distributed``: each use sits behind a function here, and
``tests/test_distributed_internals.py`` checks every one against the installed ``distributed``, so
that an upgrade which breaks one fails there, by name, rather than as a hang or a wrong result in a
Harmony run.
"""

from __future__ import annotations

from typing import Any

from distributed.protocol import to_serialize


def actor_address(actor: Any) -> str:
    """The address of the worker holding ``actor`` (a :class:`distributed.Actor`): its ``_address``."""
    return actor._address


def connection(node: Any, address: str) -> Any:
    """The pooled RPC of ``node`` (a :class:`distributed.Client` or :class:`distributed.Worker`) to ``address``.

    That is ``node.rpc(address)``: its handlers are called as awaitable attributes, and the
    connection goes back to the node's pool after each call.
    """
    return node.rpc(address)


async def call_actor(rpc: Any, actor: Any, method: str, *args: Any) -> Any:
    """``method(*args)`` of ``actor`` through the ``actor_execute`` handler of its worker, reached by ``rpc``.

    ``rpc`` is a :func:`connection` to :func:`actor_address` of ``actor``. This is what
    :class:`distributed.Actor` does for a method call: a coroutine method runs on the worker's
    event loop, where :func:`distributed.get_worker` gives the worker. The handler answers
    ``{"status": "OK", "result": ...}`` or ``{"status": "error", "exception": ...}``.

    Raises
    ------
    Exception
        What the method raised; an ``OSError`` (such as distributed's ``CommClosedError``) if the
        worker cannot be reached; a ``KeyError`` of the actor's key if the worker does not hold
        the actor (see :func:`missing_actor_key`).
    """
    response = await rpc.actor_execute(
        function=method, actor=actor.key, args=[to_serialize(a) for a in args], kwargs={}
    )
    if response["status"] != "OK":
        raise response["exception"]
    return response["result"]


def missing_actor_key(err: BaseException) -> str | None:
    """The key named by ``err`` if it is a ``KeyError``, as a worker's ``actor_execute`` raises for a missing actor."""
    if isinstance(err, KeyError):
        return str(err).strip("'\"")
    return None


def is_actor_lost_error(err: BaseException) -> bool:
    """Whether ``err`` is :class:`distributed.Actor`'s own report that the worker holding the actor was lost."""
    return isinstance(err, RuntimeError) and "Actor was lost" in str(err)
