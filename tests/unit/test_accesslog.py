"""The access log writer: lines reach the stream whole, off the event loop, and a stalled reader
costs dropped (counted) lines, never a blocked loop."""

from __future__ import annotations

import asyncio
import os
import time

from sidecar.accesslog import PIPE_BUF, AccessLog, _chunks
from tests.harness import wait_until


def line(i: int, size: int = 100) -> bytes:
    body = b"x" * (size - 20)
    return b'{"n":%08d,"p":"%s"}\n' % (i, body)


def test_chunks_are_cut_at_line_ends_and_never_exceed_pipe_buf_unless_one_line_does():
    lines = [line(i, 300) for i in range(100)] + [b"y" * (PIPE_BUF + 10) + b"\n"] + [line(7)]
    chunks = list(_chunks(lines))
    assert b"".join(chunks) == b"".join(lines)
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= PIPE_BUF or chunk.count(b"\n") == 1


def test_lines_are_written_in_order_by_the_writer_thread(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog.open(str(path))
    for i in range(2000):
        log.write(line(i))
    log.close()
    got = path.read_bytes().splitlines(keepends=True)
    assert got == [line(i) for i in range(2000)]
    assert (log.lines, log.dropped, log.write_errors) == (2000, 0, 0)


async def test_a_stalled_reader_never_blocks_the_loop_and_drops_are_counted():
    read_end, write_end = os.pipe()  # nobody reads: the pipe fills after 64 KiB
    stream = os.fdopen(write_end, "wb", buffering=0)
    log = AccessLog(stream, buffer_limit=16 * 1024, max_pending=256 * 1024, owned=True)
    slowest = 0.0
    for i in range(20_000):  # 2 MB of lines, far beyond the pipe and max_pending
        t = time.perf_counter()
        log.write(line(i))
        slowest = max(slowest, time.perf_counter() - t)
        if i % 500 == 0:
            await asyncio.sleep(0)
    # A bound on blocking, not a benchmark: a write is an append, or a hand-over to the thread.
    assert slowest < 0.05, slowest
    log.flush()
    assert log.dropped > 0 and log.lines + log.dropped == 20_000
    # Once the reader drains the pipe, what was handed over is written whole and in order.
    os.set_blocking(read_end, False)
    data = bytearray()

    def drained() -> bool:
        try:
            while chunk := os.read(read_end, 1 << 16):
                data.extend(chunk)
        except BlockingIOError:
            pass
        return data.count(b"\n") == log.lines

    wait_until(drained, 10, message="the writer catches up once the pipe is read")
    numbers = [int(x[5:13]) for x in bytes(data).splitlines()]
    assert numbers == sorted(numbers) and len(set(numbers)) == log.lines
    log.close()
    os.close(read_end)
