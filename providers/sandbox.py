"""Sandbox providers for every channel: watch a cascade fall over without any account.

The outcome is chosen by the recipient address's ending (phone numbers and numeric ids
by their last two digits, emails by the local part, push tokens by the token):

    01 / reject  rejected at send            02 / fail    accepted, then a failure receipt
    03 / silent  accepted, never a receipt   04 / flaky   two transient errors, then delivered
    anything else: accepted, then a delivered receipt after `delay_seconds`

Receipts come back through the same public path a real provider uses,
`POST /v1/providers/sandbox/status`, signed `X-Sandbox-Signature: t=<unix>,v1=<hex>`
with HMAC-SHA256(secret, "<t>." + body). The body is one report `{"event_id", "attempt_id",
"provider_message_id", "status"[, "error_code", "error_detail"]}` (`error_code` the sandbox's
own, e.g. `undeliverable`, which reads as `sandbox:undeliverable`) or, when several are due
at once, `{"receipts": [report, ...]}`; a post the service does not take (connection error,
5xx, 429) is sent again with backoff, as real providers retry their callbacks. Closing
posts the receipts still owed first (the sandbox lives in the worker: a stop must not drop
them): those not yet due are waited for a while, then sent at once.

Replies from recipients (`STOP`) are posted, signed the same way, to
`POST /v1/providers/sandbox/inbound` as `{"event_id", "channel", "from", "text"}` (and
`sent_at`, ISO 8601 with a zone, when the recipient sent it); a send
not yet answered by a receipt can be withdrawn with `cancel` (recorded in `cancelled`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import Counter
from collections.abc import Coroutine
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import httpx2
import orjson
import structlog
from pydantic import BaseModel, SecretStr

from providers.base import (
    Accepted,
    Channel,
    InboundMessage,
    InvalidSignature,
    MalformedCallback,
    OutboundMessage,
    ProviderCallback,
    ReceiptStatus,
    Recipient,
    Rejected,
    SendResult,
    StatusUpdate,
    TransientProviderError,
)

SIGNATURE_HEADER = "x-sandbox-signature"
SIGNATURE_TOLERANCE_SECONDS = 300
FLAKY_FAILURES = 2

log = structlog.get_logger()


def _aware_time(value: object) -> datetime:
    sent_at = datetime.fromisoformat(str(value))
    if sent_at.tzinfo is None:
        raise ValueError("`sent_at` needs a time zone")
    return sent_at.astimezone(UTC)  # OverflowError when UTC cannot hold it


class Outcome(Enum):
    DELIVER = "deliver"
    REJECT = "reject"
    FAIL = "fail"
    SILENT = "silent"
    FLAKY = "flaky"


_ENDINGS = {
    "01": Outcome.REJECT,
    "reject": Outcome.REJECT,
    "02": Outcome.FAIL,
    "fail": Outcome.FAIL,
    "03": Outcome.SILENT,
    "silent": Outcome.SILENT,
    "04": Outcome.FLAKY,
    "flaky": Outcome.FLAKY,
}


def outcome_for(address: str) -> Outcome:
    local = address.split("@", 1)[0] if "@" in address else address
    for ending, outcome in _ENDINGS.items():
        if local.endswith(ending):
            return outcome
    return Outcome.DELIVER


def _code(code: object) -> str:
    """Our error code for a sandbox one: sends and receipts alike."""
    return f"sandbox:{code}"


def _status_update(report: dict[str, Any]) -> StatusUpdate:
    status = ReceiptStatus(report["status"])
    code = report.get("error_code") or ("failed" if status is ReceiptStatus.FAILED else None)
    return StatusUpdate(
        status=status,
        event_id=str(report["event_id"]),
        provider_message_id=report.get("provider_message_id"),
        attempt_id=report.get("attempt_id"),
        error_code=_code(code) if code else None,
        error_detail=report.get("error_detail"),
    )


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


# Receipt posts in flight per sandbox channel, receipts per post at most, and the waits
# before posting one again.
RECEIPTS_IN_FLIGHT = 16
RECEIPTS_PER_POST = 50
RECEIPT_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# On close: how long receipts owed are given to come due and be posted; then those still
# waiting out their delay are posted at once, given as long again before any left are
# dropped (logged). Both well inside `cascade dev`'s bound on a worker's stop.
CLOSE_PATIENCE_SECONDS = 5.0


class SandboxConfig(BaseModel):
    name: str = "sandbox"
    callback_url: str
    secret: SecretStr
    delay_seconds: float = 0.15


class SandboxProvider:
    def __init__(
        self, channel: Channel, config: SandboxConfig, *, http: httpx2.AsyncClient | None = None
    ) -> None:
        self.name = config.name
        self.channel = channel
        self._config = config
        # Its own small pool, as a provider calls back from its own servers: on the shared
        # pool the receipts competed with sends for connections, and every request scans
        # the shared pool's idle connections (httpcore), which cost more the larger it is.
        self._http = http or httpx2.AsyncClient(
            timeout=5.0,
            limits=httpx2.Limits(
                max_connections=RECEIPTS_IN_FLIGHT, max_keepalive_connections=RECEIPTS_IN_FLIGHT
            ),
        )
        self._owns_http = http is None
        self._receipts: set[asyncio.Task[None]] = set()
        self._delays: set[asyncio.Future[None]] = set()  # receipts waiting out their delay
        self._owed = 0  # receipts neither posted nor given up
        self._outbox: list[dict[str, str]] = []
        self._posters = 0
        # Sends per attempt id, as a real provider would count submissions (tests read it).
        self.submissions: Counter[str] = Counter()
        self.cancelled: set[str] = set()

    def address(self, to: Recipient) -> str | None:
        match self.channel:
            case Channel.PUSH:
                return to.push_token
            case Channel.SMS:
                return to.phone
            case Channel.EMAIL:
                return to.email
            case Channel.MESSENGER:
                return to.whatsapp or to.telegram_chat_id or to.viber_id

    async def send(self, message: OutboundMessage) -> SendResult:
        outcome = outcome_for(message.address)
        self.submissions[message.attempt_id] += 1
        if outcome is Outcome.REJECT:
            return Rejected(_code("rejected"), f"{message.address} is a rejecting test address")
        if outcome is Outcome.FLAKY and message.try_number < FLAKY_FAILURES:
            # Not the provider's fault: a flaky test address must not open the sandbox circuit.
            raise TransientProviderError(
                _code("unavailable"), "flaky test address", retry_after=0, provider_fault=False
            )
        provider_message_id = f"sbx_{message.attempt_id}"
        receipt = {Outcome.FAIL: ReceiptStatus.FAILED, Outcome.SILENT: None}.get(
            outcome, ReceiptStatus.DELIVERED
        )
        if receipt is not None:
            self._owed += 1
            self._spawn(self._send_receipt(message, provider_message_id, receipt))
        return Accepted(provider_message_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._receipts.add(task)
        task.add_done_callback(self._receipt_done)

    def _receipt_done(self, task: asyncio.Task[None]) -> None:
        self._receipts.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("sandbox_receipt_crashed", exc_info=error)

    async def _delay(self) -> None:
        """A receipt's delay, which a close that cannot wait for it cuts short."""
        loop = asyncio.get_running_loop()
        due: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self._config.delay_seconds, _come_due, due)
        self._delays.add(due)
        try:
            await due
        finally:
            timer.cancel()
            self._delays.discard(due)

    async def _send_receipt(
        self, message: OutboundMessage, provider_message_id: str, status: ReceiptStatus
    ) -> None:
        await self._delay()
        payload: dict[str, str] = {
            "event_id": f"{provider_message_id}:{status.value}",
            "attempt_id": message.attempt_id,
            "provider_message_id": provider_message_id,
            "status": status.value,
        }
        if status is ReceiptStatus.FAILED:
            payload["error_code"] = "undeliverable"
            payload["error_detail"] = "the sandbox address reports failure"
        self._outbox.append(payload)
        if self._posters >= RECEIPTS_IN_FLIGHT:
            return  # a poster already running takes it with its next batch
        self._posters += 1
        try:
            while self._outbox:
                batch = self._outbox[:RECEIPTS_PER_POST]
                del self._outbox[:RECEIPTS_PER_POST]
                await self._post_receipts(batch)
                self._owed -= len(batch)  # taken, or given up (logged)
        finally:
            self._posters -= 1

    async def _post_receipts(self, batch: list[dict[str, str]]) -> None:
        """Like a real provider's callbacks: a bounded number of posts in flight, receipts
        that pile up meanwhile go together in the next one (as WhatsApp batches statuses),
        and a post the service did not take (connection error, 5xx, 429) is sent again with
        backoff. One post per receipt, unbounded, queued thousands of requests on the HTTP
        pool in a burst, whose wait counts against the timeout: receipts were dropped."""
        body = orjson.dumps(batch[0] if len(batch) == 1 else {"receipts": batch})
        for retry_in in (*RECEIPT_RETRY_DELAYS, None):
            try:
                signature = sign(self._config.secret.get_secret_value(), body, int(time.time()))
                response = await self._http.post(
                    self._config.callback_url,
                    content=body,
                    headers={"content-type": "application/json", SIGNATURE_HEADER: signature},
                )
                if response.status_code < 500 and response.status_code != 429:
                    return
                error = f"HTTP {response.status_code}"
            except httpx2.HTTPError as exc:
                error = repr(exc)
            if retry_in is None:
                # Like a real provider whose DLR never arrives: the step times out.
                log.warning("sandbox_receipt_failed", error=error, receipts=len(batch))
                return
            await asyncio.sleep(retry_in)

    async def parse_status(self, callback: ProviderCallback) -> list[StatusUpdate]:
        self._verify(callback)
        try:
            data = orjson.loads(callback.body)
            reports = data.get("receipts", [data])
            return [_status_update(report) for report in reports]
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise MalformedCallback(f"not a sandbox status report: {exc}") from exc

    async def parse_inbound(self, callback: ProviderCallback) -> list[InboundMessage]:
        self._verify(callback)
        try:
            data = orjson.loads(callback.body)
            return [
                InboundMessage(
                    channel=Channel(data.get("channel", self.channel.value)),
                    sender=str(data["from"]),
                    text=str(data["text"]),
                    event_id=str(data["event_id"]),
                    sent_at=_aware_time(data["sent_at"]) if "sent_at" in data else None,
                    to=str(data["to"]) if data.get("to") is not None else None,
                )
            ]
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, OverflowError) as exc:
            raise MalformedCallback(f"not a sandbox inbound message: {exc}") from exc

    async def cancel(self, provider_message_id: str) -> bool:
        self.cancelled.add(provider_message_id)
        return True

    def _verify(self, callback: ProviderCallback) -> None:
        header = {k.lower(): v for k, v in callback.headers.items()}.get(SIGNATURE_HEADER, "")
        parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
        try:
            timestamp = int(parts["t"])
        except (KeyError, ValueError):
            raise InvalidSignature("missing or malformed X-Sandbox-Signature") from None
        if abs(time.time() - timestamp) > SIGNATURE_TOLERANCE_SECONDS:
            raise InvalidSignature("signature timestamp outside the tolerance")
        expected = sign(self._config.secret.get_secret_value(), callback.body, timestamp)
        if not hmac.compare_digest(expected, header):
            raise InvalidSignature("signature does not match")

    async def aclose(self) -> None:
        """Post the receipts owed, then close the client (never under a post in flight):
        they are given `CLOSE_PATIENCE_SECONDS` to come due, then those still waiting are
        posted at once, early rather than lost, as long again; any left then are dropped."""
        if self._receipts:
            await asyncio.wait(set(self._receipts), timeout=CLOSE_PATIENCE_SECONDS)
        if self._delays:
            log.info("sandbox_receipts_hurried", receipts=len(self._delays))
            for due in self._delays:
                _come_due(due)
        if self._receipts:
            await asyncio.wait(set(self._receipts), timeout=CLOSE_PATIENCE_SECONDS)
        left = set(self._receipts)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        if self._owed:
            log.warning("sandbox_receipts_dropped", receipts=self._owed)
        if self._owns_http:
            await self._http.aclose()


def _come_due(due: asyncio.Future[None]) -> None:
    if not due.done():
        due.set_result(None)
