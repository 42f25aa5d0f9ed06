"""CLI commands that talk to the HTTP API: send, status, tail, stats, keys, webhooks.

They need only a URL and a key (`--url`/`--key`, or CASCADE_URL / CASCADE_API_KEY, or the
key `cascade dev` keeps in `.cascade/dev-api-key`), so they work against any deployment.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from app.cascade.machine import FINAL_MESSAGE
from app.ops.client import ApiClient, ApiError

console = Console()
err_console = Console(stderr=True)

FINAL = frozenset(status.value for status in FINAL_MESSAGE)
# `to` fields in the order a cascade is built from them when none is given.
ADDRESS_CHANNELS = (
    ("push_token", "push"),
    ("whatsapp", "messenger"),
    ("telegram_chat_id", "messenger"),
    ("viber_id", "messenger"),
    ("phone", "sms"),
    ("email", "email"),
)
CONTENT_FIELDS = ("text", "subject", "title", "html")
BATCH_LIMIT = 1000

Url = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="CASCADE_URL", help="API base URL (default http://127.0.0.1:8000)."
    ),
]
Key = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="CASCADE_API_KEY",
        help="API key (default: the one in .cascade/dev-api-key).",
        show_envvar=True,
    ),
]

webhooks_cli = typer.Typer(help="Customer webhook endpoints.", no_args_is_help=True)


@contextmanager
def api(url: str | None, key: str | None) -> Iterator[ApiClient]:
    """An API client; a problem from the API ends the command with its message, exit 1."""
    try:
        with ApiClient(url, key) as client:
            yield client
    except ApiError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        for error in exc.errors:
            err_console.print(
                f"  {escape(str(error.get('path')))}: {escape(str(error.get('message')))}"
            )
        raise typer.Exit(1) from None


def fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(1)


def _read(path: Path) -> str:
    """A file the user named: one line of error (not a traceback) when it cannot be read."""
    try:
        return path.read_text()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise fail(f"cannot read {path}: not UTF-8 text") from None


# --- parsing -------------------------------------------------------------------------


def parse_pairs(pairs: list[str], option: str) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise fail(f"{option} takes key=value, got {pair!r}")
        parsed[key] = value
    return parsed


def parse_cascade(spec: str) -> list[dict[str, Any]]:
    """`push:30,sms/twilio,email` → steps: channel, optional /provider, optional :timeout."""
    steps = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        head, _, timeout = part.partition(":")
        channel, _, provider = head.partition("/")
        step: dict[str, Any] = {"channel": channel}
        if provider:
            step["provider"] = provider
        if timeout:
            if not timeout.isdigit():
                raise fail(f"a step's timeout is whole seconds, got {timeout!r}")
            step["timeout"] = int(timeout)
        steps.append(step)
    return steps


def cascade_for(to: dict[str, Any]) -> list[dict[str, Any]]:
    """Each channel the recipient has an address for, in the usual cheap-to-dear order."""
    channels: list[str] = []
    for field, channel in ADDRESS_CHANNELS:
        if to.get(field) and channel not in channels:
            channels.append(channel)
    return [{"channel": channel} for channel in channels]


def _content(
    text: str | None,
    subject: str | None,
    title: str | None,
    template: str | None,
    data: dict[str, str],
) -> dict[str, Any]:
    if template:
        return {"template": template, "data": data}
    return {
        k: v for k, v in {"text": text, "subject": subject, "title": title}.items() if v is not None
    }


def batch_items(
    rows: list[dict[str, str]], default_cascade: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """CSV rows → batch items: address columns, content columns, `cascade`,
    `idempotency_key`, and `meta.<key>` / `data.<key>` columns."""
    items = []
    for row in rows:
        values = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        to = {field: values[field] for field, _ in ADDRESS_CHANNELS if values.get(field)}
        item: dict[str, Any] = {"to": to}
        content = {f: values[f] for f in CONTENT_FIELDS if values.get(f)}
        if content:
            item["content"] = content
        if values.get("cascade"):
            item["cascade"] = parse_cascade(values["cascade"])
        elif default_cascade is None:
            item["cascade"] = cascade_for(to)
        metadata = {k[5:]: v for k, v in values.items() if k.startswith("meta.") and v}
        if metadata:
            item["metadata"] = metadata
        data = {k[5:]: v for k, v in values.items() if k.startswith("data.") and v}
        if data:
            item["data"] = data
        if values.get("idempotency_key"):
            item["idempotency_key"] = values["idempotency_key"]
        items.append(item)
    return items


def parse_since(value: str) -> timedelta:
    """`90s`, `15m`, `6h`, `7d`."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    number, unit = value[:-1], value[-1:]
    if unit not in units or not number.isdigit():
        raise fail(f"durations look like 90s, 15m, 6h or 7d, got {value!r}")
    return timedelta(**{units[unit]: int(number)})


