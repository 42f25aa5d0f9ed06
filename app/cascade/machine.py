"""The cascade state machine: pure decisions, no I/O.

Given where a message and one of its attempts stand, and a signal about that attempt,
`decide` says what the attempt and the message become and whether the next step starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class MessageStatus(StrEnum):
    ACCEPTED = "accepted"
    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SUPPRESSED = "suppressed"


class AttemptStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"  # skipped: the address is on the tenant's suppression list
    SKIPPED = "skipped"  # not sent: the address is known unreachable (`skip_unreachable`)


class SuccessOn(StrEnum):
    ACCEPTED = "accepted"
    DELIVERED = "delivered"
    READ = "read"


class Signal(StrEnum):
    ACCEPTED = "accepted"  # the provider took the send
    REJECTED = "rejected"  # the provider refused it for good
    SENT = "sent"  # receipt: handed on by the provider
    DELIVERED = "delivered"  # receipt: on the device / in the mailbox
    READ = "read"
    FAILED = "failed"  # receipt: failed / undelivered / bounced
    TIMEOUT = "timeout"  # no success before the step's deadline
    RETRIES_EXHAUSTED = "retries_exhausted"  # transient errors until the window closed
    SUPPRESSED = "suppressed"  # the step's address is suppressed: skip it, never send
    SKIPPED = "skipped"  # the step's address is known unreachable: skip it, never send


FINAL_MESSAGE = frozenset(
    {
        MessageStatus.DELIVERED,
        MessageStatus.FAILED,
        MessageStatus.EXPIRED,
        MessageStatus.CANCELLED,
        MessageStatus.SUPPRESSED,
    }
)
UNSUCCESSFUL_ATTEMPT = frozenset(
    {
        AttemptStatus.FAILED,
        AttemptStatus.REJECTED,
        AttemptStatus.EXPIRED,
        AttemptStatus.SUPPRESSED,
        AttemptStatus.SKIPPED,
    }
)
# Attempts never handed to a provider.
NOT_SENT = frozenset({AttemptStatus.SUPPRESSED, AttemptStatus.SKIPPED})
OPEN_ATTEMPT = frozenset({AttemptStatus.PENDING, AttemptStatus.SENDING, AttemptStatus.SENT})

_PROGRESS = {
    AttemptStatus.PENDING: 0,
    AttemptStatus.SENDING: 1,
    AttemptStatus.SENT: 2,
    AttemptStatus.DELIVERED: 3,
    AttemptStatus.READ: 4,
}
_SUCCESS_THRESHOLD = {SuccessOn.ACCEPTED: 2, SuccessOn.DELIVERED: 3, SuccessOn.READ: 4}
_POSITIVE = {
    Signal.ACCEPTED: AttemptStatus.SENT,
    Signal.SENT: AttemptStatus.SENT,
    Signal.DELIVERED: AttemptStatus.DELIVERED,
    Signal.READ: AttemptStatus.READ,
}
_NEGATIVE = {
    Signal.REJECTED: AttemptStatus.REJECTED,
    Signal.FAILED: AttemptStatus.FAILED,
    Signal.TIMEOUT: AttemptStatus.EXPIRED,
    Signal.RETRIES_EXHAUSTED: AttemptStatus.FAILED,
    Signal.SUPPRESSED: AttemptStatus.SUPPRESSED,
    Signal.SKIPPED: AttemptStatus.SKIPPED,
}
_NOT_SENDING = {Signal.SUPPRESSED, Signal.SKIPPED}


@dataclass(frozen=True, slots=True)
class StepView:
    message_status: MessageStatus
    current_step: int
    step_count: int
    step: int
    attempt_status: AttemptStatus
    success_on: SuccessOn
    # Whether an earlier step reached a provider (was not suppressed or skipped): a
    # cascade whose steps were all suppressed ends `suppressed`, not `failed`.
    reached_before: bool = True
    # Whether the step's provider can still report a failure after accepting (an SMTP
    # bounce, an SMS DLR). A step that succeeds on acceptance then holds the message in
    # `sending` until its window closes, so a failure inside the window falls over; where
    # nothing can come later (Telegram), acceptance delivers at once.
    reports_failures: bool = True
    # The step the message was delivered on, if it was.
    delivered_step: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    attempt_status: AttemptStatus
    message_status: MessageStatus
    delivered_step: int | None = None
    next_step: int | None = None
    # The step succeeded though the message was already delivered on another one (a late
    # receipt after the next step was sent): the customer got it twice.
    duplicate_delivery: bool = False

    def changes(self, view: StepView) -> bool:
        return (
            self.attempt_status != view.attempt_status
            or self.message_status != view.message_status
            or self.next_step is not None
        )


def is_success(status: AttemptStatus, success_on: SuccessOn) -> bool:
    return _PROGRESS.get(status, -1) >= _SUCCESS_THRESHOLD[success_on]


def next_attempt_status(current: AttemptStatus, signal: Signal) -> AttemptStatus:
    """Attempt statuses only move forward; a failure never overwrites a delivery."""
    if current in NOT_SENT:
        return current  # never sent: nothing can be reported about it
    if signal in _NOT_SENDING:
        # Only a step not yet handed to a provider can be skipped.
        return _NEGATIVE[signal] if current is AttemptStatus.PENDING else current
    if signal in _POSITIVE:
        target = _POSITIVE[signal]
        if current in UNSUCCESSFUL_ATTEMPT:
            # A late receipt after the step was given up: only real deliveries count.
            return target if signal in (Signal.DELIVERED, Signal.READ) else current
        return target if _PROGRESS[target] > _PROGRESS[current] else current
    if current in OPEN_ATTEMPT:
        return _NEGATIVE[signal]
    return current


def awaits_window(status: AttemptStatus, success_on: SuccessOn, reports_failures: bool) -> bool:
    """Accepted where acceptance is success, but a failure may still be reported: the
    message waits out the step's window unless a receipt confirms delivery first."""
    return status is AttemptStatus.SENT and success_on is SuccessOn.ACCEPTED and reports_failures


