"""The API's HTML pages (/docs, /redoc, the dashboard) load nothing from another host: every
script, style sheet and image they name is served by the API itself."""

from __future__ import annotations

import re
from urllib.parse import urljoin

import httpx
import pytest

from tests.conftest import Service

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)""")
# Swagger UI's bundle is set up inline by the page: the URLs it loads are string arguments.
INLINE_URL = re.compile(r"""(?:url|Url):\s*['"]([^'"]+)['"]""")


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/dashboard"])
async def test_html_pages_load_only_assets_the_api_serves(service: Service, page: str) -> None:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        html = (await client.get(page)).raise_for_status().text
        assets = [a or b for a, b in ASSET.findall(html)] + INLINE_URL.findall(html)
        assert assets, html
        for asset in assets:
            if asset.startswith("data:"):
                continue
            absolute = re.match(r"^(https?:)?//", asset)
            assert not absolute or asset.startswith(service.base_url), f"{page} loads {asset}"
            answer = await client.get(urljoin(f"{service.base_url}{page}", asset))
            assert answer.status_code == 200, (page, asset)
            assert answer.content, (page, asset)
