"""The cascade's decisions, exhaustively, with no I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.cascade.machine import (
    FINAL_MESSAGE,
    OPEN_ATTEMPT,
    UNSUCCESSFUL_ATTEMPT,
    AttemptStatus,
    Decision,
    Due,
    MessageStatus,
    Signal,
    StepView,
    Stop,
    StopDecision,
    SuccessOn,
    awaits_window,
    decide,
    due_action,
    is_success,
    retry_delay,
    stop_message,
)


def view(
    attempt: AttemptStatus = AttemptStatus.SENT,
    *,
    message: MessageStatus = MessageStatus.SENDING,
    step: int = 0,
    current: int = 0,
    steps: int = 3,
    success_on: SuccessOn = SuccessOn.DELIVERED,
) -> StepView:
    return StepView(message, current, steps, step, attempt, success_on)


def test_delivery_receipt_delivers_the_message() -> None:
    assert decide(view(), Signal.DELIVERED) == Decision(
        AttemptStatus.DELIVERED, MessageStatus.DELIVERED, delivered_step=0
    )


def test_acceptance_is_success_at_once_where_nothing_can_be_reported_after_it() -> None:
    state = replace(
        view(AttemptStatus.SENDING, success_on=SuccessOn.ACCEPTED), reports_failures=False
    )
    assert decide(state, Signal.ACCEPTED) == Decision(
        AttemptStatus.SENT, MessageStatus.DELIVERED, delivered_step=0
    )


def test_acceptance_as_success_waits_out_the_window_for_a_failure_report() -> None:
    accepted = view(AttemptStatus.SENDING, success_on=SuccessOn.ACCEPTED)
    assert decide(accepted, Signal.ACCEPTED) == Decision(AttemptStatus.SENT, MessageStatus.SENDING)

    in_window = view(AttemptStatus.SENT, success_on=SuccessOn.ACCEPTED)
    # The window closes without a bounce: delivered on that step; the attempt stays `sent`
    # (nothing confirmed more than acceptance).
    assert decide(in_window, Signal.TIMEOUT) == Decision(
        AttemptStatus.SENT, MessageStatus.DELIVERED, delivered_step=0
    )
    # A bounce inside the window falls over like an SMS DLR does.
    assert decide(in_window, Signal.FAILED) == Decision(
        AttemptStatus.FAILED, MessageStatus.SENDING, next_step=1
    )
    last = view(AttemptStatus.SENT, success_on=SuccessOn.ACCEPTED, step=2, current=2)
    assert decide(last, Signal.FAILED) == Decision(AttemptStatus.FAILED, MessageStatus.FAILED)
    # A delivery receipt inside the window settles it at once.
    assert decide(in_window, Signal.DELIVERED) == Decision(
        AttemptStatus.DELIVERED, MessageStatus.DELIVERED, delivered_step=0
    )


def test_a_bounce_after_the_window_is_recorded_on_the_attempt_only() -> None:
    state = replace(
        view(AttemptStatus.SENT, success_on=SuccessOn.ACCEPTED, message=MessageStatus.DELIVERED),
        delivered_step=0,
    )
    assert decide(state, Signal.FAILED) == Decision(AttemptStatus.FAILED, MessageStatus.DELIVERED)
    # ... and a delivery receipt after it is no second delivery: it is the same step.
    assert decide(state, Signal.DELIVERED) == Decision(
        AttemptStatus.DELIVERED, MessageStatus.DELIVERED
    )


def test_a_second_step_delivered_after_the_first_is_a_duplicate_delivery() -> None:
    # Step 0 failed, step 1 was sent, then step 0's late delivery delivered the message.
    state = replace(
        view(AttemptStatus.SENT, message=MessageStatus.DELIVERED, step=1, current=1),
        delivered_step=0,
    )
    assert decide(state, Signal.DELIVERED) == Decision(
        AttemptStatus.DELIVERED, MessageStatus.DELIVERED, duplicate_delivery=True
    )


def test_a_late_delivery_of_a_failed_step_delivers_the_message_on_it() -> None:
    # Failed, fell over, the fallback still out: the late receipt wins, the message is
    # delivered on step 0 (the engine never sends a pending fallback of a final message).
    state = view(AttemptStatus.FAILED, step=0, current=1)
    assert decide(state, Signal.DELIVERED) == Decision(
        AttemptStatus.DELIVERED, MessageStatus.DELIVERED, delivered_step=0
    )


def test_acceptance_alone_waits_for_a_receipt() -> None:
    decision = decide(view(AttemptStatus.SENDING), Signal.ACCEPTED)
    assert decision == Decision(AttemptStatus.SENT, MessageStatus.SENDING)


@pytest.mark.parametrize(
    ("signal", "attempt"),
    [
        (Signal.REJECTED, AttemptStatus.REJECTED),
        (Signal.FAILED, AttemptStatus.FAILED),
        (Signal.TIMEOUT, AttemptStatus.EXPIRED),
        (Signal.RETRIES_EXHAUSTED, AttemptStatus.FAILED),
    ],
)
def test_each_failover_trigger_starts_the_next_step(signal: Signal, attempt: AttemptStatus) -> None:
    assert decide(view(), signal) == Decision(attempt, MessageStatus.SENDING, next_step=1)


def test_failure_on_the_last_step_fails_the_message() -> None:
    decision = decide(view(step=2, current=2), Signal.FAILED)
    assert decision == Decision(AttemptStatus.FAILED, MessageStatus.FAILED)


def test_failure_after_delivery_changes_nothing() -> None:
    state = view(AttemptStatus.DELIVERED, message=MessageStatus.DELIVERED)
    assert not decide(state, Signal.FAILED).changes(state)


def test_late_delivery_of_an_earlier_step_delivers_without_resending() -> None:
    state = view(AttemptStatus.EXPIRED, step=0, current=1)
    decision = decide(state, Signal.DELIVERED)
    assert decision == Decision(AttemptStatus.DELIVERED, MessageStatus.DELIVERED, delivered_step=0)
    assert decision.next_step is None


def test_failure_of_an_earlier_step_does_not_fall_over_again() -> None:
    state = view(AttemptStatus.SENT, step=0, current=1)
    decision = decide(state, Signal.FAILED)
    assert decision.next_step is None
    assert decision.message_status is MessageStatus.SENDING


def test_read_after_delivery_is_recorded_on_the_attempt_only() -> None:
    state = view(AttemptStatus.DELIVERED, message=MessageStatus.DELIVERED)
    assert decide(state, Signal.READ) == Decision(AttemptStatus.READ, MessageStatus.DELIVERED)


def test_delivered_but_unread_times_out_when_read_was_required() -> None:
    state = view(AttemptStatus.DELIVERED, success_on=SuccessOn.READ)
    assert decide(state, Signal.TIMEOUT).next_step == 1


def test_retry_delay_backs_off_and_honours_retry_after() -> None:
    assert retry_delay(1, None, 1.0, 30.0, 1.0) == 1.0
    assert retry_delay(3, None, 1.0, 30.0, 1.0) == 4.0
    assert retry_delay(20, None, 1.0, 30.0, 1.0) == 30.0
    assert retry_delay(1, None, 1.0, 30.0, 0.0) == 0.5
    assert retry_delay(5, 7.0, 1.0, 30.0, 0.3) == 7.0


attempts = st.sampled_from(list(AttemptStatus))
messages = st.sampled_from(list(MessageStatus))
signals = st.sampled_from(list(Signal))
success_rules = st.sampled_from(list(SuccessOn))


@given(
    attempts,
    messages,
    signals,
    success_rules,
    st.integers(0, 3),
    st.integers(0, 3),
    st.booleans(),
    st.none() | st.integers(0, 3),
)
def test_invariants(
    attempt: AttemptStatus,
    message: MessageStatus,
    signal: Signal,
    success_on: SuccessOn,
    step: int,
    current: int,
    reports_failures: bool,
    delivered_step: int | None,
) -> None:
    state = StepView(
        message,
        current,
        4,
        step,
        attempt,
        success_on,
        reports_failures=reports_failures,
        delivered_step=delivered_step if message is MessageStatus.DELIVERED else None,
    )
    decision = decide(state, signal)

    # A delivered message stays delivered.
    if message is MessageStatus.DELIVERED:
        assert decision.message_status is MessageStatus.DELIVERED
    # Only the current step of an unfinished message can start the next step.
    if decision.next_step is not None:
        assert step == current and message not in FINAL_MESSAGE
        assert decision.next_step == step + 1 < 4
        assert decision.attempt_status in UNSUCCESSFUL_ATTEMPT
    # A successful attempt never falls over, whatever arrives after it, unless it only
    # waits out its window for a failure report.
    if is_success(attempt, success_on) and not awaits_window(attempt, success_on, reports_failures):
        assert decision.next_step is None
    # A duplicate delivery is only ever of a delivered message, on another step.
    if decision.duplicate_delivery:
        assert message is MessageStatus.DELIVERED and step != state.delivered_step
        assert decision.message_status is MessageStatus.DELIVERED
    # Cancelled and suppressed messages are never revived.
    if message in (MessageStatus.CANCELLED, MessageStatus.SUPPRESSED):
        assert decision.message_status is message


# Suppressed steps, and messages stopped from outside their cascade (issue 5).


def test_a_suppressed_step_is_skipped_and_the_cascade_moves_on() -> None:
    decision = decide(view(AttemptStatus.PENDING), Signal.SUPPRESSED)
    assert decision == Decision(AttemptStatus.SUPPRESSED, MessageStatus.SENDING, next_step=1)


def test_a_message_whose_every_step_was_suppressed_ends_suppressed() -> None:
    state = replace(view(AttemptStatus.PENDING, step=2, current=2), reached_before=False)
    assert decide(state, Signal.SUPPRESSED) == Decision(
        AttemptStatus.SUPPRESSED, MessageStatus.SUPPRESSED
    )


def test_a_suppressed_last_step_after_a_real_failure_fails_the_message() -> None:
    state = replace(view(AttemptStatus.PENDING, step=2, current=2), reached_before=True)
    assert decide(state, Signal.SUPPRESSED).message_status is MessageStatus.FAILED


def test_only_a_step_not_yet_sent_can_be_suppressed() -> None:
    state = view(AttemptStatus.SENT)
    assert not decide(state, Signal.SUPPRESSED).changes(state)


@pytest.mark.parametrize(
    ("stop", "attempt", "expected"),
    [
        (Stop.CANCEL, AttemptStatus.SENT, StopDecision(MessageStatus.CANCELLED)),
        (Stop.CANCEL, None, StopDecision(MessageStatus.CANCELLED)),
        (
            Stop.EXPIRE,
            AttemptStatus.SENT,
            StopDecision(MessageStatus.EXPIRED, AttemptStatus.EXPIRED),
        ),
        (Stop.EXPIRE, AttemptStatus.FAILED, StopDecision(MessageStatus.EXPIRED)),
        (Stop.SUPPRESS, None, StopDecision(MessageStatus.SUPPRESSED)),
    ],
)
def test_stopping_an_unfinished_message(
    stop: Stop, attempt: AttemptStatus | None, expected: StopDecision
) -> None:
    assert stop_message(MessageStatus.SENDING, attempt, stop) == expected


stops = st.sampled_from(list(Stop))


@given(messages, st.none() | attempts, stops)
def test_stop_invariants(message: MessageStatus, attempt: AttemptStatus | None, stop: Stop) -> None:
    decision = stop_message(message, attempt, stop)
    # A message that has ended (delivered above all) is never stopped after the fact.
    if message in FINAL_MESSAGE:
        assert decision is None
        return
    assert decision is not None
    assert decision.message_status in FINAL_MESSAGE
    assert decision.message_status.value == stop.value
    # Only an open attempt changes, and only to `expired`.
    if decision.attempt_status is not None:
        assert attempt in OPEN_ATTEMPT
        assert decision.attempt_status is AttemptStatus.EXPIRED


@given(attempts, messages, signals, success_rules, st.integers(0, 3), st.integers(0, 3))
def test_suppression_invariants(
    attempt: AttemptStatus,
    message: MessageStatus,
    signal: Signal,
    success_on: SuccessOn,
    step: int,
    current: int,
) -> None:
    for reached_before in (False, True):
        state = StepView(message, current, 4, step, attempt, success_on, reached_before)
        decision = decide(state, signal)
        # Nothing revives a suppressed attempt: it was never sent.
        if attempt is AttemptStatus.SUPPRESSED:
            assert decision.attempt_status is AttemptStatus.SUPPRESSED
            assert decision.delivered_step is None
        # Suppression only ever skips a pending step.
        if decision.attempt_status is AttemptStatus.SUPPRESSED:
            assert attempt in (AttemptStatus.PENDING, AttemptStatus.SUPPRESSED)
        # Stopped messages stay stopped, whatever arrives about their attempts.
        if message in (MessageStatus.CANCELLED, MessageStatus.SUPPRESSED, MessageStatus.EXPIRED):
            assert decision.message_status is message
            assert decision.next_step is None
        # A message ends suppressed only when no step of it ever reached a provider.
        if decision.message_status is MessageStatus.SUPPRESSED and message is not (
            MessageStatus.SUPPRESSED
        ):
            assert not reached_before
            assert decision.attempt_status is AttemptStatus.SUPPRESSED


def test_a_step_in_its_window_when_the_message_expires_ends_delivered_not_expired() -> None:
    def action(in_window: bool) -> Due:
        return due_action(
            MessageStatus.SENDING,
            AttemptStatus.SENT,
            deadline_passed=False,
            expired=True,
            held=False,
            in_window=in_window,
        )

    assert action(in_window=True) is Due.TIMEOUT
    assert action(in_window=False) is Due.EXPIRE