def _awaits_window(status: AttemptStatus, view: StepView) -> bool:
    return awaits_window(status, view.success_on, view.reports_failures)


def _confirmed(status: AttemptStatus, view: StepView) -> bool:
    return is_success(status, view.success_on) and not _awaits_window(status, view)


def decide(view: StepView, signal: Signal) -> Decision:
    attempt = next_attempt_status(view.attempt_status, signal)
    message = view.message_status
    if signal is Signal.TIMEOUT and _awaits_window(view.attempt_status, view):
        # Accepted, and the window closed without a failure report: a success.
        attempt = view.attempt_status
        if message in FINAL_MESSAGE:
            return Decision(attempt, message)
        return Decision(attempt, MessageStatus.DELIVERED, delivered_step=view.step)
    if (
        signal is Signal.TIMEOUT
        and view.attempt_status is AttemptStatus.DELIVERED
        and not is_success(view.attempt_status, view.success_on)
    ):
        # Delivered but the step wanted `read`: the window closed without it.
        attempt = AttemptStatus.EXPIRED

    newly_confirmed = _confirmed(attempt, view) and not _confirmed(view.attempt_status, view)
    if newly_confirmed:
        # Cancelled, suppressed and expired are the customer's or policy's word: a late
        # receipt is recorded on the attempt but does not revive the message (a failure
        # can be: the stats then move it, see `observe_outcome`).
        if message is MessageStatus.DELIVERED:
            return Decision(attempt, message, duplicate_delivery=view.delivered_step != view.step)
        if message not in (
            MessageStatus.CANCELLED,
            MessageStatus.SUPPRESSED,
            MessageStatus.EXPIRED,
        ):
            return Decision(attempt, MessageStatus.DELIVERED, delivered_step=view.step)

    # A failure on the current step of an unfinished message falls over, even after the
    # step's acceptance (an email bounce inside its window). After the message ended (a
    # bounce after the window) it is recorded on the attempt only.
    newly_unsuccessful = (
        attempt in UNSUCCESSFUL_ATTEMPT
        and view.attempt_status not in UNSUCCESSFUL_ATTEMPT
        and not _confirmed(view.attempt_status, view)
    )
    if newly_unsuccessful and view.step == view.current_step and message not in FINAL_MESSAGE:
        if view.step + 1 < view.step_count:
            return Decision(attempt, MessageStatus.SENDING, next_step=view.step + 1)
        if attempt is AttemptStatus.SUPPRESSED and not view.reached_before:
            return Decision(attempt, MessageStatus.SUPPRESSED)
        return Decision(attempt, MessageStatus.FAILED)
    return Decision(attempt, message)


