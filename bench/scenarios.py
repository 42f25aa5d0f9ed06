"""The six benchmarks. Each returns figures printed next to a baseline from the same run."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from arq.connections import create_pool

from app.cascade.machine import FINAL_MESSAGE
from app.ids import to_public
from app.queue import Job, JobQueue
from app.runtime import redis_settings
from app.settings import Settings
from bench import baselines
from bench.loadgen import RunResult, build_request, closed_loop, open_loop
from bench.stack import Stack, plain_dsn
from providers.base import Category
from providers.sandbox import sign
from tests.simulators.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN

CONCURRENCY = 64
# Reads are timed at a steady rate well under capacity: the target is latency, not rate.
LOOKUP_RATE = 50
# The final statuses as an SQL list.
FINAL = "(" + ", ".join(sorted(f"'{status.value}'" for status in FINAL_MESSAGE)) + ")"


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline:
            return None
        return self.value / self.baseline


def log(text: str) -> None:
    print(f"  · {text}", flush=True)


# Requests


def phone(index: int, ending: str = "99") -> str:
    """A valid E.164 number per index; the ending picks the sandbox outcome (99: delivered)."""
    return f"+48600{index % 10000:04d}{ending}"


def message_body(index: int, category: str = "transactional", ending: str = "99") -> bytes:
    return orjson.dumps(
        {
            "category": category,
            "to": {"phone": phone(index, ending), "email": f"user{index}.ok@example.com"},
            "content": {"text": "Your code is 4711"},
            "cascade": [{"channel": "sms"}, {"channel": "email"}],
        }
    )


class Client:
    """Raw requests for the running API, with the bench key."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.auth = {"Authorization": f"Bearer {stack.api_key}"}

    @property
    def port(self) -> int:
        return self.stack.api_port

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        return build_request(
            "POST",
            path,
            self.port,
            body,
            {**self.auth, "Content-Type": "application/json", **(headers or {})},
        )

    def get(self, path: str) -> bytes:
        return build_request("GET", path, self.port, headers=self.auth)

    def sender(self, body: Callable[[int], bytes]) -> Callable[[int], bytes]:
        return lambda index: self.post("/v1/messages", body(index))

    async def spec_paths(self) -> dict[str, Any]:
        result = await closed_loop(
            self.port,
            lambda _: self.get("/openapi.json"),
            concurrency=1,
            count=1,
            seconds=10,
            keep_bodies=True,
        )
        paths: dict[str, Any] = orjson.loads(result.bodies[0])["paths"]
        return paths


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def scalar(dsn: str, sql: str, *args: Any) -> Any:
    rows = await fetch(dsn, sql, *args)
    return rows[0][0] if rows else None


async def wait_for(
    dsn: str, sql: str, target: int, within: float, *args: Any, every: float = 0.25
) -> int:
    deadline = time.monotonic() + within
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            found = int(await conn.fetchval(sql, *args))
            if found >= target or time.monotonic() > deadline:
                return found
            await asyncio.sleep(every)
    finally:
        await conn.close()


async def template_row(dsn: str) -> dict[str, Any]:
    row = (
        await fetch(
            dsn,
            'SELECT category, recipient, content, "cascade", metadata FROM messages'
            " ORDER BY created_at LIMIT 1",
        )
    )[0]
    return {
        "category": row["category"],
        **{k: orjson.loads(row[k]) for k in ("recipient", "content", "cascade", "metadata")},
    }


def ms(seconds: float) -> float:
    return seconds * 1000.0


def check(run: RunResult, what: str) -> None:
    if run.errors:
        raise RuntimeError(f"{what}: {run.errors} error answers ({run.statuses})")


# 1. Accept rate


@dataclass
class AcceptFigures:
    rate: dict[int, float]
    figures: list[Figure]


