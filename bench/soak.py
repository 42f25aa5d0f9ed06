"""Soak: many messages through crashes, then an account of every one of them.

    .venv/bin/python -m bench.soak --messages 20000 [--seed 1] [--rate 400] [--max-seconds 1200]

Not part of the test suite; everything on 127.0.0.1 and unix sockets, bounded by
`--max-seconds`. The chaos suite's parts (`tests/chaos/stack.py`: its own embedded
Postgres that can be stopped, a redis-server that can be flushed, processes that can be
SIGKILLed) run the real `cascade api` and two `cascade worker` processes, with the
Twilio simulator in a process of its own (`bench/provider.py`) logging every send it
accepted. Messages are posted through the public API at `--rate`, single posts and
batches mixed, each with an idempotency key (some posted again with the same key on
purpose, every unanswered or 5xx/409/429 one retried with it), while the API and each
worker are SIGKILLed and restarted, Redis is flushed and Postgres restarted, during
the sending and again during the drain. Then every message must become final.

What it prints, per idempotency key (= one message the client meant to send):

- lost: answered 202 but the id is not in the ledger, or it never became final (stuck);
- stuck: in the ledger, not final when the bound ran out;
- sent twice: for one message and cascade step, more than one send the provider accepted
  (the simulator's log, by the attempt id in the StatusCallback). Submits it refused
  (4xx/5xx) are not sends. A worker killed with a send in flight leaves its step
  `sending`: never submitted again, its receipt or its deadline decides. If the provider
  had accepted that send, it is one accepted submit, so not "sent twice"; should the
  deadline pass before its receipt, the next step is sent as well, counted apart as
  "also delivered on a later step";
- duplicates per key: messages in the ledger beyond the first for one key;
- time to final (ledger: created_at → completed_at), the chaos events, throughput.

Exit status 1 when anything is lost, sent twice, or duplicated for one key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import uvloop

from app import migrate
from app.auth.service import ALL_SCOPES, ensure_tenant, issue_key
from app.db import create_engine
from app.ids import to_public
from app.runtime import utcnow
from bench.loadgen import percentile
from bench.scenarios import FINAL as FINAL_SQL
from bench.stack import plain_dsn
from tests.chaos.stack import (
    PEPPER,
    AppProcess,
    EmbeddedPostgres,
    RedisServer,
    free_port,
    process_env,
    stack_directory,
    until,
)
from tests.helpers import FINAL

START_TIMEOUT_SECONDS = 90.0
CLIENT_TIMEOUT_SECONDS = 15.0
IN_FLIGHT = 32  # requests the client has open at once
BATCH_SIZES = (20, 500)  # a batch holds between these many messages
BATCH_SHARE = 0.5  # of the messages, about this share goes through the batch endpoint
REPLAY_SHARE = 0.05  # of the answered requests, posted again with the same key on purpose
RETRIED_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
STEP_TIMEOUT = 30  # seconds, for the steps expected to succeed


# The mix: (name, weight, recipient + cascade for message i). Phone endings pick the
# Twilio simulator's behaviour (tests/simulators/twilio.py), email/push the sandbox's;
# every number is a valid Polish mobile one (+48 and 9 digits).
def _sms(ending: str, sms_timeout: int = STEP_TIMEOUT) -> Callable[[int], dict[str, Any]]:
    def build(i: int) -> dict[str, Any]:
        phone = f"+486{i % 10000:04d}{ending}" if ending else _delivered_phone(i)
        return {
            "to": {"phone": phone, "email": f"soak{i}.ok@example.com"},
            "cascade": [
                {"channel": "sms", "provider": "twilio", "timeout": sms_timeout},
                {"channel": "email", "provider": "sandbox", "timeout": STEP_TIMEOUT},
            ],
        }

    return build


def _delivered_phone(i: int) -> str:
    return f"+4860{i % 1000000:06d}3"  # ends in none of the simulator's special endings


def _silent_push(i: int) -> dict[str, Any]:
    return {
        "to": {
            "push_token": f"soak-{i}-silent",
            "phone": _delivered_phone(i),
            "email": f"soak{i}.ok@example.com",
        },
        "cascade": [
            {"channel": "push", "provider": "sandbox", "timeout": 2},
            {"channel": "sms", "provider": "twilio", "timeout": STEP_TIMEOUT},
            {"channel": "email", "provider": "sandbox", "timeout": STEP_TIMEOUT},
        ],
    }


MIX: list[tuple[str, int, Callable[[int], dict[str, Any]]]] = [
    ("sms delivered", 55, _sms("")),
    ("sms undelivered → email", 15, _sms("0999")),
    ("sms silent (3 s) → email", 10, _sms("0777", sms_timeout=3)),
    ("push silent (2 s) → sms delivered", 10, _silent_push),
    ("sms refused (21211) → email", 5, _sms("0211")),
    ("sms slow answer (1.5 s), delivered", 5, _sms("0408")),
]
CATEGORIES = ("transactional", "service")


@dataclass
class Message:
    index: int
    key: str
    kind: str
    category: str
    item: dict[str, Any]  # to + cascade + metadata


def plan_messages(count: int, seed: int, run: str) -> list[Message]:
    rng = random.Random(seed)
    names = [name for name, _, _ in MIX]
    builders = {name: build for name, _, build in MIX}
    weights = [weight for _, weight, _ in MIX]
    plan = []
    for i in range(count):
        kind = rng.choices(names, weights)[0]
        item = builders[kind](i)
        item["metadata"] = {"soak": run, "index": str(i)}
        plan.append(Message(i, f"soak-{run}-{i}", kind, rng.choice(CATEGORIES), item))
    return plan


CONTENT = {"text": "Your code is 4711", "subject": "Your code"}


@dataclass
class Request:
    """One POST the client makes (a single message, or a batch of one category)."""

    path: str
    body: dict[str, Any]
    key: str
    messages: list[Message]


def plan_requests(plan: list[Message], seed: int, run: str) -> list[Request]:
    rng = random.Random(seed + 1)
    requests: list[Request] = []
    pending: dict[str, list[Message]] = defaultdict(list)
    goal = rng.randint(*BATCH_SIZES)

    def flush(category: str) -> None:
        nonlocal goal
        batch = pending.pop(category)
        items = [{**m.item, "idempotency_key": m.key} for m in batch]
        body = {"category": category, "content": CONTENT, "messages": items}
        key = f"soak-{run}-batch-{batch[0].index}"
        requests.append(Request("/v1/messages/batch", body, key, batch))
        goal = rng.randint(*BATCH_SIZES)

    for message in plan:
        if rng.random() < BATCH_SHARE:
            pending[message.category].append(message)
            if len(pending[message.category]) >= goal:
                flush(message.category)
        else:
            body = {"category": message.category, "content": CONTENT, **message.item}
            requests.append(Request("/v1/messages", body, message.key, [message]))
    for category in list(pending):
        flush(category)
    return requests


@dataclass
class Event:
    at: float  # seconds since the soak started
    wall: datetime
    what: str
    detail: str = ""


@dataclass
class ClientLog:
    accepted: dict[int, str] = field(default_factory=dict)  # message index → id answered
    rejected: dict[int, str] = field(default_factory=dict)  # index → why (a bug if any)
    retries: Counter[str] = field(default_factory=Counter)  # why a request was posted again
    replays: int = 0
    replay_mismatches: list[str] = field(default_factory=list)
    gave_up: int = 0  # requests never answered before the bound
    started: float = 0.0
    finished: float = 0.0


class Soak:
    """The deployment: Postgres, Redis, the provider, the API and two workers."""

    def __init__(self, directory: Path, workers: int) -> None:
        self.directory = directory
        self.workers_wanted = workers
        self.started = time.monotonic()
        self.events: list[Event] = []
        self.submit_log = directory / "submits.jsonl"
        self.api_port = free_port()
        self.postgres: EmbeddedPostgres
        self.redis = RedisServer(directory)
        self.provider: AppProcess
        self.api: AppProcess
        self.workers: list[AppProcess] = []
        self.database_url = ""
        self.tenant_id = uuid.UUID(int=0)
        self.key = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def dsn(self) -> str:
        return plain_dsn(self.database_url)

    def note(self, what: str, detail: str = "") -> None:
        event = Event(time.monotonic() - self.started, utcnow(), what, detail)
        self.events.append(event)
        print(f"  [{event.at:7.1f} s] {what}{': ' + detail if detail else ''}", flush=True)

    async def start(self) -> None:
        self.postgres = await asyncio.to_thread(EmbeddedPostgres, self.directory / "postgres")
        await asyncio.to_thread(self.redis.start)
        admin = await asyncpg.connect(self.postgres.admin_url)
        try:
            await admin.execute('CREATE DATABASE "cascade_soak"')
        finally:
            await admin.close()
        self.database_url = self.postgres.url("cascade_soak")
        await asyncio.to_thread(migrate.upgrade, self.database_url)
        await self._issue_key()
        twilio_url = await self._start_provider()
        env = process_env(
            self.directory, self.database_url, self.redis.url, self.api_url, twilio_url
        )
        env.update(
            {
                # The per-key request limit would throttle the client, not test anything.
                "CASCADE_API_RATE_PER_SECOND": "1000000",
                "CASCADE_API_BURST": "1000000",
                "CASCADE_DB_POOL_SIZE": "10",
                "CASCADE_SANDBOX_DELAY": "PT0.01S",
            }
        )
        python = sys.executable
        api_argv = ["app.cli", "api", "--host", "127.0.0.1", "--port", str(self.api_port)]
        self.api = AppProcess("api", [python, "-m", *api_argv], env, self.directory / "api.log")
        self.workers = [
            AppProcess(
                f"worker-{n}",
                [python, "-m", "app.cli", "worker"],
                env,
                self.directory / f"worker-{n}.log",
            )
            for n in range(self.workers_wanted)
        ]
        await asyncio.gather(self.start_api(), *(self.start_worker(w) for w in self.workers))

    async def _issue_key(self) -> None:
        engine = create_engine(self.database_url, 1)
        try:
            async with engine.begin() as conn:
                self.tenant_id = await ensure_tenant(conn, "soak", utcnow())
                issued = await issue_key(conn, PEPPER, self.tenant_id, "soak", utcnow(), ALL_SCOPES)
        finally:
            await engine.dispose()
        self.key = issued.key

    async def _start_provider(self) -> str:
        ready = self.directory / "provider.url"
        argv = [sys.executable, "-m", "bench.provider", str(ready)]
        argv += ["--submit-log", str(self.submit_log), "--callback-delay", "0.05"]
        argv += ["--slow-response", "1.5"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.provider = AppProcess("provider", argv, env, self.directory / "provider.log")
        self.provider.start()

        async def written() -> bool:
            if not self.provider.alive:
                raise RuntimeError(f"the provider exited; see {self.provider.log_path}")
            return ready.exists() and bool(ready.read_text())

        await until(written, START_TIMEOUT_SECONDS, "provider simulator")
        return ready.read_text()

    async def start_api(self) -> None:
        self.api.start()

        async def ready() -> bool:
            if not self.api.alive:
                raise RuntimeError(f"the API exited; see {self.api.log_path}")
            async with httpx.AsyncClient(timeout=2) as client:
                try:
                    return (await client.get(f"{self.api_url}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

        await until(ready, START_TIMEOUT_SECONDS, "API")

    async def start_worker(self, worker: AppProcess) -> None:
        mark = len(worker.log_text())
        worker.start()

        async def started() -> bool:
            if not worker.alive:
                raise RuntimeError(f"{worker.name} exited; see {worker.log_path}")
            return "worker_started" in worker.log_text()[mark:]

        await until(started, START_TIMEOUT_SECONDS, worker.name)

    # Faults

    async def kill_api(self) -> None:
        pid = self.api.process.pid if self.api.process else None
        await self.api.kill()
        began = time.monotonic()
        self.note("API SIGKILL", f"pid {pid}")
        await self.start_api()
        self.note("API back", f"ready {time.monotonic() - began:.1f} s after the kill")

    async def kill_worker(self, n: int) -> None:
        worker = self.workers[n]
        pid = worker.process.pid if worker.process else None
        await worker.kill()
        began = time.monotonic()
        sending = await self.count_sending()
        self.note(f"{worker.name} SIGKILL", f"pid {pid}; attempts `sending` just after: {sending}")
        await self.start_worker(worker)
        self.note(f"{worker.name} back", f"started {time.monotonic() - began:.1f} s after the kill")

    async def flush_redis(self) -> None:
        await self.redis.flush()
        self.note("Redis FLUSHALL")

    async def restart_postgres(self) -> None:
        began = time.monotonic()
        await asyncio.to_thread(self.postgres.stop)
        self.note("Postgres stopped", f"pg_ctl -m fast took {time.monotonic() - began:.1f} s")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(self.postgres.start)
        self.note("Postgres started", f"down {time.monotonic() - began:.1f} s")

    # The ledger

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def count_sending(self) -> int | str:
        try:
            rows = await self.query("SELECT count(*) FROM attempts WHERE status = 'sending'")
        except (OSError, asyncpg.PostgresError) as exc:
            return f"unknown ({type(exc).__name__})"
        return int(rows[0][0])

    async def open_messages(self) -> int | None:
        """Messages not final yet (None while the ledger cannot be read)."""
        try:
            rows = await self.query(
                f"SELECT count(*) FROM messages WHERE tenant_id = $1 AND status NOT IN {FINAL_SQL}",
                self.tenant_id,
            )
        except (OSError, asyncpg.PostgresError):
            return None
        return int(rows[0][0])

    async def stop(self) -> None:
        for process in (*self.workers, self.api):
            process.send(signal.SIGTERM)
        for process in (*self.workers, self.api):
            if process.process is not None:
                with contextlib.suppress(TimeoutError):
                    await process.wait(20)
                await process.kill()
        # The provider writes the rest of its submit log on SIGTERM.
        self.provider.send(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await self.provider.wait(20)
        await self.provider.kill()

    def cleanup(self, keep: bool) -> None:
        self.redis.kill()
        with contextlib.suppress(Exception):
            self.postgres.cleanup()
        if not keep:
            shutil.rmtree(self.directory, ignore_errors=True)


# The client


class Client:
    def __init__(self, soak: Soak, deadline: float, seed: int) -> None:
        self.soak = soak
        self.deadline = deadline
        self.rng = random.Random(seed + 2)
        self.log = ClientLog()
        self.http = httpx.AsyncClient(
            base_url=soak.api_url,
            headers={"Authorization": f"Bearer {soak.key}"},
            timeout=CLIENT_TIMEOUT_SECONDS,
            limits=httpx.Limits(max_connections=IN_FLIGHT * 2),
        )
        self._replays: set[asyncio.Task[None]] = set()

    async def send_all(self, requests: list[Request], rate: float) -> None:
        """Every request, paced at `rate` messages per second, `IN_FLIGHT` at a time."""
        slots = asyncio.Semaphore(IN_FLIGHT)
        tasks = []
        self.log.started = time.monotonic()
        sent = 0
        for request in requests:
            due = self.log.started + sent / rate
            sent += len(request.messages)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await slots.acquire()
            if time.monotonic() > self.deadline:
                slots.release()
                self.log.gave_up += 1
                continue
            task = asyncio.create_task(self._send(request, slots))
            tasks.append(task)
        await asyncio.gather(*tasks)
        await asyncio.gather(*self._replays)
        self.log.finished = time.monotonic()
        self.soak.note(
            "sending done",
            f"{len(self.log.accepted)} accepted in {self.log.finished - self.log.started:.1f} s",
        )
        await self.http.aclose()

    async def _send(self, request: Request, slots: asyncio.Semaphore) -> None:
        try:
            response = await self._post(request)
            if response is None:
                self.log.gave_up += 1
                return
            self._record(request, response)
        finally:
            slots.release()
        if self.rng.random() < REPLAY_SHARE:
            task = asyncio.create_task(self._replay(request))
            self._replays.add(task)

    async def _post(self, request: Request) -> httpx.Response | None:
        """POST until answered with something other than a retryable status; the same key
        and body every time."""
        pause = 0.1
        headers = {"Idempotency-Key": request.key}
        while time.monotonic() < self.deadline:
            try:
                response = await self.http.post(request.path, json=request.body, headers=headers)
            except httpx.HTTPError as exc:
                self.log.retries[f"no answer ({type(exc).__name__})"] += 1
            else:
                if response.status_code not in RETRIED_STATUSES:
                    return response
                self.log.retries[str(response.status_code)] += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
        return None

    def _ids(self, request: Request, response: httpx.Response) -> dict[int, str]:
        """Message index → id from an answer; indexes refused are recorded as rejected."""
        ids: dict[int, str] = {}
        if request.path.endswith("/batch") and response.status_code in (202, 207):
            for result in response.json()["results"]:
                message = request.messages[result["index"]]
                if result.get("id"):
                    ids[message.index] = result["id"]
                else:
                    self.log.rejected[message.index] = orjson.dumps(result).decode()[:300]
        elif response.status_code == 202:
            ids[request.messages[0].index] = response.json()["id"]
        else:
            for message in request.messages:
                self.log.rejected[message.index] = f"{response.status_code} {response.text[:300]}"
        return ids

    def _record(self, request: Request, response: httpx.Response) -> None:
        for index, message_id in self._ids(request, response).items():
            self.log.accepted.setdefault(index, message_id)

    async def _replay(self, request: Request) -> None:
        """The same request again, as a client that missed the first answer would."""
        await asyncio.sleep(self.rng.uniform(0.0, 2.0))
        response = await self._post(request)
        if response is None:
            return
        self.log.replays += 1
        for index, message_id in self._ids(request, response).items():
            first = self.log.accepted.setdefault(index, message_id)
            if first != message_id:
                self.log.replay_mismatches.append(f"{index}: {first} then {message_id}")


# Chaos


async def chaos(soak: Soak, seed: int, send_seconds: float, sending: asyncio.Task[None]) -> None:
    """Each fault once while sending (spread over its expected length), then each again
    right after it, while the workers drain what is left."""
    rng = random.Random(seed + 3)
    faults: list[Callable[[], Awaitable[None]]] = [
        soak.kill_api,
        lambda: soak.kill_worker(0),
        soak.flush_redis,
        lambda: soak.kill_worker(1 % len(soak.workers)),
        soak.restart_postgres,
    ]
    gap = max(3.0, send_seconds / (len(faults) + 1))
    for fault in faults:
        await _sleep_unless_done(rng.uniform(0.5, 1.5) * gap, sending)
        await fault()
    await asyncio.wait([sending])
    for fault in [faults[3], faults[0], faults[2], faults[1], faults[4]]:
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        await fault()


async def _sleep_unless_done(seconds: float, task: asyncio.Task[None]) -> None:
    await asyncio.wait([task], timeout=seconds)


async def wait_final(soak: Soak, deadline: float) -> None:
    last_print = 0.0
    while time.monotonic() < deadline:
        remaining = await soak.open_messages()
        if remaining == 0:
            return
        if time.monotonic() - last_print > 10:
            soak.note("draining", f"{remaining} messages not final yet")
            last_print = time.monotonic()
        await asyncio.sleep(1.0)


# The account


@dataclass
class Account:
    lines: list[str]
    failed: bool


def account(
    soak: Soak,
    plan: list[Message],
    log: ClientLog,
    messages: list[asyncpg.Record],
    attempts: list[asyncpg.Record],
    submits: list[dict[str, Any]],
) -> Account:
    by_index: dict[int, list[asyncpg.Record]] = defaultdict(list)
    ledger: dict[str, asyncpg.Record] = {}
    for row in messages:
        by_index[int(row["idx"])].append(row)
        ledger[to_public("msg", row["id"])] = row
    missing = [i for i, m in log.accepted.items() if m not in ledger]
    stuck = [i for i, m in log.accepted.items() if m in ledger and ledger[m]["status"] not in FINAL]
    lost = len(missing) + len(stuck)
    duplicates = sum(len(rows) - 1 for rows in by_index.values() if len(rows) > 1)
    unanswered = sorted(set(by_index) - set(log.accepted))

    step_of = {to_public("att", row["id"]): (row["message_id"], row["step"]) for row in attempts}
    accepted_sends = Counter(record["attempt"] for record in submits)
    per_step: Counter[tuple[uuid.UUID, int]] = Counter()
    orphans = 0
    for attempt, n in accepted_sends.items():
        if attempt in step_of:
            per_step[step_of[attempt]] += n
        else:
            orphans += n
    sent_twice = sum(n - 1 for n in per_step.values() if n > 1)
    # Each double send with what its attempt row says: the tries and the last transient
    # error (a timeout there means the first request reached the provider unanswered).
    twice = [
        f"  {to_public('att', row['id'])} step {row['step']}: {per_step[key]} sends, tries"
        f" {row['tries']}, last error {row['error_code']}, now {row['status']}"
        for row in attempts
        if per_step[key := (row["message_id"], row["step"])] > 1
    ]
    delivered_steps = Counter(row["message_id"] for row in attempts if row["status"] == "delivered")
    twice_delivered = sum(1 for n in delivered_steps.values() if n > 1)

    done = [ledger[m] for m in log.accepted.values() if m in ledger]
    ttf = [
        (row["completed_at"] - row["created_at"]).total_seconds()
        for row in done
        if row["completed_at"] is not None
    ]
    statuses = Counter(row["status"] for row in messages)
    kinds = Counter(m.kind for m in plan)
    not_delivered = Counter(
        plan[int(row["idx"])].kind for row in messages if row["status"] != "delivered"
    )
    last_step: dict[uuid.UUID, asyncpg.Record] = {}
    for row in attempts:
        if row["message_id"] not in last_step or row["step"] > last_step[row["message_id"]]["step"]:
            last_step[row["message_id"]] = row
    # Why a final message was not delivered: how its last step ended, and whether that
    # step's send ever got its answer recorded (a claim whose worker died, or whose retry
    # waited out its window behind a backlog, ends `expired` with no `sent_at`).
    why_not = Counter(
        f"{row['status']}: last step {last['channel']} {last['status']}"
        + ("" if last["sent_at"] else ", never recorded as sent")
        for row in messages
        if row["status"] != "delivered" and (last := last_step.get(row["id"])) is not None
    )
    first = min((row["created_at"] for row in messages), default=None)
    last = max((row["completed_at"] for row in messages if row["completed_at"]), default=None)
    drain = (last - first).total_seconds() if first and last and last > first else float("nan")
    sending = log.finished - log.started

    lines = [
        f"messages planned          {len(plan)}",
        f"accepted (202, by key)    {len(log.accepted)}",
        f"rejected (not 202/207)    {len(log.rejected)}"
        + (f"  e.g. {next(iter(log.rejected.values()))}" if log.rejected else ""),
        f"requests never answered   {log.gave_up} (within the bound)",
        f"in the ledger, never 202  {len(unanswered)}",
        f"LOST                      {lost}  (202 but not in the ledger: {len(missing)};"
        f" never final: {len(stuck)})",
        f"STUCK (not final at end)  {len(stuck)}",
        f"SENT TWICE                {sent_twice}  (accepted provider sends beyond the first"
        " for one message step)",
        *twice[:20],
        f"  provider sends with an attempt id not in the ledger: {orphans}",
        f"  also delivered on a later step (receipt after the deadline): {twice_delivered}",
        f"DUPLICATES PER KEY        {duplicates}  (ledger messages beyond one per key)",
        f"replays with the same key {log.replays}, answered with another id:"
        f" {len(log.replay_mismatches)}",
        f"client retries            {sum(log.retries.values())}"
        f"  {dict(sorted(log.retries.items()))}",
        f"provider sends accepted   {sum(accepted_sends.values())}"
        f" for {len(accepted_sends)} attempts",
        f"final statuses            {dict(sorted(statuses.items()))}",
        f"mix                       {dict(kinds)}",
        f"not delivered, by kind    {dict(not_delivered)}",
        f"not delivered, why        {dict(why_not)}",
        "time to final (s)         "
        + "  ".join(f"p{q} {percentile(ttf, q):.2f}" for q in (50, 95, 99))
        + f"  max {max(ttf, default=float('nan')):.2f}",
        f"throughput                accept {len(log.accepted) / sending:.0f} msg/s over"
        f" {sending:.1f} s of sending (chaos included); first accepted → last final"
        f" {len(done) / drain:.0f} msg/s over {drain:.1f} s",
        "chaos events:",
        *(f"  {e.at:7.1f} s  {e.wall:%H:%M:%S}  {e.what}  {e.detail}" for e in soak.events),
    ]
    # A refused request means the soak itself is wrong (it posts only valid messages).
    failed = bool(
        lost or sent_twice or orphans or duplicates or log.replay_mismatches or log.rejected
    )
    return Account(lines, failed)


async def run(args: argparse.Namespace) -> int:
    run_id = f"{args.seed}"
    plan = plan_messages(args.messages, args.seed, run_id)
    requests = plan_requests(plan, args.seed, run_id)
    directory = stack_directory()
    soak = Soak(directory, workers=2)
    deadline = soak.started + args.max_seconds
    print(
        f"soak: {args.messages} messages, seed {args.seed}, in {len(requests)} requests;"
        f" stack in {directory}",
        flush=True,
    )
    try:
        await soak.start()
        soak.note("stack up", f"API {soak.api_url}, {len(soak.workers)} workers, provider")
        client = Client(soak, deadline, args.seed)
        sending = asyncio.create_task(client.send_all(requests, args.rate), name="sending")
        faults = asyncio.create_task(
            chaos(soak, args.seed, args.messages / args.rate, sending), name="chaos"
        )
        await asyncio.wait([sending, faults], timeout=max(0.0, deadline - time.monotonic()))
        for task in (sending, faults):
            if not task.done():
                task.cancel()
                soak.note("bound reached", f"{task.get_name()} cancelled")
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await wait_final(soak, deadline)
        soak.note("final", f"{await soak.open_messages()} messages not final")
        messages = await soak.query(
            "SELECT id, status, metadata->>'index' AS idx, created_at, completed_at"
            " FROM messages WHERE tenant_id = $1",
            soak.tenant_id,
        )
        attempts = await soak.query(
            "SELECT id, message_id, step, channel, status, sent_at, tries, error_code FROM attempts"
        )
        await soak.stop()
        submits = [orjson.loads(line) for line in soak.submit_log.read_bytes().splitlines()]
        result = account(soak, plan, client.log, messages, attempts, submits)
    finally:
        with contextlib.suppress(Exception):
            await soak.stop()
        soak.cleanup(keep=args.keep)
    print()
    for line in result.lines:
        print(line)
    print(f"\n{'FAILED' if result.failed else 'OK'}: 0 lost and 0 sent twice is the bar")
    return 1 if result.failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=400, help="messages/s the client posts")
    parser.add_argument("--max-seconds", type=float, default=1200, help="bound on the whole run")
    parser.add_argument("--keep", action="store_true", help="keep the stack's folder and logs")
    args = parser.parse_args()
    sys.exit(uvloop.run(run(args)))


if __name__ == "__main__":
    main()
