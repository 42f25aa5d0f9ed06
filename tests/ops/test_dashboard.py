"""The dashboard in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.conftest import Service, Tenant
from tests.helpers import message_body, send, wait_until_final

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no chromium on PATH: scripts/test installs Debian's with apt-get when it runs as"
    " root on Debian; elsewhere install a system Chromium to run the dashboard's browser test",
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield browser
        await browser.close()


async def open_dashboard(browser: Browser, service: Service, key: str) -> tuple[Page, list[str]]:
    page = await browser.new_page(viewport={"width": 1280, "height": 1100})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on(
        "console",
        lambda message: problems.append(message.text) if message.type == "error" else None,
    )
    await page.goto(f"{service.base_url}/dashboard")
    await page.fill("#api-key", key)
    await page.click("#login-form button")
    return page, problems


def png_pixels(png: bytes) -> tuple[int, int, bytes]:
    """Width, height and the inflated scanlines of a PNG (enough to tell blank from not)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, width, height, data = 8, 0, 0, b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        chunk = png[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            data += chunk
        position += 12 + length
    return width, height, zlib.decompress(data)


async def test_dashboard_shows_counters_funnel_failures_and_a_timeline(
    service: Service, tenant: Tenant, browser: Browser, tmp_path: Path
) -> None:
    delivered = await send(tenant.client, message_body(cascade=[{"channel": "push"}]))
    fell_over = await send(
        tenant.client,
        message_body(
            to={"push_token": "device-reject", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
    )
    failed = await send(
        tenant.client,
        message_body(
            category="service", to={"phone": "+48600100201"}, cascade=[{"channel": "sms"}]
        ),
    )
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    cancelled = await send(tenant.client, message_body(cascade=[{"channel": "sms"}], send_at=later))
    assert (await tenant.client.post(f"/v1/messages/{cancelled}/cancel")).status_code == 200
    for message_id in (delivered, fell_over, failed, cancelled):
        await wait_until_final(tenant.client, message_id)

    page, problems = await open_dashboard(browser, service, tenant.key)

    await expect(page.locator("#total-messages")).to_have_text("4")
    await expect(page.locator("#total-delivered")).to_have_text("2")
    await expect(page.locator("#total-failed")).to_have_text("1")  # failed only
    await expect(page.locator("#total-other")).to_have_text("1")  # the cancelled one
    await expect(page.locator("#failover-rate")).to_have_text("50.0 %")
    bars = page.locator("#series-chart g.bucket")
    await expect(bars.first).to_be_attached()
    assert await bars.count() >= 60  # every minute of the hour, empty ones too
    drawn = await bars.evaluate_all(
        "groups => groups.map(g => [+g.dataset.delivered, +g.dataset.failed, +g.dataset.other])"
    )
    assert [sum(column) for column in zip(*drawn, strict=True)] == [2, 1, 1]
    assert await page.locator("#series-chart rect.failed").count() >= 1
    push = page.locator('td.counter[data-category="transactional"][data-channel="push"]')
    await expect(push).to_have_text("1 / 0")
    await expect(
        page.locator('td.counter[data-category="service"][data-channel="sms"]')
    ).to_have_text("0 / 1")
    funnel = page.locator("#funnel .funnel-label")
    await expect(funnel).to_have_count(2)
    await expect(funnel.nth(0)).to_contain_text("Step 0: reached 4, delivered 1")
    await expect(funnel.nth(1)).to_contain_text("Step 1: reached 1, delivered 1")
    # The sandbox's example prices: push 0.0001 EUR, SMS to +48 0.031; rejected sends: 0.
    await expect(page.locator("#spend")).to_have_text("0.0311 EUR")
    await expect(page.locator("#saved")).to_have_text("0.0000 EUR")
    effectiveness = page.locator("#effectiveness .effect-row")
    await expect(effectiveness).to_have_count(3)
    sms = page.locator('.effect-row[data-category="transactional"][data-channel="sms"]')
    await expect(sms).to_contain_text("delivery rate: 50.0 %")  # and the cancelled one
    await expect(sms).to_contain_text("fell over: 100.0 %")
    await expect(sms).to_contain_text("cost per delivered: 0.0310 EUR")
    drawn_width = await sms.locator(".effect-bar span.ok").evaluate("e => e.style.width")
    assert drawn_width == "50%"
    failure = page.locator("#failures tbody tr").first
    await expect(failure).to_contain_text(failed)
    await expect(failure).to_contain_text("sandbox:rejected")

    await page.fill("#lookup-id", fell_over)
    await page.click("#lookup-form button")
    await expect(page.locator("#timeline-summary")).to_contain_text(
        f"{fell_over}: delivered on sms"
    )
    attempts = page.locator("#timeline-attempts tbody tr")
    await expect(attempts).to_have_count(2)
    await expect(attempts.nth(0)).to_contain_text("rejected")
    await expect(attempts.nth(1)).to_contain_text("delivered")
    await expect(page.locator("#timeline-events tbody tr").first).to_contain_text("accepted")

    shot = Path(os.environ.get("CASCADE_SCREENSHOT_DIR", tmp_path)) / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    width, height, pixels = png_pixels(shot.read_bytes())
    assert width == 1280 and height >= 1100
    # A blank page inflates to a handful of byte values; a rendered dashboard to many.
    assert len(set(pixels)) > 64
    assert pixels.count(pixels[1]) < 0.95 * len(pixels)
    assert problems == []


async def test_a_wrong_key_stays_on_the_sign_in_form(service: Service, browser: Browser) -> None:
    page, _ = await open_dashboard(browser, service, "csk_not-a-key")

    await expect(page.locator("#login-error")).to_contain_text("unknown or revoked")
    await expect(page.locator("#board")).to_be_hidden()


async def test_the_page_holds_no_data_and_allows_only_its_own_script(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url) as client:
        page = await client.get("/dashboard")
        script = await client.get("/dashboard/static/dashboard.js")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "<script defer src=" in page.text and "innerHTML" not in script.text
    assert script.status_code == 200
