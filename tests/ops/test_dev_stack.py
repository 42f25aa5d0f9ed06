"""Commands run beside a live `cascade dev` on the same data dir, as a user's second
terminal would: they attach to its servers and never start, stop or disturb them."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import httpx

from tests.conftest import CASCADE_BIN, DevStack, _free_port


def cascade(stack: DevStack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CASCADE_BIN, *args],
        env=stack.env(COLUMNS="300"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def deliver_one(stack: DevStack, key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=10) as client:
        accepted = client.post(
            "/v1/messages",
            json={
                "category": "transactional",
                "to": {"phone": "+48600100200"},
                "content": {"text": "Your code is 4711"},
                "cascade": [{"channel": "sms"}],
            },
        )
        assert accepted.status_code == 202, accepted.text
        message_id = accepted.json()["id"]
        for _ in range(300):
            message: dict[str, Any] = client.get(f"/v1/messages/{message_id}").json()
            if message["status"] == "delivered":
                return message
            time.sleep(0.1)
    raise AssertionError(f"not delivered: {message}")


def test_keys_create_beside_cascade_dev_leaves_its_servers_running(dev_stack: DevStack) -> None:
    for _ in range(2):  # the report: the first run already took Redis down
        created = cascade(dev_stack, "keys", "create", "--tenant", "acme", "--scopes", "send,read")
        assert created.returncode == 0, (created.stdout, created.stderr)
        key = created.stdout.strip()
        assert key.startswith("csk_") and "\n" not in key  # KEY=$(cascade keys create …)

    ready = httpx.get(f"{dev_stack.base_url}/readyz")
    assert ready.status_code == 200, ready.text
    assert deliver_one(dev_stack, key)["status"] == "delivered"
    assert dev_stack.process.poll() is None


def test_migrate_beside_cascade_dev_attaches(dev_stack: DevStack) -> None:
    migrated = cascade(dev_stack, "migrate", timeout=120)

    assert migrated.returncode == 0, (migrated.stdout, migrated.stderr)
    assert httpx.get(f"{dev_stack.base_url}/readyz").status_code == 200
    assert deliver_one(dev_stack, dev_stack.key)["status"] == "delivered"


def test_a_second_cascade_dev_on_the_data_dir_refuses_and_touches_nothing(
    dev_stack: DevStack,
) -> None:
    lock = dev_stack.data_dir / "cascade.lock"
    before = lock.read_text()
    other_port = _free_port()

    second = cascade(
        dev_stack, "dev", "--port", str(other_port), "--data-dir", str(dev_stack.data_dir)
    )

    assert second.returncode == 1, (second.stdout, second.stderr)
    said = " ".join((second.stdout + second.stderr).split())
    assert "already running" in said
    assert f"pid {dev_stack.process.pid}, port {dev_stack.port}" in said
    assert "Traceback" not in said
    assert lock.read_text() == before
    # Nothing listens on the second port: no API, no workers were started.
    try:
        httpx.get(f"http://127.0.0.1:{other_port}/healthz", timeout=2)
        raise AssertionError("a second API is listening")
    except httpx.ConnectError:
        pass
    assert httpx.get(f"{dev_stack.base_url}/readyz").status_code == 200
    assert deliver_one(dev_stack, dev_stack.key)["status"] == "delivered"


def test_cascade_dev_on_a_taken_port_refuses_before_starting_anything(
    dev_stack: DevStack, tmp_path_factory: Any
) -> None:
    other_dir = tmp_path_factory.mktemp("other-dev")

    second = cascade(dev_stack, "dev", "--port", str(dev_stack.port), "--data-dir", str(other_dir))

    assert second.returncode == 1, (second.stdout, second.stderr)
    assert f"cannot listen on 127.0.0.1:{dev_stack.port}" in second.stdout
    assert not (other_dir / "postgres").exists()
