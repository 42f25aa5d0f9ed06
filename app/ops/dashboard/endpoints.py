"""The ops dashboard: one server-rendered page whose script reads the JSON API.

The page itself holds no data. The script asks for an API key (kept in sessionStorage, so
it is gone with the tab) and calls `/v1/stats`, `/v1/messages` with it, like any client.
A strict Content-Security-Policy allows only our own script, so data rendered as text can
never run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from providers.base import Category, Channel

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request) -> HTMLResponse:
    response = templates.TemplateResponse(
        request,
        "dashboard.html",
        {"categories": [c.value for c in Category], "channels": [c.value for c in Channel]},
    )
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def install_dashboard(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")
