"""A lean message channel between the Harmony group that leads a clustering iteration and its peers.

A block of a clustering iteration is one small request to each peer (the block's penalty, p x k)
and one small reply (its ``S``, p x k). Through distributed's RPC such a round trip costs several
times the Python on each side that it costs over a plain asyncio stream, and on a busy worker that
time comes out of the computation. So the leader keeps a TCP connection to each peer for the run,
on the host of the peer's worker.

The channel carries only numbers: integers, float64 scalars and arrays, int64 arrays and None,
in a fixed binary layout (never pickle), and a peer accepts a connection only after it has
presented the run's random token, which reached both sides through dask's own comms. Clusters
whose comms are not plain TCP (TLS, UCX) do not use it: their blocks go through dask's RPC.

A peer reads nothing from a connection but the token until the token has arrived, gives the
token :data:`TOKEN_TIMEOUT` seconds, serves at most :data:`MAX_CONNECTIONS` connections at a time
and checks every length, count and shape of a message against what the message holds, so a
connection can cost it neither unbounded memory nor time. The leader gives a peer
:data:`CONNECT_TIMEOUT` seconds to accept the connection and :data:`HANDSHAKE_TIMEOUT` seconds to
acknowledge the token; a firewall that drops or rejects the connection makes :meth:`Channel.open`
raise an ``OSError``.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import struct
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

TOKEN_BYTES = 32
#: What a peer sends back once the token is right.
ACCEPTED = b"SDC1"
#: Seconds the leader waits for a peer to accept its connection.
CONNECT_TIMEOUT = 5.0
#: Seconds the leader waits for a peer to acknowledge the token.
HANDSHAKE_TIMEOUT = 5.0
#: Seconds a peer waits for a new connection's token before closing it.
TOKEN_TIMEOUT = 5.0
#: Connections a peer serves at a time; it closes further ones at once.
MAX_CONNECTIONS = 64
#: Largest message body, in bytes (a block's messages are a few kB).
MAX_MESSAGE_BYTES = 1 << 30
#: Most dimensions of an array in a message.
MAX_NDIM = 8
#: Deepest nesting of tuples in a message.
MAX_DEPTH = 16

_INT = struct.Struct("<q")
_FLOAT = struct.Struct("<d")
_DTYPES = {b"a": np.dtype("<f8"), b"l": np.dtype("<i8")}
_KINDS = {np.dtype(np.float64): b"a", np.dtype(np.int64): b"l"}


# ----------------------------------------------------------------------------------------------
# the binary layout
# ----------------------------------------------------------------------------------------------


def encode(items: tuple | list) -> bytes:
    """A message of ints, floats, None, str and NumPy arrays (float64 or int64), in nested tuples.

    Tuples are flattened with a count, so that :func:`decode` gives the same structure back.

    Parameters
    ----------
    items
        The message's items.

    Returns
    -------
    bytes
        The body's length (8 bytes, little-endian) followed by the body.

    Raises
    ------
    TypeError
        For an item the channel does not carry.
    ValueError
        For an array of more than :data:`MAX_NDIM` dimensions or a body over :data:`MAX_MESSAGE_BYTES`.
    """
    out: list[bytes] = []
    _encode(items, out)
    body = b"".join(out)
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"a channel message of {len(body)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    return _INT.pack(len(body)) + body


def _encode(item: Any, out: list[bytes]) -> None:
    if item is None:
        out.append(b"n")
    elif isinstance(item, (bool, np.bool_)):
        raise TypeError("booleans are not sent on the channel")
    elif isinstance(item, (int, np.integer)):
        out.append(b"i" + _INT.pack(int(item)))
    elif isinstance(item, (float, np.floating)):
        out.append(b"f" + _FLOAT.pack(float(item)))
    elif isinstance(item, str):
        data = item.encode()
        out.append(b"s" + _INT.pack(len(data)) + data)
    elif isinstance(item, np.ndarray):
        kind = _KINDS.get(item.dtype)
        if kind is None:
            raise TypeError(f"arrays of {item.dtype} are not sent on the channel")
        if item.ndim > MAX_NDIM:
            raise ValueError(f"arrays of {item.ndim} dimensions are not sent on the channel (at most {MAX_NDIM})")
        data = np.ascontiguousarray(item, dtype=_DTYPES[kind]).tobytes()
        out.append(kind + struct.pack(f"<q{item.ndim}q", item.ndim, *item.shape) + data)
    elif isinstance(item, (tuple, list)):
        out.append(b"t" + _INT.pack(len(item)))
        for x in item:
            _encode(x, out)
    else:
        raise TypeError(f"{type(item).__name__} is not sent on the channel")


def decode(body: bytes) -> Any:
    """The structure :func:`encode` wrote (without its length prefix); tuples come back as tuples.

    Raises
    ------
    ValueError
        If ``body`` is not one whole well-formed message: truncated, with trailing bytes, with an
        unknown item, or with a length, count, shape or nesting that the message cannot hold.
    """
    view = memoryview(body)
    item, end = _decode(view, 0, 0)
    if end != len(view):
        raise ValueError(f"{len(view) - end} trailing byte(s) in a channel message")
    return item


def _take(view: memoryview, at: int, n: int, what: str) -> int:
    """The offset after ``n`` bytes of ``what`` at ``at``; ``ValueError`` unless the message holds them."""
    if n > len(view) - at:
        raise ValueError(f"truncated channel message: {what} needs {n} byte(s) at offset {at}, {len(view) - at} left")
    return at + n


def _count(view: memoryview, at: int, what: str) -> int:
    """A non-negative 8-byte count at ``at``."""
    _take(view, at, 8, what)
    (n,) = _INT.unpack_from(view, at)
    if n < 0:
        raise ValueError(f"negative {what} ({n}) in a channel message")
    return n


def _decode(view: memoryview, at: int, depth: int) -> tuple[Any, int]:
    start = at
    at = _take(view, at, 1, "an item")
    kind = bytes(view[start:at])
    if kind == b"n":
        return None, at
    if kind in (b"i", b"f"):
        _take(view, at, 8, "a number")
        (value,) = (_INT if kind == b"i" else _FLOAT).unpack_from(view, at)
        return value, at + 8
    if kind == b"s":
        n = _count(view, at, "string length")
        end = _take(view, at + 8, n, "a string")
        return bytes(view[at + 8 : end]).decode(), end
    if kind in _DTYPES:
        ndim = _count(view, at, "number of dimensions")
        if ndim > MAX_NDIM:
            raise ValueError(f"an array of {ndim} dimensions in a channel message (at most {MAX_NDIM})")
        at = _take(view, at + 8, 8 * ndim, "an array's shape")
        shape = struct.unpack_from(f"<{ndim}q", view, at - 8 * ndim)
        if any(n < 0 for n in shape):
            raise ValueError(f"an array of shape {shape} (a negative dimension) in a channel message")
        if math.prod(max(n, 1) for n in shape) > MAX_MESSAGE_BYTES // 8:
            raise ValueError(f"an array of shape {shape} in a channel message, more than a message can hold")
        end = _take(view, at, 8 * math.prod(shape), f"an array of shape {shape}")
        array = np.frombuffer(view[at:end], dtype=_DTYPES[kind]).reshape(shape)
        return array.astype(_DTYPES[kind].newbyteorder("=")), end  # a copy, in native byte order
    if kind == b"t":
        n = _count(view, at, "tuple length")
        at += 8
        if n > len(view) - at:  # every item takes a byte at least
            raise ValueError(f"a tuple of {n} items in the {len(view) - at} byte(s) left of a channel message")
        if depth == MAX_DEPTH:
            raise ValueError(f"tuples nested deeper than {MAX_DEPTH} in a channel message")
        items = []
        for _ in range(n):
            item, at = _decode(view, at, depth + 1)
            items.append(item)
        return tuple(items), at
    raise ValueError(f"unknown item {kind!r} in a channel message")


async def read_message(reader: asyncio.StreamReader) -> Any:
    """The next message on ``reader``, decoded.

    Raises
    ------
    ValueError
        If the message's length prefix is negative or over :data:`MAX_MESSAGE_BYTES`, or its
        body is malformed (see :func:`decode`).
    asyncio.IncompleteReadError
        If the stream ends within the message.
    """
    (n,) = _INT.unpack(await reader.readexactly(_INT.size))
    if not 0 <= n <= MAX_MESSAGE_BYTES:
        raise ValueError(f"a channel message cannot have {n} bytes (at most {MAX_MESSAGE_BYTES})")
    return decode(await reader.readexactly(n))


# ----------------------------------------------------------------------------------------------
# the peer's side
# ----------------------------------------------------------------------------------------------


async def serve(host: str, token: bytes, handler: Callable[..., Awaitable[Any]]) -> asyncio.AbstractServer:
    """Listen on ``host`` (a free port) for connections that present ``token``, and answer them with ``handler``.

    Each request is a tuple of arguments for ``handler``, each reply ``("ok", result)`` or
    ``("error", message)``.

    ``handler`` is held weakly through its object (a bound method), so a forgotten server does
    not keep its group alive: requests then get an error. A connection is closed when its token
    is wrong or does not arrive within :data:`TOKEN_TIMEOUT` seconds, when a request is malformed,
    and at once when :data:`MAX_CONNECTIONS` are open already.
    """
    method = weakref.WeakMethod(handler) if hasattr(handler, "__self__") else (lambda: handler)
    n_open = 0

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal n_open
        if n_open >= MAX_CONNECTIONS:
            writer.close()
            return
        n_open += 1
        try:
            presented = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), TOKEN_TIMEOUT)
            if not hmac.compare_digest(presented, token):
                return
            writer.write(ACCEPTED)
            while True:
                request = await read_message(reader)
                fn = method()
                try:
                    if fn is None:
                        raise RuntimeError("the chunk group behind this channel is gone")
                    reply = encode(("ok", await fn(*request)))
                except Exception as err:
                    reply = encode(("error", f"{type(err).__name__}: {err}"))
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError, ValueError):
            pass  # the leader went away, never authenticated, or sent what is not a message
        finally:
            n_open -= 1
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
        """Connect to the peer listening at ``endpoint`` and present ``token``.

        Raises
        ------
        OSError
            If the connection is refused, is not accepted within :data:`CONNECT_TIMEOUT` seconds
            (``TimeoutError``), or the peer does not acknowledge the token within
            :data:`HANDSHAKE_TIMEOUT` seconds (``TimeoutError``) or closes the connection instead
            (``ConnectionError``).
        """
        host, port = endpoint
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{host}:{port} did not accept a connection within {CONNECT_TIMEOUT:g} s") from None
        try:
            writer.write(token)
            accepted = await asyncio.wait_for(reader.readexactly(len(ACCEPTED)), HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            writer.close()
            raise TimeoutError(f"{host}:{port} did not acknowledge the token within {HANDSHAKE_TIMEOUT:g} s") from None
        except (asyncio.IncompleteReadError, OSError) as err:
            writer.close()
            raise ConnectionError(f"{host}:{port} closed the connection instead of acknowledging the token") from err
        if accepted != ACCEPTED:
            writer.close()
            raise ConnectionError(f"{host}:{port} is not a Harmony channel (it answered {accepted!r})")
        return Channel((host, port), reader, writer)

    async def call(self, *args: Any) -> Any:
        """Send one request and wait for its reply.

        Raises
        ------
        ChannelError
            If the peer answered with an error.
        ConnectionError
            If the connection broke or the reply is malformed (the channel cannot be used again).
        """
        try:
            self._writer.write(encode(args))
            await self._writer.drain()
            status, result = await read_message(self._reader)
        except asyncio.IncompleteReadError as err:
            raise ConnectionError(f"the peer at {self._where} closed the channel") from err
        except ValueError as err:
            raise ConnectionError(f"a malformed reply from the peer at {self._where}: {err}") from err
        if status != "ok":
            raise ChannelError(result)
        return result

    @property
    def _where(self) -> str:
        return "{}:{}".format(*self.endpoint)

    def close(self) -> None:
        self._writer.close()
