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


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # Forms the HTTP client cannot parse, or that parsers read differently.
        ("https://01.1.1.1/hook", "IPv4"),
        ("https://0001.0001.0001.0001/hook", "IPv4"),
        ("https://0x5d.184.216.34/hook", "IPv4"),
        ("https://1572395042/hook", "IPv4"),
        ("https://93.184.216.34./hook", "IPv4"),
        ("https://xn--/hook", "host"),
        ("https://exa mple.com/hook", "host"),
        ("https://[::1/hook", "parsed"),
        # IPv6 forms with a private or reserved IPv4 inside.
        ("https://[2002:a9fe:a9fe::]/hook", "169.254.169.254"),
        ("https://[2002:a00:1::]/hook", "10.0.0.1"),
        ("https://[2001:0:a9fe:a9fe::]/hook", "169.254.169.254"),
        ("https://[64:ff9b::a9fe:a9fe]/hook", "169.254.169.254"),
        ("https://[64:ff9b:1::a00:1]/hook", "NAT64"),
        ("https://[::a9fe:a9fe]/hook", "169.254.169.254"),
        ("https://[::ffff:0:a00:1]/hook", "10.0.0.1"),
    ],
)
async def test_hosts_the_client_cannot_parse_or_that_hide_an_internal_ipv4_are_refused(
    service: Service, tenant: Tenant, url: str, says: str
) -> None:
    response = await tenant.client.post("/v1/webhooks", json={"url": url})

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "https://cascade.dev/problems/invalid-request"
    [error] = problem["errors"]
    assert (error["path"], error["type"]) == ("body.url", "unsafe_url")
    assert says in error["message"], error["message"]


def test_ipv6_addresses_embedding_an_ipv4_are_judged_by_the_ipv4_inside() -> None:
    def reason(address: str) -> str | None:
        return address_refusal(ipaddress.ip_address(address), allow_loopback=True)

    for address, inside in (
        ("2002:a9fe:a9fe::", "169.254.169.254"),  # 6to4
        ("2002:7f00:1::", "127.0.0.1"),  # a tunnel to loopback is not loopback
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # Teredo client
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64
        ("::a9fe:a9fe", "169.254.169.254"),  # IPv4-compatible
    ):
        refusal = reason(address)
        assert refusal is not None and inside in refusal, (address, refusal)
    assert "NAT64" in (reason("64:ff9b:1::808:808") or "")
    assert reason("2002:808:808::") is None  # 6to4 of a public address


async def test_a_public_ipv6_host_is_stored_in_its_canonical_form(
    service: Service, tenant: Tenant
) -> None:
    endpoint = await create_endpoint(tenant.client, "https://[2606:4700:0:0:0:0:0:1111]/hook")
    assert endpoint["url"] == "https://[2606:4700::1111]/hook"
