"""The delivery engine: one loop per traffic category, many messages per claim.

Each turn claims up to a batch of the category's due messages in one transaction
(`SELECT … FOR UPDATE SKIP LOCKED` on `due_at`), decides for each what is due (send the
current step, time it out, expire the message, look again later), writes every change
in one statement and commits: a claimed step is `sending`, due again at its deadline,
before its request leaves. The sends then run concurrently, bounded per provider account
(rate slots taken for the whole group in one Redis call, a cap on requests in flight),
and every answer is recorded in one more transaction. Claims overlap: the next batch is
taken while earlier ones are still with their providers, up to the category's capacity.

Timers are the same loop: a step's deadline, a retry, `send_at`, quiet hours and
`expires_at` are all just `due_at`. Nothing is lost with a worker: a batch killed before
its results were recorded leaves its steps `sending`, never sent again, and their deadline
decides. Redis only wakes the loop (`JobQueue.wait_for_wake`) and holds the guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

import structlog
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from app.cascade import service
from app.cascade.machine import NOT_SENT, AttemptStatus, Due, due_action
from app.db import Transaction
from app.ledger import repository as ledger
from app.ledger.repository import AttemptRow, MessageRow
from app.policy import service as policy
from app.runtime import Runtime, utcnow
from providers.accounts import ProviderAccount
from providers.base import (
    Accepted,
    Category,
    Channel,
    ProviderError,
    Rejected,
    SendResult,
    TransientProviderError,
)

log = structlog.get_logger()

T = TypeVar("T")
Result = SendResult | TransientProviderError

# A Redis that hangs (mid-restart) must not hold a claimed batch: its sends then count as
# transient errors, retried inside their window.
GUARDS_TIMEOUT_SECONDS = 1.0
# Short waits for rate slots happen inline; longer ones make the rest a retry for later.
MAX_INLINE_RATE_WAIT = 1.0
# What the loop treats as "the database is away for now": pause, then claim again. Any
# of these inside a transaction ends it (Postgres aborts it; SQLAlchemy may have
# invalidated the connection), so they end the whole claim, never just one message.
DATABASE_ERRORS = (SQLAlchemyError, OSError, TimeoutError)
# Recording a batch's answers is retried with a growing pause (a deadlock with a
# concurrent receipt, a Postgres restart) for this long before its steps are left to
# their deadlines: the answers exist only in this process until they are written.
RECORD_PATIENCE_SECONDS = 60.0
RECORD_MAX_PAUSE_SECONDS = 2.0
# Once stopping, claimed sends still start for this long (their step's window is running,
# and no other worker may be up); those still waiting for a send slot then are handed back.
STOP_SEND_GRACE_SECONDS = 2.0


@dataclass
class Batch:
    """One claim's sends, by the message they belong to."""

    plans: list[service.SendPlan]
    results: dict[int, Result] = field(default_factory=dict)