async def accept(stack: Stack, seconds: float, api_workers: tuple[int, ...]) -> AcceptFigures:
    dsn = plain_dsn(stack.database_url)
    client = Client(stack)
    runs: dict[int, tuple[RunResult, RunResult]] = {}
    template: dict[str, Any] | None = None
    for workers in api_workers:
        await stack.reset()
        with stack.running(api_workers=workers):
            send = client.sender(message_body)
            await closed_loop(client.port, send, concurrency=CONCURRENCY, count=500, seconds=10)
            full = await closed_loop(
                client.port, send, concurrency=CONCURRENCY, count=10**7, seconds=seconds
            )
            check(full, "accept")
            log(
                f"accept, {workers} API process(es): {full.rate:.0f}/s,"
                f" p50 {ms(full.percentile(50)):.1f} ms, p99 {ms(full.percentile(99)):.1f} ms"
            )
            half = await open_loop(
                client.port,
                send,
                rate=full.rate / 2,
                count=10**7,
                seconds=seconds,
                connections=CONCURRENCY,
            )
            check(half, "accept at half load")
            log(
                f"accept at {full.rate / 2:.0f}/s: p50 {ms(half.percentile(50)):.1f} ms,"
                f" p99 {ms(half.percentile(99)):.1f} ms"
            )
            template = template or await template_row(dsn)
            runs[workers] = (full, half)
    assert template is not None and stack.tenant_id is not None
    await stack.reset()
    base = await baselines.accept_baseline(
        dsn,
        template,
        stack.tenant_id,
        phone,
        concurrency=CONCURRENCY,
        count=10**7,
        seconds=seconds,
    )
    log(f"baseline (asyncpg, message + event per transaction): {base.rate:.0f}/s")
    figures: list[Figure] = []
    for workers, (full, half) in runs.items():
        figures.append(
            Figure(
                f"accept, {workers} API proc, 64 concurrent",
                full.rate,
                "msg/s",
                base.rate,
                "≥ 60 %",
                full.rate >= 0.6 * base.rate,
                f"p50 {ms(full.percentile(50)):.1f} ms, p99 {ms(full.percentile(99)):.1f} ms"
                f" (baseline p50 {ms(base.percentile(50)):.1f}, p99 {ms(base.percentile(99)):.1f})",
            )
        )
        figures.append(
            Figure(
                f"accept p99 at 50 % load ({full.rate / 2:.0f}/s), {workers} API proc",
                ms(half.percentile(99)),
                "ms",
                None,
                "< 50 ms",
                ms(half.percentile(99)) < 50,
                f"p50 {ms(half.percentile(50)):.1f} ms, {half.requests} requests",
            )
        )
    return AcceptFigures({w: runs[w][0].rate for w in runs}, figures)


# 2. Batch accept


def batch_body(index: int, size: int) -> bytes:
    return orjson.dumps(
        {
            "category": "marketing",
            "content": {"text": "Spring sale: 20 % off"},
            "cascade": [{"channel": "sms"}],
            "messages": [{"to": {"phone": phone(index * size + i)}} for i in range(size)],
        }
    )


async def batch(stack: Stack, seconds: float, size: int = 1000) -> list[Figure]:
    dsn = plain_dsn(stack.database_url)
    client = Client(stack)
    await stack.reset()
    with stack.running(api_workers=1):
        paths = await client.spec_paths()
        if "/v1/messages/batch" not in paths:
            log("batch accept: no POST /v1/messages/batch yet")
            return [Figure("batch accept (1000 per request)", math.nan, "msg/s", note="pending")]
        bodies = [batch_body(i, size) for i in range(8)]

        def send(index: int) -> bytes:
            return client.post("/v1/messages/batch", bodies[index % len(bodies)])

        concurrency = 2
        await closed_loop(client.port, send, concurrency=concurrency, count=2, seconds=30)
        run = await closed_loop(
            client.port,
            send,
            concurrency=concurrency,
            count=10**6,
            seconds=seconds,
            keep_bodies=True,
        )
        check(run, "batch")
        accepted = sum(orjson.loads(body)["accepted"] for body in run.bodies)
        rate = accepted / run.elapsed
        log(f"batch accept: {rate:.0f} msg/s ({run.requests} batches)")
        template = await template_row(dsn)
    assert stack.tenant_id is not None
    await stack.reset()
    base = await baselines.copy_baseline(
        dsn,
        template,
        stack.tenant_id,
        phone,
        batch=size,
        concurrency=concurrency,
        count=10**6,
        seconds=seconds,
    )
    base_rate = base.requests * size / base.elapsed
    log(f"baseline (COPY of messages + events): {base_rate:.0f} msg/s")
    return [
        Figure(
            f"batch accept ({size} per request, {concurrency} concurrent)",
            rate,
            "msg/s",
            base_rate,
            "≥ 50 %",
            rate >= 0.5 * base_rate,
            f"p50 {ms(run.percentile(50)):.0f} ms per batch",
        )
    ]


