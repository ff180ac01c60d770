"""The Harmony channel: its binary layout, a peer's defences against what a connection may send,
and the leader's timeouts and fallback to dask's RPC where a channel cannot be used."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import pytest
from distributed import Client

import symphony_dask as sd
from symphony_dask._harmony.cluster import channel as harmony_channel
from symphony_dask._harmony.cluster import groups as harmony_groups
from symphony_dask._harmony.cluster.channel import Channel, ChannelError, decode, encode, serve

TOKEN = bytes(range(harmony_channel.TOKEN_BYTES))


def _q(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------------------------
# the binary layout
# ----------------------------------------------------------------------------------------------

MESSAGES = {
    "scalars": (0, -1, 2**63 - 1, -(2**63), 0.0, -2.5, float("inf"), None, "", "Harmony é"),
    "arrays": (
        np.arange(3.0),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.linspace(0, 1, 24).reshape(2, 3, 4),
        np.array(4.0),
        np.array(-3, dtype=np.int64),
    ),
    "empty arrays": (np.zeros(0), np.zeros((0, 3), dtype=np.int64), np.zeros((2, 0, 5))),
    "nested": ((), (1, (2.0, (None, ("x", np.ones((2, 2)))))), ((), ())),
    "a block": (
        3,
        7,
        np.random.default_rng(0).normal(size=(4, 100)),
        (np.eye(30, 100), np.array([2, 0, 1], dtype=np.int64)),
    ),
}


@pytest.mark.parametrize("items", MESSAGES.values(), ids=MESSAGES.keys())
def test_round_trips(items):
    message = encode(items)
    assert struct.unpack_from("<q", message)[0] == len(message) - 8
    back = decode(message[8:])
    assert _same(back, tuple(items))
    assert all(a.flags.writeable for a in back if isinstance(a, np.ndarray))  # copies, not views
    assert _same(decode(encode(list(items))[8:]), tuple(items))  # lists come back as tuples
    # NumPy scalars and non-contiguous views are sent as what they hold
    sent = (np.int32(5), np.float64(7.5), np.arange(10.0)[::3])
    assert _same(decode(encode(sent)[8:]), (5, 7.5, np.array([0.0, 3.0, 6.0, 9.0])))


@pytest.mark.parametrize(
    ("item", "error", "match"),
    [
        (True, TypeError, "booleans"),
        (np.zeros(2, dtype=np.float32), TypeError, "arrays of float32"),
        (b"bytes", TypeError, "bytes is not sent"),
        (np.zeros((1,) * 9), ValueError, "9 dimensions"),
    ],
)
def test_what_is_not_sent(item, error, match):
    with pytest.raises(error, match=match):
        encode((item,))


MALFORMED = {
    "empty": (b"", "an item needs 1 byte"),
    "unknown kind": (b"x", r"unknown item b'x'"),
    "trailing bytes": (b"n" + b"n", "1 trailing byte"),
    "truncated integer": (b"i" + b"\x00" * 7, "a number needs 8 byte"),
    "negative string length": (b"s" + _q(-9) + b"abc", r"negative string length \(-9\)"),
    "string past the end": (b"s" + _q(4) + b"abc", "a string needs 4 byte"),
    "invalid UTF-8": (b"s" + _q(1) + b"\xff", "can't decode"),
    "negative ndim": (b"a" + _q(-1), r"negative number of dimensions \(-1\)"),
    "too many dimensions": (b"a" + _q(9) + _q(*[1] * 9) + b"\x00" * 8, "9 dimensions"),
    "shape past the end": (b"a" + _q(2, 1), "shape needs 16 byte"),
    "negative dimension": (b"l" + _q(2, 3, -1), r"shape \(3, -1\) \(a negative dimension\)"),
    "oversized dimension": (b"a" + _q(1, 2**40) + b"\x00" * 8, "more than a message can hold"),
    "oversized beside an empty one": (b"a" + _q(2, 0, 2**62), "more than a message can hold"),
    "data past the end": (b"a" + _q(2, 2, 2) + b"\x00" * 31, r"shape \(2, 2\) needs 32 byte"),
    "negative tuple length": (b"t" + _q(-1), r"negative tuple length \(-1\)"),
    "tuple longer than the message": (b"t" + _q(3) + b"nn", "a tuple of 3 items in the 2 byte"),
    # 18 bytes that looped the old decoder: 2**62 items, each a string going back 9 bytes
    "the looping message": (b"t" + _q(2**62) + b"s" + _q(-9), "a tuple of 4611686018427387904 items"),
    "nested too deep": ((b"t" + _q(1)) * 17 + b"n", "nested deeper than 16"),
}


@pytest.mark.parametrize(("body", "match"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_messages_are_rejected(body, match):
    with pytest.raises(ValueError, match=match):
        decode(body)


def test_every_truncation_is_rejected():
    body = encode(MESSAGES["a block"] + MESSAGES["scalars"] + MESSAGES["nested"])[8:]
    for end in range(len(body)):
        with pytest.raises(ValueError):
            decode(body[:end])


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_read_message_checks_the_length_prefix():
    async def read(data: bytes) -> Any:
        return await harmony_channel.read_message(_reader(data))

    assert asyncio.run(read(encode((1, "two")))) == (1, "two")
    with pytest.raises(ValueError, match="cannot have -1 bytes"):
        asyncio.run(read(_q(-1) + b"n"))
    with pytest.raises(ValueError, match=f"cannot have {2**30 + 1} bytes"):
        asyncio.run(read(_q(2**30 + 1) + b"n"))
    with pytest.raises(asyncio.IncompleteReadError):  # the stream ends within the message
        asyncio.run(read(encode((1, 2))[:-1]))


# ----------------------------------------------------------------------------------------------
# a peer's server
# ----------------------------------------------------------------------------------------------


@dataclass
class Peer:
    """A :func:`serve` server on an event loop of its own thread, so that a server stuck in a loop
    fails a test (by its timeout) instead of hanging it."""

    endpoint: tuple[str, int]
    calls: list[tuple] = field(default_factory=list)


@pytest.fixture()
def peer():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    calls: list[tuple] = []

    async def handler(*args: Any) -> Any:
        calls.append(args)
        if args and args[0] == "fail":
            raise KeyError("asked to fail")
        return args

    server = asyncio.run_coroutine_threadsafe(serve("127.0.0.1", TOKEN, handler), loop).result(5)
    yield Peer(server.sockets[0].getsockname()[:2], calls)

    async def shut_down() -> None:
        server.close()
        connections = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(shut_down(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _talk(conversation: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> Any:
    return asyncio.run(asyncio.wait_for(conversation(), timeout))


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the peer closes the connection (rather than answering) within a second."""
    return await asyncio.wait_for(reader.read(), 1.0) == b""


