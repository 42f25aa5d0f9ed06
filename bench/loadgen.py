"""A small keep-alive HTTP/1.1 load generator on raw asyncio streams.

Cheaper per request than any full client (the machine has 2 cores, shared with the
service), so the figures measure the service, not the client. Two modes:

- closed loop: `concurrency` connections each send the next request as soon as the last
  answer arrives (the maximum rate);
- open loop: requests start on a fixed schedule at `rate` per second over a pool of
  connections; latency counts from the scheduled start, so a stall is not hidden
  (no coordinated omission).

Every run is bounded by a request count and a time limit. The client's own garbage
collector is off while it measures (`_collector_paused`): a full collection of its heap
(thousands of tasks, the prepared requests) paused it ~100 ms once or twice per run, and
an open loop counts such a pause as the service's latency.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int
    body: bytes


@dataclass
class RunResult:
    requests: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    bodies: list[bytes] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 400)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, raw: bytes) -> Answer:
        if self.writer is None or self.writer.is_closing():
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, _, headers = head.partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        close = False
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            lowered = name.strip().lower()
            if lowered == b"content-length":
                length = int(value.strip())
            elif lowered == b"connection" and value.strip().lower() == b"close":
                close = True
            elif lowered == b"transfer-encoding":
                raise RuntimeError("chunked answers are not expected from this API")
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return Answer(status, body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def build_request(
    method: str, path: str, port: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextmanager
def _collector_paused() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def closed_loop(
    port: int,
    next_request: Callable[[int], bytes],
    *,
    concurrency: int,
    count: int,
    seconds: float,
    keep_bodies: bool = False,
) -> RunResult:
    """As fast as answers come back, `concurrency` at a time, until `count` or `seconds`."""
    connections = [Connection("127.0.0.1", port) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in connections))
    issued = 0
    result = RunResult(0, 0.0)
    started = time.perf_counter()
    deadline = started + seconds

    async def drive(conn: Connection) -> None:
        nonlocal issued
        while issued < count and time.perf_counter() < deadline:
            index = issued
            issued += 1
            raw = next_request(index)
            t0 = time.perf_counter()
            answer = await conn.request(raw)
            result.latencies.append(time.perf_counter() - t0)
            result.statuses[answer.status] = result.statuses.get(answer.status, 0) + 1
            if keep_bodies:
                result.bodies.append(answer.body)

    try:
        with _collector_paused():
            await asyncio.gather(*(drive(c) for c in connections))
    finally:
        for conn in connections:
            conn.close()
    result.elapsed = time.perf_counter() - started
    result.requests = len(result.latencies)
    return result


async def open_loop(
    port: int,
    next_request: Callable[[int], bytes],
    *,
    rate: float,
    count: int,
    seconds: float,
    connections: int = 64,
    keep_bodies: bool = False,
) -> RunResult:
    """`rate` requests per second on a fixed schedule, for `seconds` or `count` requests."""
    total = min(count, int(rate * seconds))
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    pool = [Connection("127.0.0.1", port) for _ in range(connections)]
    await asyncio.gather(*(c.open() for c in pool))
    for conn in pool:
        idle.put_nowait(conn)
    result = RunResult(0, 0.0)
    interval = 1.0 / rate

    async def one(index: int, scheduled: float) -> None:
        conn = await idle.get()
        try:
            answer = await conn.request(next_request(index))
        finally:
            idle.put_nowait(conn)
        result.latencies.append(time.perf_counter() - scheduled)
        result.statuses[answer.status] = result.statuses.get(answer.status, 0) + 1
        if keep_bodies:
            result.bodies.append(answer.body)

    tasks: list[asyncio.Task[None]] = []
    with _collector_paused():
        started = time.perf_counter()
        for index in range(total):
            scheduled = started + index * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, scheduled)))
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 30)
        finally:
            for conn in pool:
                conn.close()
        result.elapsed = time.perf_counter() - started
    result.requests = len(result.latencies)
    return result
