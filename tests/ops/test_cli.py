"""The `cascade` commands that talk to the API, run against the live test service.

Each command runs in a worker thread (the API and workers share this test's event loop),
through typer's CliRunner, with `--url` and `--key` like a user would pass them.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import typer
from typer.testing import CliRunner, Result

from app.cli import cli
from providers.sandbox import sign
from tests.conftest import Service, Tenant
from tests.helpers import message_body, send, wait_until_final
from tests.webhooks.receiver import Receiver

runner = CliRunner()


async def cascade(service: Service, tenant: Tenant, *args: str) -> Result:
    argv = [*args, "--url", service.base_url, "--key", tenant.key]
    return await asyncio.to_thread(runner.invoke, cli, argv, env={"COLUMNS": "220"})


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


async def test_send_with_flags_then_status_shows_the_timeline(
    service: Service, tenant: Tenant
) -> None:
    sent = ok(
        await cascade(
            service,
            tenant,
            "send",
            "--push-token",
            "device-reject",
            "--phone",
            "+48600100200",
            "--text",
            "Your code is 4711",
            "--meta",
            "order=A-7",
        )
    )
    message_id = sent.strip()
    assert message_id.startswith("msg_")
    await wait_until_final(tenant.client, message_id)

    raw = json.loads(ok(await cascade(service, tenant, "status", message_id, "--json")))
    assert raw["cascade"][0]["channel"] == "push" and raw["cascade"][1]["channel"] == "sms"
    assert raw["metadata"] == {"order": "A-7"}
    table = ok(await cascade(service, tenant, "status", message_id))
    assert f"{message_id}  delivered on sms (step 1)" in table
    assert "sandbox:rejected" in table
    assert "Timeline" in table


async def test_send_a_json_file_and_wait_for_the_outcome(
    service: Service, tenant: Tenant, tmp_path: Path
) -> None:
    body = tmp_path / "msg.json"
    body.write_text(json.dumps(message_body(cascade=[{"channel": "email"}])))

    out = ok(await cascade(service, tenant, "send", "--file", str(body), "--wait"))

    message_id = out.splitlines()[0]
    assert f"{message_id}  delivered on email" in out
    assert "Timeline" in out


async def test_send_a_csv_batch_reports_rejected_rows(
    service: Service, tenant: Tenant, tmp_path: Path
) -> None:
    batch = tmp_path / "batch.csv"
    batch.write_text(
        "phone,email,meta.campaign,idempotency_key\n"
        "+48600100210,,spring,row-1\n"
        ",ann@example.com,spring,row-2\n"
        "not-a-phone,,spring,row-3\n"
    )

    result = await cascade(
        service, tenant, "send", "--batch", str(batch), "--text", "Hello", "--chunk", "2"
    )

    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "accepted 2, rejected 1" in result.stdout, result.stderr
    assert "4" in result.stdout and "to.phone" in result.stdout  # CSV line 4
    listed = (
        await tenant.client.get("/v1/messages", params={"metadata": "campaign=spring"})
    ).json()
    assert sorted(m["to"].get("phone") or m["to"]["email"] for m in listed["data"]) == [
        "+48600100210",
        "ann@example.com",
    ]


async def test_tail_prints_recent_events_and_can_wait_for_a_failure(
    service: Service, tenant: Tenant
) -> None:
    delivered = await send(tenant.client, message_body(cascade=[{"channel": "push"}]))
    await wait_until_final(tenant.client, delivered)
    await asyncio.sleep(1.1)  # the feed holds back events younger than a second

    recent = ok(await cascade(service, tenant, "tail", "--no-follow", "-n", "50"))
    assert delivered in recent
    assert "delivered" in recent and "push/sandbox" in recent

    waiting = asyncio.create_task(
        cascade(
            service,
            tenant,
            "tail",
            "-n",
            "0",
            "--status",
            "rejected",
            "--status",
            "failed",
            "--count",
            "2",
            "--interval",
            "0.2",
        )
    )
    failing = await send(
        tenant.client,
        message_body(
            category="service", to={"phone": "+48600100201"}, cascade=[{"channel": "sms"}]
        ),
    )
    lines = ok(await asyncio.wait_for(waiting, timeout=30)).splitlines()
    assert len(lines) == 2 and all(failing in line for line in lines)
    assert "rejected  step 0 sms/sandbox sandbox:rejected" in lines[0]
    assert "failed" in lines[1]


async def test_stats_as_tables_and_json(service: Service, tenant: Tenant) -> None:
    for body in (
        message_body(to={"push_token": "ok"}, cascade=[{"channel": "push"}]),
        message_body(
            to={"push_token": "device-reject", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
        message_body(
            to={"push_token": "ok", "phone": "+48600100200"},
            cascade=[{"channel": "push"}, {"channel": "sms"}],
        ),
    ):
        await wait_until_final(tenant.client, await send(tenant.client, body))

    raw = json.loads(ok(await cascade(service, tenant, "stats", "--since", "1h", "--json")))
    assert raw["bucket"] == "minute"
    assert raw["messages"] == 3 and raw["failover_rate"] == 1 / 3
    tables = ok(await cascade(service, tenant, "stats", "--since", "7d"))
    assert "3 messages finished in the last 7d: delivered 3" in tables
    assert "failover rate 33.3%" in tables
    assert "Failover funnel" in tables and "By category" in tables
    # The sandbox's prices: push 0.0001 EUR, SMS to +48 0.031 EUR; the third message cost a
    # push where its last step (SMS) would have cost 0.031.
    assert raw["currency"] == "EUR" and raw["cost"] == "0.0312" and raw["saved"] == "0.0309"
    assert "spend 0.0312 EUR · the cascade saved 0.0309 EUR" in tables
    assert "Per category and channel" in tables


async def test_keys_create_list_and_revoke_through_the_api(
    service: Service, tenant: Tenant
) -> None:
    created = await cascade(
        service, tenant, "keys", "create", "--name", "robot", "--scopes", "read"
    )
    new_key = ok(created).strip()
    assert new_key.startswith("csk_")
    listed = ok(await cascade(service, tenant, "keys", "list"))
    line = next(line for line in listed.splitlines() if "robot" in line)
    key_id = next(word for word in line.split() if word.startswith("key_"))
    assert new_key[:10] in line and "read" in line

    ok(await cascade(service, tenant, "keys", "revoke", key_id))

    refused = await asyncio.to_thread(
        runner.invoke, cli, ["status", "msg_x", "--url", service.base_url, "--key", new_key]
    )
    assert refused.exit_code == 1
    assert "Missing or invalid API key" in refused.stderr


async def test_webhooks_create_list_and_delete(service: Service, tenant: Tenant) -> None:
    created = await cascade(
        service, tenant, "webhooks", "create", "http://127.0.0.1:9/hook", "--category", "service"
    )
    assert ok(created).strip().startswith("whsec_")
    listed = ok(await cascade(service, tenant, "webhooks", "list"))
    endpoint_id = next(w for w in listed.split() if w.startswith("whe_"))
    assert "http://127.0.0.1:9/hook" in listed and "service" in listed

    ok(await cascade(service, tenant, "webhooks", "delete", endpoint_id))
    assert endpoint_id not in ok(await cascade(service, tenant, "webhooks", "list"))


async def test_problems_end_the_command_with_their_message(
    service: Service, tenant: Tenant
) -> None:
    result = await cascade(service, tenant, "send", "--phone", "12345", "--text", "x")
    assert result.exit_code == 1
    assert "The request is not valid" in result.stderr
    assert "body.to.phone" in result.stderr
    unknown = await cascade(service, tenant, "status", "msg_nope")
    assert unknown.exit_code == 1 and "No such resource" in unknown.stderr


async def test_a_missing_file_is_one_line_of_error(
    service: Service, tenant: Tenant, tmp_path: Path
) -> None:
    for option in ("--file", "--batch"):
        missing = tmp_path / f"nowhere{option}.json"
        result = await cascade(service, tenant, "send", option, str(missing))

        assert result.exit_code == 1
        assert result.stderr.strip() == f"error: cannot read {missing}: No such file or directory"
        assert result.exception is None or isinstance(result.exception, SystemExit)


async def test_keys_list_shows_whole_ids_on_a_narrow_terminal(
    service: Service, tenant: Tenant
) -> None:
    ok(await cascade(service, tenant, "keys", "create", "--name", "narrow", "--scopes", "read"))
    argv = ["keys", "list", "--url", service.base_url, "--key", tenant.key]
    listed = await asyncio.to_thread(runner.invoke, cli, argv, env={"COLUMNS": "60"})

    ids = re.findall(r"key_[0-9a-f]+", ok(listed))
    assert ids and all(len(i) == len("key_") + 32 for i in ids), listed.stdout


async def test_webhook_deliveries_say_succeeded_as_the_api_does(
    service: Service, tenant: Tenant
) -> None:
    async with Receiver() as receiver:
        created = await tenant.client.post(
            "/v1/webhooks", json={"url": receiver.url(), "event_types": ["message.delivered"]}
        )
        endpoint_id = created.json()["id"]
        await wait_until_final(
            tenant.client, await send(tenant.client, message_body(cascade=[{"channel": "push"}]))
        )
        await receiver.wait_for(1, within=30)
        for _ in range(100):  # the delivery's outcome is written once the answer is in
            page = (await tenant.client.get(f"/v1/webhooks/{endpoint_id}/deliveries")).json()
            if page["data"] and page["data"][0]["status"] == "succeeded":
                break
            await asyncio.sleep(0.05)
        shown = ok(await cascade(service, tenant, "webhooks", "deliveries", endpoint_id))
    row = next(line for line in shown.splitlines() if "message.delivered" in line)
    assert "succeeded" in row
    assert "delivered" not in row.replace("message.delivered", "")


def _command_paths(app: typer.Typer, prefix: list[str]) -> Iterator[list[str]]:
    yield prefix
    for command in app.registered_commands:
        assert command.callback is not None
        yield [*prefix, command.name or command.callback.__name__.replace("_", "-")]
    for group in app.registered_groups:
        assert group.typer_instance is not None and group.name is not None
        yield from _command_paths(group.typer_instance, [*prefix, group.name])


def test_no_type_placeholders_in_any_help() -> None:
    paths = list(_command_paths(cli, []))
    assert ["webhooks", "deliveries"] in paths and ["keys", "list"] in paths

    for path in paths:
        shown = runner.invoke(cli, [*path, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, (path, shown.stdout)
        placeholder = re.search(r"<(str|bool|int|float|path|list\[\w+\])>", shown.stdout)
        assert placeholder is None, (path, shown.stdout)
    worker = runner.invoke(cli, ["worker", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[default: 127.0.0.1]" in worker


async def test_webhooks_replay_and_recover_from_the_command_line(
    service: Service, tenant: Tenant
) -> None:
    async with Receiver() as receiver:
        created = await tenant.client.post(
            "/v1/webhooks", json={"url": receiver.url(), "event_types": ["message.delivered"]}
        )
        endpoint_id = created.json()["id"]
        await wait_until_final(
            tenant.client, await send(tenant.client, message_body(cascade=[{"channel": "push"}]))
        )
        await receiver.wait_for(1, within=30)
        for _ in range(100):
            page = (await tenant.client.get(f"/v1/webhooks/{endpoint_id}/deliveries")).json()
            if page["data"][0]["status"] == "succeeded":
                break
            await asyncio.sleep(0.05)

        recovered = ok(
            await cascade(
                service, tenant, "webhooks", "replay", endpoint_id, "--since", "1h", "--failed-only"
            )
        )
        replayed = ok(
            await cascade(service, tenant, "webhooks", "replay", endpoint_id, "--since", "1h")
        )
        await receiver.wait_for(2, within=30)
        neither = await cascade(service, tenant, "webhooks", "replay", endpoint_id)

    assert recovered.strip() == "replayed 0"
    assert replayed.strip() == "replayed 1"
    assert neither.exit_code == 1
    assert "give exactly one of --since and --delivery" in neither.stderr


def test_cascade_dev_takes_its_data_dir_and_public_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A tunnel in CASCADE_PUBLIC_URL is where providers' callbacks are addressed (Twilio
    signs that URL); options win over the environment, never option defaults."""
    from app.cli import dev_locations
    from app.settings import Settings

    local = "http://127.0.0.1:8000"
    monkeypatch.delenv("CASCADE_PUBLIC_URL", raising=False)
    monkeypatch.delenv("CASCADE_DATA_DIR", raising=False)
    assert dev_locations(Settings(), None, None, local) == (Path(".cascade"), local)

    monkeypatch.setenv("CASCADE_PUBLIC_URL", "https://cascade-dev.example.ngrok.app")
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path))
    data_dir, public_url = dev_locations(Settings(), None, None, local)
    assert (data_dir, public_url) == (tmp_path, "https://cascade-dev.example.ngrok.app")
    settings = Settings(data_dir=data_dir, public_url=public_url, dev_mode=True)
    assert settings.callback_base == "https://cascade-dev.example.ngrok.app"

    assert dev_locations(Settings(), Path("elsewhere"), "https://other.example", local) == (
        Path("elsewhere"),
        "https://other.example",
    )


async def test_timeline_shows_a_persons_messages_and_replies_newest_first(
    service: Service, tenant: Tenant
) -> None:
    phone = "+48604" + str(uuid.uuid4().int % 10_000).zfill(4) + "55"
    sent = await wait_until_final(
        tenant.client,
        await send(tenant.client, message_body(to={"phone": phone}, cascade=[{"channel": "sms"}])),
    )
    reply = orjson.dumps(
        {"event_id": f"mo-{uuid.uuid4().hex}", "channel": "sms", "from": phone, "text": "thanks"}
    )
    secret = service.settings.sandbox_secret.get_secret_value()
    async with httpx.AsyncClient(base_url=service.base_url) as provider:
        await provider.post(
            "/v1/providers/sandbox/inbound",
            content=reply,
            headers={"x-sandbox-signature": sign(secret, reply, int(time.time()))},
        )

    out = ok(await cascade(service, tenant, "timeline", phone))
    nobody = ok(await cascade(service, tenant, "timeline", "+48604999955"))

    lines = out.strip().splitlines()
    assert "← sms/sandbox" in lines[0] and "thanks" in lines[0]
    assert sent["id"] in lines[1] and "sms delivered" in lines[1]
    assert "nothing sent to or received from +48604999955" in nobody