def test_requests_and_replies(peer):
    async def conversation() -> None:
        channel = await Channel.open(peer.endpoint, TOKEN)
        assert await channel.call(1, np.arange(3.0)) is not None
        assert _same(await channel.call(2, (np.eye(2), None)), (2, (np.eye(2), None)))
        with pytest.raises(ChannelError, match="KeyError: 'asked to fail'"):
            await channel.call("fail")
        assert await channel.call(3) == (3,)  # the channel outlives an error
        channel.close()

    _talk(conversation)
    assert [c[0] for c in peer.calls] == [1, 2, "fail", 3]


def test_a_wrong_token_is_turned_away(peer):
    async def conversation() -> None:
        reader, writer = await asyncio.open_connection(*peer.endpoint)
        writer.write(b"\x00" * len(TOKEN) + encode((1,)))
        assert await _closed_by_peer(reader)
        writer.close()
        with pytest.raises(ConnectionError, match="closed the connection instead of acknowledging"):
            await Channel.open(peer.endpoint, b"\x01" * len(TOKEN))

    _talk(conversation)
    assert peer.calls == []


@pytest.mark.parametrize(
    "body",
    [
        b"t" + _q(2**62) + b"s" + _q(-9),  # looped the old decoder
        b"a" + _q(1, -(2**40)),
        b"t" + _q(2**40),
    ],
    ids=["negative string length", "negative dimension", "huge tuple"],
)
def test_a_malformed_request_closes_the_connection_at_once(peer, body):
    """A peer holding the token sends a malformed request: its connection is closed within a
    second, the handler is not called, and the server goes on serving."""

    async def conversation() -> None:
        reader, writer = await asyncio.open_connection(*peer.endpoint)
        writer.write(TOKEN)
        assert await reader.readexactly(len(harmony_channel.ACCEPTED)) == harmony_channel.ACCEPTED
        start = time.monotonic()
        writer.write(_q(len(body)) + body)
        assert await _closed_by_peer(reader)
        assert time.monotonic() - start < 1.0
        writer.close()
        channel = await Channel.open(peer.endpoint, TOKEN)
        assert await channel.call(9) == (9,)
        channel.close()

    _talk(conversation)
    assert peer.calls == [(9,)]


