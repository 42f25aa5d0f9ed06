"""How a transport failure is classified for every HTTP adapter (`providers.http`)."""

from __future__ import annotations

import httpx2
import pytest

from providers.http import transport_error

REQUEST = httpx2.Request("POST", "https://provider.example/send")


@pytest.mark.parametrize(
    ("error", "code", "maybe_sent"),
    [
        (httpx2.ConnectError("refused", request=REQUEST), "p:transport", False),
        (httpx2.ConnectTimeout("slow dns", request=REQUEST), "p:timeout", False),
        (httpx2.PoolTimeout("no connection", request=REQUEST), "p:timeout", False),
        (httpx2.WriteTimeout("half written", request=REQUEST), "p:timeout", False),
        (httpx2.ReadTimeout("no answer", request=REQUEST), "p:timeout", True),
        (httpx2.ReadError("reset", request=REQUEST), "p:transport", True),
        (httpx2.RemoteProtocolError("disconnected", request=REQUEST), "p:transport", True),
    ],
)
def test_only_failures_after_the_request_went_out_may_have_sent_it(
    error: httpx2.TransportError, code: str, maybe_sent: bool
) -> None:
    transient = transport_error("p", error)

    assert (transient.code, transient.maybe_sent) == (code, maybe_sent)
    assert type(error).__name__ in transient.detail
    assert not transport_error("p", error, idempotent=True).maybe_sent
