"""The coalescing transport: writes of one event loop turn sent together, in order, and
never after the connection is closed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cycleml.serving.coalescing import FLUSH_BYTES, CoalescingProtocol, CoalescingTransport


class RecordingTransport(asyncio.Transport):
    """A transport that records what it is asked to do."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(("write", bytes(data)))

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5)}.get(name, default)

    def pause_reading(self) -> None:
        self.calls.append(("pause_reading", None))


def _in_a_loop(scenario: Any) -> Any:
    async def main() -> Any:
        real = RecordingTransport()
        transport = CoalescingTransport(real, asyncio.get_running_loop())
        return await scenario(real, transport)

    return asyncio.run(main())


async def _next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_writes_of_one_turn_leave_in_one_call_at_its_end() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"
        transport.write(head)
        transport.write(b"body")
        transport.write(b"")  # nothing to send adds nothing
        assert real.calls == []  # not before the turn ends
        assert transport.get_write_buffer_size() == len(head) + 4 + 7
        await _next_turn()
        assert real.calls == [("write", head + b"body")]
        transport.write(b"next")  # a later turn: a call of its own
        await _next_turn()
        assert real.calls[-1] == ("write", b"next") and len(real.calls) == 2
        assert transport.get_write_buffer_size() == 7

    _in_a_loop(scenario)


def test_the_data_is_what_was_written_when_it_was_written() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        buffer = bytearray(b"abc")
        transport.writelines([buffer, memoryview(b"def")])
        buffer[:] = b"xyz"  # the caller reuses its buffer before the turn ends
        await _next_turn()
        assert real.calls == [("write", b"abcdef")]

    _in_a_loop(scenario)


def test_close_and_write_eof_send_what_is_pending_first() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        transport.write(b"last words")
        transport.write_eof()
        with pytest.raises(RuntimeError, match="write_eof"):  # as a real transport
            transport.write(b"after eof")
        transport.close()
        await _next_turn()
        assert real.calls == [("write", b"last words"), ("write_eof", None), ("close", None)]
        assert transport.is_closing()

    _in_a_loop(scenario)


def test_writes_after_close_are_dropped_as_the_real_transport_would() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        transport.write(b"answer")
        transport.close()
        transport.write(b"too late")
        transport.write(b"y" * FLUSH_BYTES)
        await _next_turn()
        assert real.calls == [("write", b"answer"), ("close", None)]

    _in_a_loop(scenario)


def test_close_closes_even_when_sending_what_is_pending_fails() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        def broken(data: bytes) -> None:
            raise ConnectionResetError("peer gone")

        real.write = broken  # type: ignore[method-assign]
        transport.write(b"lost")
        with pytest.raises(ConnectionResetError):
            transport.close()
        assert real.calls == [("close", None)]  # the socket is not leaked

    _in_a_loop(scenario)


def test_abort_drops_what_is_pending() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        transport.write(b"never sent")
        transport.abort()
        await _next_turn()
        assert real.calls == [("abort", None)]
        assert transport.get_write_buffer_size() == 7

    _in_a_loop(scenario)


def test_a_turn_that_writes_a_lot_sends_it_in_pieces_at_once() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        piece = b"x" * (FLUSH_BYTES // 4)
        for _ in range(9):
            transport.write(piece)
        # the fourth and the eighth write reached FLUSH_BYTES: sent before the turn ends
        assert [len(data) for _, data in real.calls] == [FLUSH_BYTES, FLUSH_BYTES]
        await _next_turn()
        assert [len(data) for _, data in real.calls] == [FLUSH_BYTES, FLUSH_BYTES, len(piece)]

    _in_a_loop(scenario)


def test_a_large_write_goes_through_as_it_is_after_what_is_pending() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        body = b"b" * FLUSH_BYTES
        transport.write(b"head")
        transport.write(body)
        assert real.calls == [("write", b"head"), ("write", body)]
        await _next_turn()
        assert len(real.calls) == 2

    _in_a_loop(scenario)


def test_other_calls_reach_the_real_transport() -> None:
    async def scenario(real: RecordingTransport, transport: CoalescingTransport) -> None:
        assert transport.get_extra_info("peername") == ("127.0.0.1", 5)
        assert transport.get_extra_info("sockname", "none") == "none"
        assert transport.can_write_eof()
        transport.pause_reading()
        assert real.calls == [("pause_reading", None)]

    _in_a_loop(scenario)


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append(("made", transport))

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> bool | None:
        self.events.append(("eof", None))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))


@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_the_protocol_sees_a_coalescing_transport_over_a_real_connection(
    loop_factory: str,
) -> None:
    """Over loopback: the wrapped protocol gets every callback, and its reply, written
    in three pieces, reaches the client whole."""
    if loop_factory == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop

    class Echo(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            transport = self.events[0][1]
            transport.write(b"<")
            transport.write(data)
            transport.write(b">")

    async def main() -> tuple[Echo, bytes]:
        loop = asyncio.get_running_loop()
        inner = Echo()
        server = await loop.create_server(lambda: CoalescingProtocol(inner, loop), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        await writer.drain()
        reply = await asyncio.wait_for(reader.readexactly(6), 5)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        server.close()
        await server.wait_closed()
        return inner, reply

    runner = asyncio.Runner(loop_factory=new_loop)
    with runner:
        inner, reply = runner.run(main())
    assert reply == b"<ping>"
    kinds = [kind for kind, _ in inner.events]
    assert kinds[:2] == ["made", "data"] and "eof" in kinds and kinds[-1] == "lost"
    assert isinstance(inner.events[0][1], CoalescingTransport)


def test_an_answer_pending_when_the_client_ends_its_side_still_reaches_it() -> None:
    """The client sends its request and shuts its side down; the answer is written just
    before the end of stream arrives. The protocol closes the connection on that end of
    stream, as uvicorn's do: what was pending goes out first."""

    class AnswersLate(Recorder):
        def eof_received(self) -> bool | None:
            super().eof_received()
            return None  # close, as uvicorn's protocols do

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        inner = AnswersLate()
        protocol = CoalescingProtocol(inner, loop)
        real = RecordingTransport()
        protocol.connection_made(real)
        transport = inner.events[0][1]
        transport.write(b"answer")  # pending until the loop's next pass ...
        assert protocol.eof_received() is None  # ... but the end of stream comes first
        real.close()  # which the loop answers by closing its transport
        await _next_turn()
        return b"".join(data for kind, data in real.calls if kind == "write")

    assert asyncio.run(main()) == b"answer"