@pytest.mark.parametrize("prefix", [-1, -(2**63), 2**30 + 1, 2**62], ids=["-1", "-2^63", "over 1 GiB", "2^62"])
def test_a_bad_length_prefix_closes_the_connection(peer, prefix):
    async def conversation() -> None:
        reader, writer = await asyncio.open_connection(*peer.endpoint)
        writer.write(TOKEN + _q(prefix) + b"n" * 10)
        assert await reader.readexactly(len(harmony_channel.ACCEPTED)) == harmony_channel.ACCEPTED
        assert await _closed_by_peer(reader)
        writer.close()

    _talk(conversation)
    assert peer.calls == []


def test_an_idle_unauthenticated_connection_is_closed(peer, monkeypatch):
    monkeypatch.setattr(harmony_channel, "TOKEN_TIMEOUT", 0.2)

    async def conversation() -> None:
        reader, writer = await asyncio.open_connection(*peer.endpoint)
        writer.write(TOKEN[:5])  # part of the token, then nothing
        start = time.monotonic()
        assert await _closed_by_peer(reader)
        assert 0.15 < time.monotonic() - start < 1.0
        writer.close()

    _talk(conversation)


def test_connections_beyond_the_cap_are_closed_at_once(peer, monkeypatch):
    monkeypatch.setattr(harmony_channel, "MAX_CONNECTIONS", 2)

    async def conversation() -> None:
        first = await Channel.open(peer.endpoint, TOKEN)
        second = await Channel.open(peer.endpoint, TOKEN)
        with pytest.raises(ConnectionError, match="closed the connection instead of acknowledging"):
            await Channel.open(peer.endpoint, TOKEN)
        assert await second.call(2) == (2,)
        first.close()
        for _ in range(100):  # the server counts the first connection out once it has seen it close
            try:
                third = await Channel.open(peer.endpoint, TOKEN)
                break
            except ConnectionError:
                await asyncio.sleep(0.01)
        assert await third.call(3) == (3,)
        second.close()
        third.close()

    _talk(conversation)


# ----------------------------------------------------------------------------------------------
# the leader's timeouts
# ----------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_raises_at_once():
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        _talk(lambda: Channel.open(("127.0.0.1", _closed_port()), TOKEN))
    assert time.monotonic() - start < 1.0


def test_a_silent_listener_times_out_in_the_handshake(monkeypatch):
    """A port that accepts connections but never answers (not a Harmony channel, or a stuck peer)."""
    monkeypatch.setattr(harmony_channel, "HANDSHAKE_TIMEOUT", 0.2)

    async def conversation() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        with pytest.raises(TimeoutError, match=r"did not acknowledge the token within 0\.2 s"):
            await Channel.open(server.sockets[0].getsockname()[:2], TOKEN)
        server.close()

    _talk(conversation)


def test_a_connection_that_is_never_accepted_times_out(monkeypatch):
    """As behind a firewall that drops the packets: no answer to the connection at all."""
    monkeypatch.setattr(harmony_channel, "CONNECT_TIMEOUT", 0.2)

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)

    monkeypatch.setattr(harmony_channel.asyncio, "open_connection", never)
    with pytest.raises(TimeoutError, match=r"10\.0\.0\.1:4 did not accept a connection within 0\.2 s"):
        _talk(lambda: Channel.open(("10.0.0.1", 4), TOKEN))


# ----------------------------------------------------------------------------------------------
# Harmony on a cluster whose channels fail
# ----------------------------------------------------------------------------------------------

HARMONY = {"max_iter_harmony": 2, "max_iter_cluster": 6, "seed": 5}


@pytest.fixture(scope="module")
def cluster(module_local_cluster):
    cluster, _ = module_local_cluster(n_workers=2, processes=True, client=False)
    return cluster


@pytest.fixture(scope="module")
def threaded(pbmc3500) -> tuple[np.ndarray, np.ndarray]:
    z, meta, _ = pbmc3500
    res = sd.harmonize(da.from_array(z, chunks=(1000, -1)), meta, "donor", **HARMONY)
    return res.Z_corr.compute(), res.R.compute()


