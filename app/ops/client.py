"""The CLI's view of the HTTP API: where it is, which key, and problems as one error type."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# Where `cascade dev` keeps the dev tenant's key.
DEV_KEY_FILE = Path(".cascade") / "dev-api-key"


class ApiError(Exception):
    """The API answered with a problem, or could not be reached."""

    def __init__(
        self, message: str, status: int | None = None, errors: list[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors or []


def resolve_key(given: str | None) -> str:
    """`--key`, else CASCADE_API_KEY, else the key `cascade dev` wrote."""
    key = given or os.environ.get("CASCADE_API_KEY")
    if key:
        return key
    if DEV_KEY_FILE.exists():
        return DEV_KEY_FILE.read_text().strip()
    raise ApiError(
        "no API key: pass --key, set CASCADE_API_KEY, or run `cascade dev` in this directory"
    )


def resolve_url(given: str | None) -> str:
    return (given or os.environ.get("CASCADE_URL") or DEFAULT_URL).rstrip("/")


def _problem(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        return ApiError(f"HTTP {response.status_code}: {response.text[:200]}", response.status_code)
    if not isinstance(body, dict):
        return ApiError(f"HTTP {response.status_code}", response.status_code)
    title = body.get("title") or f"HTTP {response.status_code}"
    detail = body.get("detail")
    return ApiError(
        f"{title}: {detail}" if detail and detail != title else str(title),
        response.status_code,
        body.get("errors") or [],
    )


class ApiClient:
    def __init__(self, url: str | None, key: str | None, timeout: float = 30.0) -> None:
        self.url = resolve_url(url)
        self.key = resolve_key(key)
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.key}", "User-Agent": "cascade-cli"},
            timeout=timeout,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        try:
            response = self.http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise _problem(response)
        return response.json() if response.content else None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
