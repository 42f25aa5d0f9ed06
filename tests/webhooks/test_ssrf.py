"""Webhook URLs cannot reach our own network: refused at registration and at connect time."""

from __future__ import annotations

import ipaddress

import pytest

from app.runtime import utcnow
from app.webhooks.sender import post_signed
from app.webhooks.ssrf import UnsafeUrl, address_refusal, check_url, checked_client
from tests.conftest import Service, Tenant
from tests.webhooks.conftest import create_endpoint
from tests.webhooks.receiver import Receiver


@pytest.mark.parametrize(
    "url",
    [
        "https://10.0.0.1/hook",
        "https://172.16.5.4/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[fd00:ec2::254]/latest/",
        "https://[::ffff:10.0.0.1]/hook",
        "https://100.64.0.1/hook",
        "https://224.0.0.1/hook",
        "https://0.0.0.0/hook",
        "https://240.0.0.1/hook",
        "http://93.184.216.34/hook",  # public, but not https
        "ftp://93.184.216.34/hook",
        "https://user:secret@93.184.216.34/hook",
    ],
)
async def test_non_public_or_non_https_urls_are_refused_at_registration(
    service: Service, tenant: Tenant, url: str
) -> None:
    response = await tenant.client.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["path"] == "body.url"


async def test_a_public_https_url_is_accepted_and_changing_it_is_checked_again(
    service: Service, tenant: Tenant
) -> None:
    endpoint = await create_endpoint(tenant.client, "https://93.184.216.34/hook")
    changed = await tenant.client.patch(
        f"/v1/webhooks/{endpoint['id']}", json={"url": "https://10.1.2.3/hook"}
    )
    assert changed.status_code == 422
    assert (await tenant.client.get(f"/v1/webhooks/{endpoint['id']}")).json()["url"] == (
        "https://93.184.216.34/hook"
    )


async def test_loopback_is_allowed_only_in_dev_mode() -> None:
    await check_url("http://127.0.0.1:9/hook", allow_loopback_http=True)
    await check_url("http://localhost:9/hook", allow_loopback_http=True)
    for url in ("http://127.0.0.1:9/hook", "https://127.0.0.1/hook", "https://localhost/hook"):
        with pytest.raises(UnsafeUrl):
            await check_url(url, allow_loopback_http=False)
    with pytest.raises(UnsafeUrl, match="https"):
        # Dev mode allows plain http to loopback, not to anywhere else.
        await check_url("http://93.184.216.34/hook", allow_loopback_http=True)


def test_address_rules() -> None:
    def refused(address: str, allow_loopback: bool = False) -> bool:
        return address_refusal(ipaddress.ip_address(address), allow_loopback) is not None

    assert not refused("93.184.216.34")
    assert not refused("2606:2800:220:1:248:1893:25c8:1946")
    assert refused("127.0.0.1") and not refused("127.0.0.1", allow_loopback=True)
    assert refused("::1") and not refused("::1", allow_loopback=True)
    for address in ("169.254.169.254", "fd00:ec2::254", "fe80::1", "fc00::1", "::", "ff02::1"):
        assert refused(address, allow_loopback=True), address


async def test_a_host_that_turns_internal_after_registration_is_refused_at_connect_time(
    receiver: Receiver,
) -> None:
    # Registered while loopback was allowed; delivered by a client that no longer allows it,
    # as when a public name is rebound to an internal address after the check.
    async with checked_client(allow_loopback=False) as client:
        outcome = await post_signed(
            client, receiver.url(), "evt_x", "{}", ["whsec_" + "A" * 44], utcnow()
        )
    assert outcome.succeeded is False
    assert outcome.error is not None and "loopback" in outcome.error
    assert receiver.received == []


async def test_redirects_are_not_followed(
    service: Service, tenant: Tenant, receiver: Receiver
) -> None:
    receiver.answer = 307
    receiver.answer_headers = {"location": receiver.url("/elsewhere")}
    endpoint = await create_endpoint(tenant.client, receiver.url())

    result = (await tenant.client.post(f"/v1/webhooks/{endpoint['id']}/test")).json()

    assert (result["succeeded"], result["status_code"]) == (False, 307)
    assert [r.path for r in receiver.received] == ["/hook"]
