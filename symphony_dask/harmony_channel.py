"""A lean message channel between the Harmony group that leads a clustering iteration and its peers.

A block of a clustering iteration is one small request to each peer (the block's penalty, p x k)
and one small reply (its ``S``, p x k). Through distributed's RPC such a round trip costs ~1.5 ms
of Python on each side; over a plain asyncio stream, ~0.3 ms (both measured between two worker
processes here), and on a busy worker that time comes out of the computation. So the leader keeps a
TCP connection to each peer for the run, on the host of the peer's worker.

The channel carries only numbers: integers, float64 scalars and arrays, int64 arrays and None,
in a fixed binary layout (never pickle), and a peer accepts a connection only after it has
presented the run's random token, which reached both sides through dask's own comms. Clusters
whose comms are not plain TCP (TLS, UCX) do not use it: their blocks go through dask's RPC.
"""

from __future__ import annotations

import asyncio
import hmac
import struct
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

TOKEN_BYTES = 32
_LENGTH = struct.Struct("<q")


# ----------------------------------------------------------------------------------------------
# the binary layout
# ----------------------------------------------------------------------------------------------


def encode(items: tuple | list) -> bytes:
    """A message of ints, floats, None and NumPy arrays (float64 or int64), nested tuples flattened
    with a count so that :func:`decode` gives the same structure back."""
    out: list[bytes] = []
    _encode(items, out)
    body = b"".join(out)
    return _LENGTH.pack(len(body)) + body


def _encode(item: Any, out: list[bytes]) -> None:
    if item is None:
        out.append(b"n")
    elif isinstance(item, (bool, np.bool_)):
        raise TypeError("booleans are not sent on the channel")
    elif isinstance(item, (int, np.integer)):
        out.append(b"i" + struct.pack("<q", int(item)))
    elif isinstance(item, (float, np.floating)):
        out.append(b"f" + struct.pack("<d", float(item)))
    elif isinstance(item, str):
        data = item.encode()
        out.append(b"s" + struct.pack("<q", len(data)) + data)
    elif isinstance(item, np.ndarray):
        kind = {np.dtype(np.float64): b"a", np.dtype(np.int64): b"l"}.get(item.dtype)
        if kind is None:
            raise TypeError(f"arrays of {item.dtype} are not sent on the channel")
        out.append(kind + struct.pack(f"<q{item.ndim}q", item.ndim, *item.shape) + np.ascontiguousarray(item).tobytes())
    elif isinstance(item, (tuple, list)):
        out.append(b"t" + struct.pack("<q", len(item)))
        for x in item:
            _encode(x, out)
    else:
        raise TypeError(f"{type(item).__name__} is not sent on the channel")


def decode(body: bytes) -> Any:
    """The structure :func:`encode` wrote (without its length prefix); tuples come back as tuples."""
    view = memoryview(body)
    item, end = _decode(view, 0)
    if end != len(body):
        raise ValueError("trailing bytes in a channel message")
    return item


def _decode(view: memoryview, at: int) -> tuple[Any, int]:
    kind = bytes(view[at : at + 1])
    at += 1
    if kind == b"n":
        return None, at
    if kind in (b"i", b"f"):
        (value,) = struct.unpack_from("<q" if kind == b"i" else "<d", view, at)
        return value, at + 8
    if kind == b"s":
        (n,) = struct.unpack_from("<q", view, at)
        return bytes(view[at + 8 : at + 8 + n]).decode(), at + 8 + n
    if kind in (b"a", b"l"):
        (ndim,) = struct.unpack_from("<q", view, at)
        shape = struct.unpack_from(f"<{ndim}q", view, at + 8)
        at += 8 + 8 * ndim
        dtype = np.float64 if kind == b"a" else np.int64
        size = int(np.prod(shape, dtype=np.int64)) * 8
        array = np.frombuffer(view[at : at + size], dtype=dtype).reshape(shape).copy()
        return array, at + size
    if kind == b"t":
        (n,) = struct.unpack_from("<q", view, at)
        at += 8
        items = []
        for _ in range(n):
            item, at = _decode(view, at)
            items.append(item)
        return tuple(items), at
    raise ValueError(f"unknown item {kind!r} in a channel message")


async def _read(reader: asyncio.StreamReader) -> Any:
    (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return decode(await reader.readexactly(n))


# ----------------------------------------------------------------------------------------------
# the peer's side
# ----------------------------------------------------------------------------------------------


async def serve(host: str, token: bytes, handler: Callable[..., Awaitable[Any]]) -> asyncio.AbstractServer:
    """Listen on ``host`` (a free port) for connections that present ``token``; each request is a
    tuple of arguments for ``handler``, each reply ``("ok", result)`` or ``("error", message)``.

    ``handler`` is held weakly through its object (a bound method), so a forgotten server does
    not keep its group alive: requests then get an error.
    """
    method = weakref.WeakMethod(handler) if hasattr(handler, "__self__") else (lambda: handler)

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            presented = await reader.readexactly(TOKEN_BYTES)
            if not hmac.compare_digest(presented, token):
                return
            while True:
                request = await _read(reader)
                fn = method()
                try:
                    if fn is None:
                        raise RuntimeError("the chunk group behind this channel is gone")
                    reply = ("ok", await fn(*request))
                except Exception as err:  # sent back to the leader, which raises it
                    reply = ("error", f"{type(err).__name__}: {err}")
                writer.write(encode(reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(connection, host=host, port=0)


# ----------------------------------------------------------------------------------------------
# the leader's side
# ----------------------------------------------------------------------------------------------


class ChannelError(RuntimeError):
    """A peer answered a request with an error."""


class Channel:
    """The leader's connection to one peer."""

    def __init__(self, endpoint: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.endpoint = endpoint
        self._reader = reader
        self._writer = writer

    @staticmethod
    async def open(endpoint: tuple[str, int], token: bytes) -> Channel:
        reader, writer = await asyncio.open_connection(*endpoint)
        writer.write(token)
        return Channel(endpoint, reader, writer)

    async def call(self, *args: Any) -> Any:
        """Send one request and wait for its reply (``ConnectionError`` and
        ``asyncio.IncompleteReadError`` mean the peer is gone)."""
        self._writer.write(encode(args))
        await self._writer.drain()
        status, result = await _read(self._reader)
        if status != "ok":
            raise ChannelError(result)
        return result

    def close(self) -> None:
        self._writer.close()