# 3. Delivery throughput


DELIVERY_RATE_SQL = f"""
SELECT count(*) FILTER (WHERE m.status = 'delivered'),
       count(*) FILTER (WHERE m.status IN {FINAL}),
       extract(epoch FROM max(m.completed_at) - (SELECT min(created_at) FROM attempts))
FROM messages m
"""


def twilio_body(index: int, fail_first: bool = False) -> bytes:
    """SMS through the out-of-process Twilio simulator (its number endings pick the outcome:
    `…0211` is refused with 21211, a final 3 matches none and is delivered), email after."""
    number = f"+486{index % 10000:04d}0211" if fail_first else f"+4860{index % 1000000:06d}3"
    return orjson.dumps(
        {
            "category": "transactional",
            "to": {"phone": number, "email": f"user{index}.ok@example.com"},
            "content": {"text": "Your code is 4711"},
            "cascade": [{"channel": "sms", "provider": "twilio"}, {"channel": "email"}],
        }
    )


def _stat(pid: int | str) -> list[str]:
    """`/proc/<pid>/stat`'s fields after the command name (state, ppid, …)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux `/proc`)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_pids(stack: Stack) -> list[int]:
    """The embedded Postgres server's processes (postmaster and its backends), or none
    when the server is an outside one."""
    pid_file = stack.data_dir / "postgres" / "postmaster.pid"
    if not pid_file.exists():
        return []
    postmaster = int(pid_file.read_text().split()[0])
    pids = [postmaster]
    for process in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(_stat(process.name)[1]) == postmaster:
                pids.append(int(process.name))
    return pids


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # a backend that has exited meanwhile
            total += cpu_seconds(pid)
    return total


class CpuMeter:
    """CPU the given processes (by role) and the embedded Postgres spend from now on."""

    def __init__(self, stack: Stack, roles: dict[str, list[int]]) -> None:
        self.stack, self.roles = stack, roles
        self.before = {role: cpu_of(pids) for role, pids in roles.items()}
        # Backends come and go: each one's CPU since this moment (a new one's, all of it).
        self.database = {pid: cpu_of([pid]) for pid in postgres_pids(stack)}

    def per_item(self, count: int) -> dict[str, float]:
        """ms of CPU per item, by role, since the meter started."""
        used = {role: cpu_of(pids) - self.before[role] for role, pids in self.roles.items()}
        if self.database:
            ended = postgres_pids(self.stack)
            used["postgres"] = cpu_of(ended) - sum(self.database.get(p, 0.0) for p in ended)
        return {role: 1000 * seconds / count for role, seconds in used.items()}


@dataclass
class Delivered:
    rate: float
    cpu_ms: dict[str, float]  # CPU per delivered message, by process role


async def deliver_all(
    stack: Stack,
    count: int,
    body: Callable[[int], bytes],
    within: float,
    *,
    workers: int = 1,
    provider_pid: int | None = None,
) -> Delivered:
    """Accept `count` messages, then start `workers` worker processes and time them to
    delivered (first attempt created → last message final, from the ledger's clocks)."""
    dsn = plain_dsn(stack.database_url)
    await stack.reset()
    client = Client(stack)
    with stack.running(api_workers=1):
        run = await closed_loop(
            client.port, client.sender(body), concurrency=CONCURRENCY, count=count, seconds=120
        )
        check(run, "delivery: accept")
        api = stack.processes[-1]
        roles = {"api": [api.popen.pid]}
        if provider_pid is not None:
            roles["provider"] = [provider_pid]
        started = [p for _ in range(workers) for p in stack.start_worker()]
        roles["worker"] = [p.popen.pid for p in started]
        meter = CpuMeter(stack, roles)
        await wait_for(dsn, f"SELECT count(*) FROM messages WHERE status IN {FINAL}", count, within)
        cpu = meter.per_item(count)
        delivered, final, elapsed = (await fetch(dsn, DELIVERY_RATE_SQL))[0]
    if delivered != count:
        raise RuntimeError(f"delivery: {delivered} of {count} delivered ({final} final)")
    return Delivered(count / float(elapsed), cpu)


@contextlib.contextmanager
def external_twilio(stack: Stack) -> Iterator[int]:
    """The Twilio simulator in its own process, and a `twilio` account pointing at it for
    every service process started meanwhile. Yields the simulator's pid."""
    ready = stack.data_dir / "provider.url"
    ready.unlink(missing_ok=True)
    process = stack.spawn("provider", ["bench.provider", str(ready)], dict(os.environ))
    stack.processes.remove(process)  # outlives the service processes started meanwhile
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() or not ready.read_text():
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the provider simulator did not start; see {process.log_path}")
            time.sleep(0.05)
        account = {
            "type": "twilio",
            "name": "twilio",
            "config": {
                "base_url": ready.read_text(),
                "account_sid": DEFAULT_ACCOUNT_SID,
                "auth_token": DEFAULT_AUTH_TOKEN,
                "from_number": "+15005550006",
            },
        }
        stack.env_overrides["CASCADE_PROVIDERS"] = orjson.dumps([account]).decode()
        yield process.popen.pid
    finally:
        stack.env_overrides.pop("CASCADE_PROVIDERS", None)
        process.stop()


async def bare_jobs(stack: Stack, count: int, within: float) -> Delivered:
    """The baseline: `count` bare arq jobs, one Postgres update each, same worker settings."""
    dsn = plain_dsn(stack.database_url)
    settings = Settings()
    rows = await fetch(dsn, "SELECT id, category FROM messages LIMIT $1", count)
    await stack.reset_queues()
    redis = await create_pool(redis_settings(stack.redis_url))
    try:
        queue = JobQueue(redis)
        for start in range(0, len(rows), 5000):
            await queue.enqueue_many(
                [
                    Job(
                        "touch",
                        Category.TRANSACTIONAL,
                        f"bare:{row['id']}",
                        (str(row["id"]), row["category"]),
                        queue="bench:bare",
                    )
                    for row in rows[start : start + 5000]
                ]
            )
    finally:
        await redis.aclose()
    mark = await scalar(dsn, "SELECT clock_timestamp()")
    concurrency = settings.worker_concurrency[Category.TRANSACTIONAL]
    with stack.running():
        workers = stack.start_worker(
            ["bench.bare_worker", "bench:bare", str(concurrency), str(settings.worker_poll_delay)]
        )
        meter = CpuMeter(stack, {"worker": [p.popen.pid for p in workers]})
        await wait_for(
            dsn, "SELECT count(*) FROM messages WHERE updated_at > $1", count, within, mark
        )
        cpu = meter.per_item(len(rows))
        done, elapsed = (
            await fetch(
                dsn,
                "SELECT count(*), extract(epoch FROM max(updated_at) - min(updated_at))"
                " FROM messages WHERE updated_at > $1",
                mark,
            )
        )[0]
    if done != len(rows):
        raise RuntimeError(f"bare jobs: {done} of {len(rows)} ran")
    return Delivered(len(rows) / float(elapsed), cpu)


async def delivery(stack: Stack, count: int, within: float) -> list[Figure]:
    """Step 1 delivered, 1 and 2 worker processes, and after a failover, against bare arq
    jobs; the provider (the Twilio simulator) runs in its own process."""
    with external_twilio(stack) as provider:
        first = await deliver_all(stack, count, twilio_body, within, provider_pid=provider)
        log(f"delivery on step 1, 1 worker: {first.rate:.0f} msg/s; CPU ms/msg {first.cpu_ms}")
        two = await deliver_all(stack, count, twilio_body, within, workers=2, provider_pid=provider)
        log(f"delivery on step 1, 2 workers: {two.rate:.0f} msg/s; CPU ms/msg {two.cpu_ms}")
        failover = await deliver_all(
            stack, count, lambda i: twilio_body(i, fail_first=True), within, provider_pid=provider
        )
        log(f"delivery after failover: {failover.rate:.0f} msg/s; CPU ms/msg {failover.cpu_ms}")
    bare = await bare_jobs(stack, count, within)
    base = bare.rate
    log(f"baseline (bare arq jobs, one update each): {base:.0f} jobs/s; CPU ms/job {bare.cpu_ms}")

    def cpu(result: Delivered) -> str:
        service = sum(v for k, v in result.cpu_ms.items() if k != "provider")
        return (
            "CPU ms/msg: "
            + ", ".join(f"{k} {v:.2f}" for k, v in result.cpu_ms.items())
            + f"; the service's (all but the provider) {service:.2f} against a bare job's"
            f" {sum(bare.cpu_ms.values()):.2f}"
        )

    return [
        Figure(
            f"delivery, step 1 ({count} msgs, Twilio simulator in its own process), 1 worker",
            first.rate,
            "msg/s",
            base,
            "≥ 100 %",
            first.rate >= base,
            cpu(first),
        ),
        Figure(
            f"delivery, step 1 ({count} msgs), 2 worker processes",
            two.rate,
            "msg/s",
            base,
            "side by side with 1",
            None,
            cpu(two),
        ),
        Figure(
            f"delivery, failover to step 2 ({count} msgs; Twilio 21211, then email)",
            failover.rate,
            "msg/s",
            base,
            "≥ 60 %",
            failover.rate >= 0.6 * base,
            cpu(failover),
        ),
    ]


# 4. Status-callback ingest


def silent_body(index: int) -> bytes:
    return orjson.dumps(
        {
            "category": "transactional",
            "to": {"push_token": f"device-{index}-silent"},
            "content": {"text": "Your code is 4711"},
            "cascade": [{"channel": "push", "timeout": 3600}],
        }
    )


async def callbacks(stack: Stack, count: int, seconds: float, within: float) -> list[Figure]:
    """Attempts sent and awaiting a receipt; signed receipts for half, raw updates for half."""
    dsn = plain_dsn(stack.database_url)
    secret = Settings().sandbox_secret.get_secret_value()
    client = Client(stack)
    await stack.reset()
    with stack.running(api_workers=1, worker=True):
        run = await closed_loop(
            client.port,
            client.sender(silent_body),
            concurrency=CONCURRENCY,
            count=2 * count,
            seconds=120,
        )
        check(run, "callbacks: accept")
        sent = await wait_for(
            dsn, "SELECT count(*) FROM attempts WHERE status = 'sent'", 2 * count, within
        )
        if sent != 2 * count:
            raise RuntimeError(f"callbacks: only {sent} attempts sent")
    attempt_ids: list[uuid.UUID] = [
        row["id"] for row in await fetch(dsn, "SELECT id FROM attempts ORDER BY id")
    ]
    ours, theirs = attempt_ids[:count], attempt_ids[count:]
    bodies = []
    for attempt_id in ours:
        public = to_public("att", attempt_id)
        bodies.append(
            orjson.dumps(
                {
                    "event_id": f"sbx_{public}:delivered",
                    "attempt_id": public,
                    "provider_message_id": f"sbx_{public}",
                    "status": "delivered",
                }
            )
        )
    now = int(time.time())
    requests = [
        build_request(
            "POST",
            "/v1/providers/sandbox/status",
            0,
            body,
            {"Content-Type": "application/json", "X-Sandbox-Signature": sign(secret, body, now)},
        )
        for body in bodies
    ]
    with stack.running(api_workers=1):
        run = await closed_loop(
            client.port,
            lambda i: requests[i],
            concurrency=CONCURRENCY,
            count=count,
            seconds=seconds,
        )
        check(run, "callbacks")
    applied = await scalar(
        dsn, "SELECT count(*) FROM attempts WHERE status = 'delivered' AND id = ANY($1)", ours
    )
    if applied != run.requests:
        raise RuntimeError(f"callbacks: {applied} applied of {run.requests} posted")
    log(f"callbacks: {run.rate:.0f}/s, p99 {ms(run.percentile(99)):.1f} ms")
    base = await baselines.callback_baseline(
        dsn, theirs[: run.requests], concurrency=CONCURRENCY, seconds=seconds
    )
    log(f"baseline (asyncpg: attempt + message + 2 events, one statement): {base.rate:.0f}/s")
    return [
        Figure(
            "status callbacks applied (signed, 64 concurrent)",
            run.rate,
            "/s",
            base.rate,
            "≥ 50 %",
            run.rate >= 0.5 * base.rate,
            f"p50 {ms(run.percentile(50)):.1f} ms, p99 {ms(run.percentile(99)):.1f} ms",
        )
    ]


# 5. Category isolation under load


async def queue_backlog(stack: Stack, client: Client, backlog: int) -> str:
    paths = await client.spec_paths()
    if "/v1/messages/batch" in paths:
        size = 1000

        def send(index: int) -> bytes:
            return client.post("/v1/messages/batch", batch_body(index, size))

        run = await closed_loop(
            client.port, send, concurrency=2, count=math.ceil(backlog / size), seconds=600
        )
        check(run, "backlog")
        return f"queued through the batch API in {run.elapsed:.0f} s"
    run = await closed_loop(
        client.port,
        client.sender(lambda i: message_body(i, category="marketing")),
        concurrency=CONCURRENCY,
        count=backlog,
        seconds=600,
    )
    check(run, "backlog")
    return f"queued through POST /v1/messages in {run.elapsed:.0f} s (no batch API yet)"


MARKETING_FINAL_SQL = (
    "SELECT count(*) FROM messages WHERE category = 'marketing' AND status IN " + FINAL
)


async def drain(dsn: str, backlog: int, bound: float) -> tuple[int, float]:
    """Let the marketing worker go on until the backlog is final or `bound` seconds have
    passed; (final, seconds since the first marketing attempt)."""
    deadline = time.monotonic() + bound
    done = 0
    while time.monotonic() < deadline:
        done = await scalar(dsn, MARKETING_FINAL_SQL)
        if done >= backlog:
            break
        await asyncio.sleep(2)
    elapsed = await scalar(
        dsn,
        "SELECT extract(epoch FROM clock_timestamp() - min(created_at)) FROM attempts"
        " WHERE category = 'marketing'",
    )
    return done, float(elapsed or 0)


async def isolation(
    stack: Stack, backlog: int, seconds: float, rate: float = 50, drain_seconds: float = 0
) -> list[Figure]:
    dsn = plain_dsn(stack.database_url)
    client = Client(stack)
    await stack.reset()
    with stack.running(api_workers=1):
        how = await queue_backlog(stack, client, backlog)
        log(f"marketing backlog of {backlog}: {how}")
        started = await scalar(dsn, "SELECT clock_timestamp()")
        # Marketing in a niced process of its own, as `cascade dev` and the README run it.
        stack.start_worker(split=True)
        run = await open_loop(
            client.port,
            client.sender(message_body),
            rate=rate,
            count=10**6,
            seconds=seconds,
            connections=8,
        )
        check(run, "isolation: transactional accept")
        sent = run.requests
        done = await wait_for(
            dsn,
            f"SELECT count(*) FROM messages WHERE category = 'transactional' AND status IN {FINAL}",
            sent,
            60,
        )
        ended = await scalar(dsn, "SELECT clock_timestamp()")
        drained_meanwhile = await scalar(dsn, MARKETING_FINAL_SQL)
        total, total_seconds = (
            await drain(dsn, backlog, drain_seconds) if drain_seconds else (0, 0.0)
        )
    latencies = [
        float(row[0])
        for row in await fetch(
            dsn,
            "SELECT extract(epoch FROM completed_at - created_at) FROM messages"
            " WHERE category = 'transactional' AND status = 'delivered'",
        )
    ]
    drained = drained_meanwhile
    drain_rate = drained / (ended - started).total_seconds()
    p50 = ms(_percentile(latencies, 50))
    p99 = ms(_percentile(latencies, 99))
    log(
        f"isolation: transactional {len(latencies)}/{sent} delivered ({done} final),"
        f" p50 {p50:.0f} ms, p99 {p99:.0f} ms; marketing drained {drain_rate:.0f}/s"
    )
    return [
        Figure(
            f"transactional accept→delivered p99 at {rate:.0f}/s, marketing backlog of {backlog}",
            p99,
            "ms",
            None,
            "< 1000 ms",
            p99 < 1000 and len(latencies) == sent,
            f"p50 {p50:.0f} ms; {len(latencies)} of {sent} delivered",
        ),
        Figure(
            "marketing drain rate meanwhile",
            drain_rate,
            "msg/s",
            None,
            "≈ delivery figure",
            None,
            f"{drained} of {backlog} drained in {(ended - started).total_seconds():.0f} s",
        ),
    ] + (
        [
            Figure(
                f"marketing backlog of {backlog} drained (transactional stopped)",
                total / total_seconds if total_seconds else 0.0,
                "msg/s",
                None,
                "to completion or the bound",
                total >= backlog,
                f"{total} of {backlog} final after {total_seconds:.0f} s"
                + (
                    ""
                    if total >= backlog or not total
                    else f"; the rest at this rate: {(backlog - total) * total_seconds / total:.0f}"
                    " s"
                ),
            )
        ]
        if drain_seconds
        else []
    )


def _percentile(values: list[float], q: float) -> float:
    from bench.loadgen import percentile

    return percentile(values, q)


# 6. Scale


FILL_MESSAGES = """
WITH created AS (
INSERT INTO messages (id, category, tenant_id, status, recipient, content, "cascade", metadata,
                      current_step, delivered_step, delivered_channel, seq, created_at,
                      updated_at, completed_at)
SELECT {uuid}, (ARRAY['transactional', 'service', 'marketing'])[1 + i % 3], $1,
       (ARRAY['delivered', 'delivered', 'delivered', 'failed'])[1 + i % 4],
       jsonb_build_object('phone', '+48600' || lpad((i % 1000000)::text, 6, '0'),
                          'email', 'user' || i || '@example.com'),
       '{{"text": "Your code is 4711"}}'::jsonb, $2::jsonb, '{{}}'::jsonb,
       0, 0, 'sms', 3, ts, ts, ts
FROM generate_series($3::bigint, $4::bigint) AS i,
     LATERAL (SELECT now() - make_interval(secs => ($4 - i) / 100.0) AS ts) AS t
RETURNING id, category, tenant_id, created_at
)
INSERT INTO events (message_id, category, tenant_id, seq, status, source, at)
SELECT id, category, tenant_id, 1, 'accepted', 'api', created_at FROM created
"""


async def fill_ledger(stack: Stack, target: int, budget: float) -> int:
    """Up to `target` messages (each with an event) within about `budget` seconds."""
    dsn = plain_dsn(stack.database_url)
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version_num")
        uuid_fn = "uuidv7()" if int(version) >= 180000 else "gen_random_uuid()"
        cascade = orjson.dumps(
            [{"channel": "sms", "provider": "sandbox", "timeout": 120, "success_on": "delivered"}]
        ).decode()
        chunk = 100_000
        filled = 0
        started = time.monotonic()
        while filled < target and time.monotonic() - started < budget:
            n = min(chunk, target - filled)
            async with conn.transaction():
                await conn.execute(
                    FILL_MESSAGES.format(uuid=uuid_fn),
                    stack.tenant_id,
                    cascade,
                    filled + 1,
                    filled + n,
                )
            filled += n
            log(f"ledger: {filled} messages + events ({time.monotonic() - started:.0f} s)")
        await conn.execute("VACUUM ANALYZE messages")
        await conn.execute("VACUUM ANALYZE events")
        log(f"ledger: analyzed ({time.monotonic() - started:.0f} s)")
    finally:
        await conn.close()
    return filled


async def scale(
    stack: Stack,
    target_rows: int,
    fill_budget: float,
    seconds: float,
    empty_rate: float | None,
) -> list[Figure]:
    dsn = plain_dsn(stack.database_url)
    client = Client(stack)
    await stack.reset()
    rows = await fill_ledger(stack, target_rows, fill_budget)
    sample = [
        to_public("msg", row["id"])
        for row in await fetch(dsn, "SELECT id FROM messages TABLESAMPLE SYSTEM (1) LIMIT 20000")
    ]
    random.shuffle(sample)
    figures: list[Figure] = []
    with stack.running(api_workers=1):
        send = client.sender(message_body)
        await closed_loop(client.port, send, concurrency=CONCURRENCY, count=500, seconds=10)
        full = await closed_loop(
            client.port, send, concurrency=CONCURRENCY, count=10**7, seconds=seconds
        )
        check(full, "scale: accept")
        log(f"accept with {rows} messages in the ledger: {full.rate:.0f}/s")
        figures.append(
            Figure(
                f"accept with {rows / 1e6:.1f} M messages in the ledger, 1 API proc",
                full.rate,
                "msg/s",
                empty_rate,
                "≥ 80 % of empty",
                None if empty_rate is None else full.rate >= 0.8 * empty_rate,
                "baseline: the empty-ledger figure (benchmark 1)",
            )
        )
        by_id = await _lookup_p99(
            client,
            lambda i: f"/v1/messages/{sample[i % len(sample)]}",
            "GET /v1/messages/{id}",
            f", {rows / 1e6:.1f} M rows",
            seconds,
        )
        listed = await _lookup_p99(
            client,
            lambda _: "/v1/messages?limit=50&status=failed&category=transactional",
            "GET /v1/messages?limit=50&status=failed&category=transactional",
            "",
            seconds,
        )
        figures += [by_id, listed]
    return figures


async def _lookup_p99(
    client: Client, path: Callable[[int], str], label: str, suffix: str, seconds: float
) -> Figure:
    """`GET path(i)` at LOOKUP_RATE for `seconds`: its p99 against the 20 ms target."""
    run = await open_loop(
        client.port,
        lambda i: client.get(path(i)),
        rate=LOOKUP_RATE,
        count=10**6,
        seconds=seconds,
        connections=16,
    )
    check(run, f"scale: {label}")
    p50, p99 = ms(run.percentile(50)), ms(run.percentile(99))
    log(f"{label} at {LOOKUP_RATE}/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    return Figure(
        f"{label} p99 at {LOOKUP_RATE}/s{suffix}",
        p99,
        "ms",
        None,
        "< 20 ms",
        p99 < 20,
        f"p50 {p50:.1f} ms",
    )


Scenario = Callable[[], Awaitable[list[Figure]]]