def _with_endpoints(monkeypatch, endpoint: Callable[[tuple[str, int]], tuple[str, int]]) -> None:
    """Two chunk groups on the cluster, the leader told to reach its peer at ``endpoint(real one)``."""
    monkeypatch.setattr(harmony_groups, "MIN_GROUP_CELLS", 1000)

    class Redirected(harmony_groups.ClusterGroups):
        def _open_channels(self, slots) -> None:
            super()._open_channels(slots)
            self.endpoints = [e if e is None else endpoint(tuple(e)) for e in self.endpoints]

    monkeypatch.setattr(harmony_groups, "ClusterGroups", Redirected)


def _harmony_on(cluster, pbmc3500, threaded, caplog) -> str:
    """Harmony on ``cluster``, checked against the threaded result; the one fallback warning."""
    z, meta, _ = pbmc3500
    with Client(cluster), caplog.at_level(logging.WARNING, logger="symphony_dask"):
        res = sd.harmonize(da.from_array(z, chunks=(1000, -1)), meta, "donor", **HARMONY)
        z_corr, r = res.Z_corr.compute(), res.R.compute()
    assert np.abs(z_corr - threaded[0]).max() <= 1e-10
    assert np.abs(r - threaded[1]).max() <= 1e-10
    assert "lost" not in caplog.text
    warnings = [record.getMessage() for record in caplog.records if "no channel" in record.getMessage()]
    assert len(warnings) == 1, warnings
    assert "its blocks go through dask's RPC for the rest of the run" in warnings[0]
    return warnings[0]


@pytest.mark.slow
@pytest.mark.cluster
def test_a_refused_channel_falls_back_to_dask_rpc(cluster, pbmc3500, threaded, monkeypatch, caplog):
    """As behind a firewall that rejects connections between the workers: no lost worker."""
    port = _closed_port()
    _with_endpoints(monkeypatch, lambda real: (real[0], port))
    warning = _harmony_on(cluster, pbmc3500, threaded, caplog)
    assert f"127.0.0.1 port {port}: ConnectionRefusedError" in warning


class _BreakingProxy:
    """Relays a channel connection to ``target`` and breaks it after relaying ``requests`` reads of
    the leader's (the token, then requests, one per read as the leader waits for each reply): the
    last request reaches the peer, its reply never reaches the leader."""

    def __init__(self, requests: int) -> None:
        self.requests = requests
        self.target: tuple[str, int] | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0), self.loop
        ).result(5)
        self.endpoint = self.server.sockets[0].getsockname()[:2]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, limit: int | None) -> None:
            reads = 0
            while data := await source.read(1 << 16):
                sink.write(data)
                reads += 1
                if reads == limit:
                    await asyncio.sleep(0.01)
                    break
            writer.close()
            up_writer.close()

        await asyncio.gather(
            pipe(reader, up_writer, self.requests), pipe(up_reader, writer, None), return_exceptions=True
        )

    def close(self) -> None:
        async def shut_down() -> None:
            self.server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut_down(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.mark.slow
@pytest.mark.cluster
def test_a_channel_broken_in_mid_run_falls_back_to_dask_rpc(cluster, pbmc3500, threaded, monkeypatch, caplog):
    """The channel works for a block, then breaks while the peer weighs the next one; the peer
    still answers through dask's RPC, so it is not lost: the iteration is repeated through the RPC."""
    proxy = _BreakingProxy(requests=3)

    def through_proxy(real: tuple[str, int]) -> tuple[str, int]:
        proxy.target = real
        return proxy.endpoint

    _with_endpoints(monkeypatch, through_proxy)
    try:
        warning = _harmony_on(cluster, pbmc3500, threaded, caplog)
    finally:
        proxy.close()
    assert f"127.0.0.1 port {proxy.endpoint[1]}: ConnectionError: the peer at" in warning


def _listening() -> int:
    import psutil

    return sum(c.status == psutil.CONN_LISTEN for c in psutil.Process().net_connections("tcp"))


@pytest.mark.slow
@pytest.mark.cluster
def test_a_failed_run_closes_its_channels(cluster, pbmc3500, monkeypatch):
    monkeypatch.setattr(harmony_groups, "MIN_GROUP_CELLS", 1000)
    z, meta, _ = pbmc3500
    bad = z.copy()
    bad[5, 0] = np.nan
    with Client(cluster) as client:
        before = client.run(_listening)
        with pytest.raises(ValueError, match="NaN"):
            sd.harmonize(da.from_array(bad, chunks=(1000, -1)), meta, "donor", **HARMONY)
        gc.collect()
        assert client.run(_listening) == before