class DeliveryEngine:
    def __init__(self, runtime: Runtime, category: str) -> None:
        self.rt = runtime
        self.category = category
        settings = runtime.settings
        self.capacity = max(1, settings.worker_concurrency[Category(category)])
        self.batch_size = max(1, min(settings.engine_batch_size, self.capacity))
        self.poll_seconds = settings.engine_poll_seconds
        self.in_flight = 0
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._hand_back_after: float | None = None  # loop time, once stopping

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and send until `stop`, then let the batches in flight finish: requests
        with a provider are answered and recorded; sends not started within
        `STOP_SEND_GRACE_SECONDS` are handed back."""
        log.info("engine_started", category=self.category, batch=self.batch_size)
        while not stop.is_set():
            free = self.capacity - self.in_flight
            if free <= 0:
                self._room.clear()
                await _first(self._room.wait(), stop.wait())
                continue
            limit = min(self.batch_size, free)
            try:
                taken = await self.claim(limit)
            except DATABASE_ERRORS as exc:
                log.warning("engine_claim_failed", category=self.category, error=repr(exc))
                await _first(asyncio.sleep(self.poll_seconds), stop.wait())
                continue
            except Exception:  # a bug must cost one turn (rolled back), never the loop
                log.exception("engine_claim_crashed", category=self.category)
                await _first(asyncio.sleep(self.poll_seconds), stop.wait())
                continue
            if taken < limit:
                await self._idle(stop)
        self._hand_back_after = asyncio.get_running_loop().time() + STOP_SEND_GRACE_SECONDS
        await self.drain()

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def claim(self, limit: int) -> int:
        """One turn: claim up to `limit` due messages, act on each, commit, and start the
        sends in the background. Returns how many messages were due."""
        at = utcnow()
        plans: list[service.SendPlan] = []
        async with self.rt.transaction() as tx:
            tx.changes = []
            messages, attempts = await ledger.claim_due(tx.conn, self.category, at, limit)
            by_message: dict[object, list[AttemptRow]] = defaultdict(list)
            for attempt in attempts:
                by_message[attempt.message_id].append(attempt)
            known = await self._prefetch(tx, messages, by_message)
            for message in messages:
                plan = await self._take(tx, message, by_message[message.id], at, known)
                if plan is not None:
                    plans.append(plan)
            await ledger.write_changes(tx.conn, tx.changes)
        if plans:
            self.in_flight += len(plans)
            task = asyncio.create_task(self._send_and_record(Batch(plans)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(messages)

    async def _prefetch(
        self,
        tx: Transaction,
        messages: list[MessageRow],
        attempts: dict[object, list[AttemptRow]],
    ) -> policy.Prefetched:
        """The policy lookups of every step about to be tried for the first time, in one go
        (one query for the batch instead of one per message)."""
        sends: list[tuple[uuid.UUID, Category, Channel, str]] = []
        people: list[tuple[uuid.UUID, list[str]]] = []
        for message in messages:
            if any(a.step == message.current_step for a in attempts[message.id]):
                continue  # a retry or a deadline: policy was asked when it was first tried
            with contextlib.suppress(Exception):  # bad data: `_take` deals with it alone
                channel, _, address, _ = service.step_target(self.rt.providers, message)
                if address is not None:
                    sends.append((message.tenant_id, Category(message.category), channel, address))
                people.append((message.tenant_id, policy.recipient_keys(message.recipient)))
        return await policy.prefetch(tx.conn, sends, self.rt.settings, people)

    async def _take(
        self,
        tx: Transaction,
        message: MessageRow,
        attempts: list[AttemptRow],
        at: datetime,
        known: policy.Prefetched,
    ) -> service.SendPlan | None:
        """Do what is due for one claimed message; a failure here stays with that message."""
        assert tx.changes is not None
        mark = len(tx.changes)
        try:
            return await self._act(tx, message, attempts, at, known)
        except DATABASE_ERRORS:
            raise  # the transaction is gone: the claim rolls back and is taken again
        except Exception:  # one message's bad data must not stall the batch, or the loop
            log.exception("engine_message_failed", message_id=str(message.id))
            del tx.changes[mark:]
            await service.retime(tx, message, at, at + RETRY_BROKEN)
            return None
        finally:
            structlog.contextvars.clear_contextvars()  # one message's log context only

    async def _act(
        self,
        tx: Transaction,
        message: MessageRow,
        attempts: list[AttemptRow],
        at: datetime,
        known: policy.Prefetched,
    ) -> service.SendPlan | None:
        settings = self.rt.settings
        slack = service.DEADLINE_SLACK
        current = next((a for a in attempts if a.step == message.current_step), None)
        held = message.not_before is not None and message.not_before > at + slack
        action = due_action(
            message.status,
            current.status if current is not None else None,
            deadline_passed=current is not None and current.deadline_at <= at + slack,
            expired=message.expires_at is not None and message.expires_at <= at + slack,
            held=held,
            in_window=current is not None and service.awaits_window(message, current),
        )
        if action is Due.SEND:
            reached_before = any(
                a.step < message.current_step and a.status not in NOT_SENT for a in attempts
            )
            return await service.begin_send(
                tx, self.rt.providers, settings, message, current, reached_before, at, known
            )
        if action is Due.TIMEOUT:
            assert current is not None
            await service.expire_step(tx, message, current, at)
        elif action is Due.EXPIRE:
            await service.expire_message(tx, message, current, at)
        elif action is Due.FORGET:
            await service.forget(tx, message, at)
        elif current is not None and current.status is not AttemptStatus.PENDING:
            await service.retime(tx, message, at, current.deadline_at)  # still in its window
        else:
            assert message.not_before is not None  # held until its send time
            await service.retime(tx, message, at, message.not_before)
        return None

    async def _idle(self, stop: asyncio.Event) -> None:
        """Nothing more is due now: sleep until woken, the next `due_at`, or the poll."""
        timeout = self.poll_seconds
        try:
            async with self.rt.engine.connect() as conn:
                upcoming = await ledger.next_due(conn, self.category)
        except DATABASE_ERRORS as exc:
            log.warning("engine_next_due_failed", category=self.category, error=repr(exc))
            upcoming = None
        if upcoming is not None:
            timeout = min(timeout, (upcoming - utcnow()).total_seconds())
        if timeout <= 0 or stop.is_set():
            return
        await _first(self.rt.queue.wait_for_wake(self.category, timeout), stop.wait())

    async def _send_and_record(self, batch: Batch) -> None:
        try:
            await self._send_all(batch)
            await self._record(batch)
        except Exception:
            log.exception("engine_batch_failed", category=self.category, sends=len(batch.plans))
        finally:
            self.in_flight -= len(batch.plans)
            self._room.set()

    async def _send_all(self, batch: Batch) -> None:
        by_account: dict[str, list[int]] = defaultdict(list)
        for index, plan in enumerate(batch.plans):
            by_account[plan.provider.name].append(index)
        await asyncio.gather(
            *(self._send_group(batch, name, indexes) for name, indexes in by_account.items())
        )

    async def _send_group(self, batch: Batch, account_name: str, indexes: list[int]) -> None:
        """One provider account's share of a batch: its guards in one call, then the sends,
        at most `max_in_flight` at a time."""
        account = self.rt.providers.account(account_name)
        guards = self.rt.send_guards
        waiting = list(indexes)
        admitted: list[int] = []
        failures = 0
        try:
            while waiting:
                async with asyncio.timeout(GUARDS_TIMEOUT_SECONDS):
                    admission = await guards.admit(account, len(waiting))
                if admission.circuit_open:
                    for index in waiting:
                        batch.results[index] = Rejected(
                            "circuit_open",
                            f"{account.name} is failing with transient errors; skipped for now",
                        )
                    waiting = []
                    break
                failures = max(failures, admission.failures)
                admitted += waiting[: admission.slots]
                waiting = waiting[admission.slots :]
                if waiting and not 0 < admission.wait <= MAX_INLINE_RATE_WAIT:
                    for index in waiting:
                        batch.results[index] = TransientProviderError(
                            "rate_limited",
                            f"{account.name} allows {account.rate_per_second}/s",
                            retry_after=admission.wait,
                            provider_fault=False,
                        )
                    waiting = []
                elif waiting:
                    await asyncio.sleep(admission.wait)
        except (RedisError, OSError, TimeoutError) as exc:
            # The guards live in Redis: without them, retry within the window rather than
            # leave the claimed attempts unsent until their deadline.
            for index in waiting:
                batch.results[index] = TransientProviderError(
                    "guards_unavailable", repr(exc)[:200], provider_fault=False
                )
        limit = self.rt.send_slots(account)
        results = await asyncio.gather(
            *(self._send_one(account, limit, batch.plans[i]) for i in admitted)
        )
        for index, result in zip(admitted, results, strict=True):
            batch.results[index] = result
        failed = sum(isinstance(r, TransientProviderError) and r.provider_fault for r in results)
        if failed or failures:
            # The breaker weighs failures against answers from the first failure in its
            # window on: with none counted and none now, there is nothing to weigh (a Redis
            # round trip saved on nearly every batch).
            opened = await _record_guard(
                guards.record_outcomes(account, failures=failed, successes=len(results) - failed)
            )
            if opened:
                log.warning("circuit_opened", provider=account.name, failures=failed)

    async def _send_one(
        self, account: ProviderAccount, limit: asyncio.Semaphore, plan: service.SendPlan
    ) -> Result:
        async with limit:
            stopping = self._hand_back_after
            if stopping is not None and asyncio.get_running_loop().time() >= stopping:
                return handed_back()  # due again at once, for a worker that stays
            try:
                return await plan.provider.send(plan.outbound)
            except TransientProviderError as exc:
                return exc  # counted by the breaker with the rest of the group
            except (ProviderError, OSError, TimeoutError) as exc:
                # An adapter that failed in an unclassified way: transient, retry in window.
                log.warning("provider_send_error", provider=account.name, error=repr(exc))
                return TransientProviderError("provider_error", repr(exc)[:200])

    async def _record(self, batch: Batch) -> None:
        """Every answer of the batch in one transaction (retried: a deadlock with a receipt
        for the same messages, a Postgres restart). Given up, the steps stay `sending`."""
        plans = batch.plans
        results = [batch.results[i] for i in range(len(plans))]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RECORD_PATIENCE_SECONDS
        pause = 0.05
        while True:
            try:
                await self._record_once(plans, results)
                return
            except DATABASE_ERRORS as exc:
                if loop.time() + pause > give_up:
                    log.error("engine_record_failed", sends=len(plans), error=repr(exc))
                    return
                log.warning("engine_record_retry", sends=len(plans), error=repr(exc))
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECORD_MAX_PAUSE_SECONDS)

    async def _record_once(self, plans: Sequence[service.SendPlan], results: list[Result]) -> None:
        at = utcnow()
        ids = sorted({plan.message_id for plan in plans})
        async with self.rt.transaction() as tx:
            tx.changes = []
            messages = {m.id: m for m in await ledger.lock_messages(tx.conn, self.category, ids)}
            attempts = {a.id: a for a in await ledger.attempts_of(tx.conn, ids)}
            for plan, result in zip(plans, results, strict=True):
                message = messages.get(plan.message_id)
                await service.record_send_result(
                    tx,
                    self.rt.settings,
                    plan,
                    result,
                    at,
                    message,
                    attempts.get(plan.attempt_id),
                )
                structlog.contextvars.clear_contextvars()
            await ledger.write_changes(tx.conn, tx.changes)
        for plan, result in zip(plans, results, strict=True):
            message = messages.get(plan.message_id)
            log.info(
                "step_sent",
                message_id=plan.outbound.message_id,
                attempt=plan.outbound.attempt_id,
                tenant=str(message.tenant_id) if message else None,
                provider=plan.provider.name,
                step=plan.step,
                result=type(result).__name__,
                error=None if isinstance(result, Accepted) else result.code,
            )


# A claimed send not started before the worker stops: recorded as a retry due now, so the
# step is `pending` again, never left `sending` for its deadline to fail it.
def handed_back() -> TransientProviderError:
    return TransientProviderError(
        "worker_stopping", "not sent: the worker stopped first", retry_after=0, provider_fault=False
    )


# A message whose processing raised is looked at again this much later (logged each time).
RETRY_BROKEN = timedelta(seconds=30)


async def _record_guard(bookkeeping: Awaitable[T]) -> T | None:
    """Breaker bookkeeping after a send: a Redis outage must not lose what the provider said."""
    try:
        async with asyncio.timeout(GUARDS_TIMEOUT_SECONDS):
            return await bookkeeping
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("send_guards_unavailable", error=repr(exc))
        return None


async def _first(*waits: Awaitable[object]) -> None:
    """Wait until the first of `waits` is done; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