# --- send ----------------------------------------------------------------------------


def send(
    category: Annotated[
        str, typer.Option(help="transactional | service | marketing")
    ] = "transactional",
    phone: Annotated[str | None, typer.Option(help="E.164, e.g. +48600100200")] = None,
    email: Annotated[str | None, typer.Option()] = None,
    push_token: Annotated[str | None, typer.Option()] = None,
    whatsapp: Annotated[str | None, typer.Option(help="E.164")] = None,
    telegram_chat_id: Annotated[str | None, typer.Option()] = None,
    viber_id: Annotated[str | None, typer.Option()] = None,
    text: Annotated[str | None, typer.Option(help="The message text.")] = None,
    subject: Annotated[str | None, typer.Option(help="Email subject.")] = None,
    title: Annotated[str | None, typer.Option(help="Push title.")] = None,
    template: Annotated[str | None, typer.Option(help="A template's name.")] = None,
    data: Annotated[list[str] | None, typer.Option(help="Template data key=value.")] = None,
    cascade: Annotated[
        str | None,
        typer.Option(
            help="Steps, comma-separated: a channel, channel/provider or channel:timeout,"
            " e.g. push:30,sms/twilio,email. Default: each channel with an address given."
        ),
    ] = None,
    meta: Annotated[list[str] | None, typer.Option(help="Metadata key=value.")] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A JSON request body (POST /v1/messages).")
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            help="A CSV file, one recipient per row: address columns (phone, email, ...),"
            " optional text/subject/title, cascade, idempotency_key, meta.<k>, data.<k>.",
        ),
    ] = None,
    chunk: Annotated[int, typer.Option(help="Rows per batch request (max 1000).")] = 500,
    wait: Annotated[bool, typer.Option(help="Wait for the outcome and show it.")] = False,
    url: Url = None,
    key: Key = None,
) -> None:
    """Send a message (flags or --file), or a CSV of recipients (--batch)."""
    flag_data = parse_pairs(data or [], "--data")
    metadata = parse_pairs(meta or [], "--meta")
    content = _content(text, subject, title, template, flag_data)
    steps = parse_cascade(cascade) if cascade else None
    with api(url, key) as client:
        if batch is not None:
            _send_batch(client, batch, category, content, steps, metadata, chunk)
            return
        if file is not None:
            try:
                body = json.loads(_read(file))
            except ValueError as exc:
                raise fail(f"{file} is not JSON: {exc}") from None
        else:
            to = {
                k: v
                for k, v in {
                    "phone": phone,
                    "email": email,
                    "push_token": push_token,
                    "whatsapp": whatsapp,
                    "telegram_chat_id": telegram_chat_id,
                    "viber_id": viber_id,
                }.items()
                if v
            }
            if not to:
                raise fail("give at least one address (--phone, --email, --push-token, ...)")
            body = {
                "category": category,
                "to": to,
                "content": content,
                "cascade": steps or cascade_for(to),
                "metadata": metadata,
            }
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        accepted = client.request("POST", "/v1/messages", json=body, headers=headers)
        typer.echo(accepted["id"])
        if wait:
            with console.status("waiting for the outcome…"):
                message = _wait_until_final(client, accepted["id"])
            show_message(message)


def _wait_until_final(client: ApiClient, message_id: str, within: float = 600) -> Any:
    deadline = time.monotonic() + within
    while True:
        message = client.request("GET", f"/v1/messages/{message_id}")
        if message["status"] in FINAL or time.monotonic() > deadline:
            return message
        time.sleep(0.25)