class Stop(StrEnum):
    """Ending a message from outside its cascade: the customer, its deadline, a policy."""

    CANCEL = "cancelled"
    EXPIRE = "expired"
    SUPPRESS = "suppressed"


@dataclass(frozen=True, slots=True)
class StopDecision:
    message_status: MessageStatus
    # The current attempt's new status; None leaves it as it is.
    attempt_status: AttemptStatus | None = None


def stop_message(
    message: MessageStatus, attempt: AttemptStatus | None, stop: Stop
) -> StopDecision | None:
    """Cancel, expire or suppress an unfinished message; None when it has already ended.

    An expired message's open attempt expires with it. A cancelled one keeps its attempt
    as it is: a receipt may still arrive and is recorded, but never revives the message.
    """
    if message in FINAL_MESSAGE:
        return None
    if stop is Stop.EXPIRE and attempt in OPEN_ATTEMPT:
        return StopDecision(MessageStatus.EXPIRED, AttemptStatus.EXPIRED)
    return StopDecision(MessageStatus(stop.value))


def retry_delay(
    tries: int, retry_after: float | None, base: float, cap: float, jitter: float
) -> float:
    """Exponential backoff for transient provider errors; the provider's Retry-After wins.

    `jitter` in [0, 1) is supplied by the caller so the function stays deterministic.
    """
    if retry_after is not None:
        return max(0.0, retry_after)
    backoff: float = base * 2.0 ** max(0, tries - 1)
    return min(cap, backoff) * (0.5 + jitter / 2)


class Due(StrEnum):
    """What the delivery engine does with a message whose `due_at` has come."""

    SEND = "send"  # the current step is not yet with a provider (first try or a retry)
    TIMEOUT = "timeout"  # the current step's window closed without success
    EXPIRE = "expire"  # the message's own `expires_at` came first
    RETIME = "retime"  # nothing is due yet (woken early): look again at `next_due`
    FORGET = "forget"  # already final: it leaves the engine's index


def due_action(
    message_status: MessageStatus,
    attempt_status: AttemptStatus | None,
    *,
    deadline_passed: bool,
    expired: bool,
    held: bool,
    in_window: bool = False,
) -> Due:
    """The decision for a due message. `attempt_status`: the current step's attempt (None
    before its first try); `deadline_passed`: that attempt's window has closed; `expired`:
    the message's `expires_at` has come; `held`: its `not_before` is still ahead;
    `in_window`: the attempt was accepted where that is success, and only waits out its
    window for a failure report (an email's bounce)."""
    if message_status in FINAL_MESSAGE:
        return Due.FORGET
    if expired:
        # Sent in time: its window closes now, and it is a success, not an expiry.
        return Due.TIMEOUT if in_window else Due.EXPIRE
    if attempt_status is None or (attempt_status is AttemptStatus.PENDING and not deadline_passed):
        return Due.RETIME if held else Due.SEND
    if deadline_passed:
        return Due.TIMEOUT
    return Due.RETIME