def _send_batch(
    client: ApiClient,
    path: Path,
    category: str,
    content: dict[str, Any],
    steps: list[dict[str, Any]] | None,
    metadata: dict[str, str],
    chunk: int,
) -> None:
    rows = list(csv.DictReader(io.StringIO(_read(path), newline="")))
    if not rows:
        raise fail(f"{path} has no rows")
    items = batch_items(rows, steps)
    size = max(1, min(chunk, BATCH_LIMIT))
    accepted = 0
    rejected: list[tuple[int, str]] = []
    progress = Progress(
        TextColumn("[bold]sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )
    with progress:
        task = progress.add_task("batch", total=len(items))
        for start in range(0, len(items), size):
            body: dict[str, Any] = {
                "category": category,
                "messages": items[start : start + size],
                "metadata": metadata,
            }
            if content:
                body["content"] = content
            if steps:
                body["cascade"] = steps
            try:
                result = client.request("POST", "/v1/messages/batch", json=body)
            except ApiError as exc:
                # A chunk with no acceptable item at all is refused whole, item by item.
                if exc.status != 422 or not exc.errors:
                    raise
                result = {"accepted": 0, "results": _refused_items(exc.errors)}
            accepted += result["accepted"]
            for item in result["results"]:
                if item.get("problem"):
                    problem = item["problem"]
                    reasons = "; ".join(
                        f"{e['path']}: {e['message']}" for e in problem.get("errors") or []
                    )
                    rejected.append(
                        (start + item["index"] + 2, reasons or problem.get("detail") or "")
                    )
            progress.advance(task, len(body["messages"]))
    console.print(f"accepted [green]{accepted}[/], rejected [red]{len(rejected)}[/]")
    if rejected:
        table = Table("CSV line", "why", title="Rejected rows")
        for line, why in rejected:
            table.add_row(str(line), escape(why))
        console.print(table)
        raise typer.Exit(1)


def _refused_items(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`body.messages[3].to.phone` field errors → per-item results like a 200 gives."""
    by_index: dict[int, list[dict[str, Any]]] = {}
    for error in errors:
        match = re.match(r"body\.messages\[(\d+)\]\.?(.*)", str(error.get("path", "")))
        if match is None:
            raise ApiError(f"{error.get('path')}: {error.get('message')}", 422, errors)
        by_index.setdefault(int(match[1]), []).append({**error, "path": match[2] or "item"})
    return [{"index": i, "problem": {"errors": e}} for i, e in sorted(by_index.items())]


# --- status --------------------------------------------------------------------------


def _when(value: str | None) -> str:
    if not value:
        return ""
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def _id_column(ids: Iterable[str]) -> Column:
    """Ids are copied into other commands (`keys revoke`): never shortened by a narrow
    terminal."""
    return Column("id", no_wrap=True, min_width=max((len(i) for i in ids), default=2))


def _status_style(status: str) -> str:
    if status in ("delivered", "read", "succeeded"):
        return f"[green]{status}[/]"
    if status in ("failed", "rejected", "expired", "cancelled", "suppressed"):
        return f"[red]{status}[/]"
    return status


def show_message(message: dict[str, Any]) -> None:
    delivered = (
        f" on {message['delivered_channel']} (step {message['delivered_step']})"
        if message.get("delivered_channel")
        else ""
    )
    console.print(
        f"[bold]{message['id']}[/]  {_status_style(message['status'])}{delivered}"
        f"  · {message['category']} · created {message['created_at']}",
        highlight=False,
    )
    attempts = Table("step", "channel", "provider", "status", "tries", "sent", "done", "error")
    for a in message["attempts"]:
        error = a.get("error") or {}
        attempts.add_row(
            str(a["step"]),
            a["channel"],
            a["provider"],
            _status_style(a["status"]),
            str(a["tries"]),
            _when(a.get("sent_at")),
            _when(a.get("completed_at")),
            escape(f"{error.get('code')}: {error.get('detail') or ''}".rstrip(": "))
            if error
            else "",
        )
    console.print(attempts)
    timeline = Table("#", "at (UTC)", "status", "source", "step", "detail", title="Timeline")
    for e in message["events"]:
        timeline.add_row(
            str(e["seq"]),
            _when(e["at"]),
            _status_style(e["status"]),
            e["source"],
            "" if e.get("step") is None else str(e["step"]),
            escape(json.dumps(e["detail"])) if e.get("detail") else "",
        )
    console.print(timeline)


def status(
    message_id: Annotated[str, typer.Argument(help="msg_…")],
    as_json: Annotated[bool, typer.Option("--json", help="The raw API answer.")] = False,
    url: Url = None,
    key: Key = None,
) -> None:
    """A message's outcome: its attempts and event timeline."""
    with api(url, key) as client:
        message = client.request("GET", f"/v1/messages/{message_id}")
    if as_json:
        typer.echo(json.dumps(message, indent=2))
        return
    show_message(message)


# --- timeline ------------------------------------------------------------------------


def _timeline_line(item: dict[str, Any]) -> str:
    if item["type"] == "inbound":
        reply = item["inbound"]
        return (
            f"{_when(item['at'])}  ← {reply['channel']}/{reply['provider']}  "
            f"{escape(reply['from'])}: {escape(reply['text'])}"
        )
    message = item["message"]
    steps = ", ".join(f"{a['channel']} {a['status']}" for a in item["attempts"]) or "no attempt"
    return (
        f"{_when(item['at'])}  → {message['id']}  {message['category']:<13} "
        f"{_status_style(message['status'])}  ({steps})"
    )


def timeline(
    address: Annotated[str, typer.Argument(help="Any one address: +48…, ann@…, a token")],
    channel: Annotated[str | None, typer.Option(help="Only this channel's messages.")] = None,
    limit: Annotated[int, typer.Option(help="How many items, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="The raw API answer.")] = False,
    url: Url = None,
    key: Key = None,
) -> None:
    """One person's messages (with their attempts) and replies, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if channel:
        params["channel"] = channel
    with api(url, key) as client:
        page = client.request(
            "GET", f"/v1/recipients/{quote(address, safe='+@')}/timeline", params=params
        )
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    if not page["data"]:
        console.print(f"nothing sent to or received from {escape(page['address'])}")
    for item in page["data"]:
        console.print(_timeline_line(item), highlight=False, soft_wrap=True)


# --- tail ----------------------------------------------------------------------------


def _event_line(event: dict[str, Any]) -> str:
    where = (
        f"step {event['step']} {event.get('channel') or ''}/{event.get('provider') or ''}"
        if event.get("step") is not None
        else ""
    )
    detail = event.get("detail") or {}
    reason = f" {detail.get('code')}" if detail.get("code") else ""
    return (
        f"{_when(event['at'])}  {event['message_id']}  {event['category']:<13} "
        f"{_status_style(event['status'])}  {where}{escape(reason)}  ({event['source']})"
    )


def tail(
    category: Annotated[list[str] | None, typer.Option(help="Only this category.")] = None,
    status: Annotated[
        list[str] | None, typer.Option(help="Only this event status, e.g. failed.")
    ] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Recent events to start with.")] = 10,
    follow: Annotated[bool, typer.Option(help="Keep polling for new events.")] = True,
    count: Annotated[
        int | None, typer.Option(help="Stop after this many events (e.g. the first failure).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0,
    url: Url = None,
    key: Key = None,
) -> None:
    """Stream the tenant's message events as they happen (Ctrl-C stops)."""
    filters: dict[str, Any] = {"category": category or [], "status": status or []}
    printed = 0
    with api(url, key) as client:
        page = client.request("GET", "/v1/events", params={**filters, "limit": max(1, lines)})
        events = page["data"][-lines:] if lines > 0 else []
        cursor = page["next_cursor"]
        try:
            while True:
                for event in events:
                    console.print(_event_line(event), highlight=False, soft_wrap=True)
                    printed += 1
                    if count is not None and printed >= count:
                        return
                if not follow:
                    return
                time.sleep(interval)
                params = {**filters, "limit": 200}
                if cursor:
                    params["cursor"] = cursor
                page = client.request("GET", "/v1/events", params=params)
                events, cursor = page["data"], page["next_cursor"] or cursor
        except KeyboardInterrupt:
            return


# --- stats ---------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def _money(value: str | None, currency: str | None) -> str:
    if value is None:
        return "-"
    return f"{value} {currency}" if currency else value


def stats(
    since: Annotated[str, typer.Option(help="How far back: 90s, 15m, 6h, 7d.")] = "24h",
    bucket: Annotated[
        str | None, typer.Option(help="minute | hour | day (default: by the range).")
    ] = None,
    category: Annotated[str | None, typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The raw API answer.")] = False,
    url: Url = None,
    key: Key = None,
) -> None:
    """Delivery stats: outcomes by category and channel, the failover funnel, latency."""
    span = parse_since(since)
    bucket = bucket or (
        "minute" if span <= timedelta(hours=2) else "hour" if span <= timedelta(days=7) else "day"
    )
    end = datetime.now(UTC)
    params: dict[str, Any] = {
        "from": (end - span).isoformat(),
        "to": end.isoformat(),
        "bucket": bucket,
    }
    if category:
        params["category"] = category
    with api(url, key) as client:
        body = client.request("GET", "/v1/stats", params=params)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    latency = body["time_to_deliver"]
    console.print(
        f"[bold]{body['messages']}[/] messages finished in the last {since}: "
        + ", ".join(f"{s} {n}" for s, n in sorted(body["by_status"].items()))
        + f" · failover rate {_rate(body['failover_rate'])}"
        + f" · time to deliver: median {_ms(latency['median_ms'])}, p95 {_ms(latency['p95_ms'])}",
        highlight=False,
    )
    counts = Table("category", "channel", "status", "messages", title="By category and channel")
    for c in body["counts"]:
        counts.add_row(c["category"], c["channel"], _status_style(c["status"]), str(c["messages"]))
    console.print(counts)
    funnel = Table(
        "step", "reached", "delivered", "delivery rate", "ended", title="Failover funnel"
    )
    for s in body["steps"]:
        funnel.add_row(
            str(s["step"]),
            str(s["reached"]),
            str(s["delivered"]),
            _rate(s["delivery_rate"]),
            str(s["ended"]),
        )
    console.print(funnel)
    per_category = Table(
        "category",
        "messages",
        "delivered",
        "failover",
        "median",
        "p95",
        "spend",
        "saved",
        title="Per category",
    )
    currency = body.get("currency")
    for c in body["by_category"]:
        t = c["time_to_deliver"]
        per_category.add_row(
            c["category"],
            str(c["messages"]),
            str(c["delivered"]),
            _rate(c["failover_rate"]),
            _ms(t["median_ms"]),
            _ms(t["p95_ms"]),
            _money(c["cost"], currency),
            _money(c["saved"], currency),
        )
    console.print(per_category)
    channels = Table(
        "category",
        "channel",
        "messages",
        "delivery rate",
        "median",
        "fell over",
        "spend",
        "per delivered",
        "saved",
        title="Per category and channel (the step messages ended on)",
    )
    for c in body["by_channel"]:
        channels.add_row(
            c["category"],
            c["channel"],
            str(c["messages"]),
            _rate(c["delivery_rate"]),
            _ms(c["median_ms"]),
            _rate(c["fell_over"]),
            _money(c["cost"], currency),
            _money(c["cost_per_delivered"], currency),
            _money(c["saved"], currency),
        )
    console.print(channels)
    unpriced = f" · {body['unpriced']} unpriced (no account price)" if body["unpriced"] else ""
    console.print(
        f"spend {_money(body['cost'], currency)} · the cascade saved"
        f" {_money(body['saved'], currency)} against sending every delivered message on its"
        f" last step{unpriced}",
        highlight=False,
    )


# --- keys ----------------------------------------------------------------------------


def create_key_via_api(name: str, scopes: str, url: str | None, key: str | None) -> None:
    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    with api(url, key) as client:
        created = client.request("POST", "/v1/keys", json={"name": name, "scopes": wanted})
    err_console.print(f"created {created['id']} ({', '.join(created['scopes'])}); shown once:")
    typer.echo(created["key"])


def keys_list(url: Url = None, key: Key = None) -> None:
    """This tenant's API keys (needs an admin key)."""
    with api(url, key) as client:
        keys = client.request("GET", "/v1/keys")["data"]
    table = Table(
        _id_column(k["id"] for k in keys), "name", "prefix", "scopes", "created", "revoked"
    )
    for k in keys:
        table.add_row(
            k["id"],
            escape(k["name"]),
            k["prefix"] + "…",
            ",".join(k["scopes"]),
            k["created_at"][:19],
            (k["revoked_at"] or "")[:19],
        )
    console.print(table)


def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="key_…")], url: Url = None, key: Key = None
) -> None:
    """Revoke an API key at once (needs an admin key)."""
    with api(url, key) as client:
        client.request("DELETE", f"/v1/keys/{key_id}")
    console.print(f"revoked {key_id}")


# --- webhooks ------------------------------------------------------------------------


@webhooks_cli.command("list")
def webhooks_list(url: Url = None, key: Key = None) -> None:
    """The tenant's webhook endpoints."""
    with api(url, key) as client:
        endpoints = client.request("GET", "/v1/webhooks")["data"]
    table = Table(
        _id_column(e["id"] for e in endpoints),
        "url",
        "events",
        "categories",
        "enabled",
        "failing since",
    )
    for e in endpoints:
        table.add_row(
            e["id"],
            escape(e["url"]),
            ",".join(e["event_types"] or ["all"]),
            ",".join(e["categories"] or ["all"]),
            "yes" if e["enabled"] else f"[red]no[/] ({escape(e['disabled_reason'] or '')})",
            e["failing_since"] or "",
        )
    console.print(table)


@webhooks_cli.command("create")
def webhooks_create(
    endpoint_url: Annotated[str, typer.Argument(help="https://… receiving the events")],
    event_type: Annotated[list[str] | None, typer.Option(help="Only these event types.")] = None,
    category: Annotated[list[str] | None, typer.Option(help="Only these categories.")] = None,
    description: Annotated[str, typer.Option()] = "",
    url: Url = None,
    key: Key = None,
) -> None:
    """Register an endpoint; its signing secret is shown once."""
    body: dict[str, Any] = {"url": endpoint_url, "description": description}
    if event_type:
        body["event_types"] = event_type
    if category:
        body["categories"] = category
    with api(url, key) as client:
        created = client.request("POST", "/v1/webhooks", json=body)
    err_console.print(f"created {created['id']}; signing secret (shown once):")
    typer.echo(created["secret"])


@webhooks_cli.command("delete")
def webhooks_delete(
    endpoint_id: Annotated[str, typer.Argument(help="whe_…")], url: Url = None, key: Key = None
) -> None:
    """Delete an endpoint and its delivery log."""
    with api(url, key) as client:
        client.request("DELETE", f"/v1/webhooks/{endpoint_id}")
    console.print(f"deleted {endpoint_id}")


@webhooks_cli.command("test")
def webhooks_test(
    endpoint_id: Annotated[str, typer.Argument(help="whe_…")], url: Url = None, key: Key = None
) -> None:
    """Send a signed test event now and show the receiver's answer."""
    with api(url, key) as client:
        result = client.request("POST", f"/v1/webhooks/{endpoint_id}/test")
    outcome = "[green]succeeded[/]" if result["succeeded"] else "[red]failed[/]"
    console.print(
        f"{outcome}: HTTP {result['status_code']} in {result['latency_ms']} ms"
        + (f" · {escape(result['error'])}" if result.get("error") else ""),
        highlight=False,
    )
    if not result["succeeded"]:
        raise typer.Exit(1)


@webhooks_cli.command("deliveries")
def webhooks_deliveries(
    endpoint_id: Annotated[str, typer.Argument(help="whe_…")],
    limit: Annotated[int, typer.Option()] = 20,
    url: Url = None,
    key: Key = None,
) -> None:
    """The endpoint's delivery log, newest first."""
    with api(url, key) as client:
        page = client.request(
            "GET", f"/v1/webhooks/{endpoint_id}/deliveries", params={"limit": limit}
        )
    table = Table(
        _id_column(d["id"] for d in page["data"]),
        "event",
        Column("message", no_wrap=True, min_width=36),
        "status",
        "tries",
        "HTTP",
        "ms",
        "error",
    )
    for d in page["data"]:
        table.add_row(
            d["id"],
            d["event_type"],
            d["message_id"],
            _status_style(d["status"]),
            str(d["attempts"]),
            str(d["response_status_code"] or ""),
            str(d["latency_ms"] or ""),
            escape(d["error"] or ""),
        )
    console.print(table)


@webhooks_cli.command("replay")
def webhooks_replay(
    endpoint_id: Annotated[str, typer.Argument(help="whe_…")],
    since: Annotated[
        str | None, typer.Option(help="Every delivery created in this past span: 90s, 15m, 6h.")
    ] = None,
    delivery: Annotated[str | None, typer.Option(help="One delivery, by its whd_ id.")] = None,
    failed_only: Annotated[
        bool, typer.Option("--failed-only", help="With --since: only the failed (recover).")
    ] = False,
    url: Url = None,
    key: Key = None,
) -> None:
    """Send deliveries again: one, every one since a time, or only the failed ones."""
    if (since is None) == (delivery is None):
        raise fail("give exactly one of --since and --delivery")
    if delivery is not None:
        path, body = "replay", {"delivery_id": delivery}
    else:
        assert since is not None
        start = (datetime.now(UTC) - parse_since(since)).isoformat()
        path, body = ("recover" if failed_only else "replay"), {"since": start}
    with api(url, key) as client:
        result = client.request("POST", f"/v1/webhooks/{endpoint_id}/{path}", json=body)
    console.print(f"replayed {result['replayed']}")


def register(cli: typer.Typer, keys_cli: typer.Typer) -> None:
    """Add these commands to the `cascade` CLI."""
    cli.command()(send)
    cli.command()(status)
    cli.command()(tail)
    cli.command()(timeline)
    cli.command()(stats)
    keys_cli.command("list")(keys_list)
    keys_cli.command("revoke")(keys_revoke)
    cli.add_typer(webhooks_cli, name="webhooks")
