"""The README's code blocks, run as written against a real `cascade dev`.

A block runs when it is runnable as is: shell blocks whose commands carry no `…`
placeholder (comments may: they show answers) and do not start or follow anything
long-lived; the Python webhook receiver against a real `POST /v1/webhooks/{id}/test`.
The only edits: the dev stack's port for `localhost:8000`, a free port for the receiver.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import DevStack, _free_port

README = Path(__file__).resolve().parents[2] / "README.md"
# Blocks that start, follow or rebuild something long-lived, or need Docker: not run here.
LONG_LIVED = (
    "./scripts/",
    "bench/run",
    "cascade tail",
    "cascade migrate",
    "cascade api",
    "docker ",
)


def code_blocks(language: str) -> list[str]:
    return [
        body
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S)
        if lang == language
    ]


def without_comments(block: str) -> str:
    lines = []
    for line in block.splitlines():
        code = re.sub(r"(^|\s)#(\s.*)?$", "", line)
        if code.strip():
            lines.append(code)
    return "\n".join(lines)


def runnable_shell_blocks() -> list[str]:
    return [
        without_comments(block)
        for block in code_blocks("sh")
        if "…" not in without_comments(block) and not any(m in block for m in LONG_LIVED)
    ]


def test_the_readme_has_runnable_blocks() -> None:
    assert len(runnable_shell_blocks()) >= 4
    assert len(code_blocks("python")) == 1


@pytest.fixture
def user_dir(dev_stack: DevStack, tmp_path: Path) -> Path:
    """Where the user started `cascade dev`: `.cascade` is its data dir."""
    (tmp_path / ".cascade").symlink_to(dev_stack.data_dir)
    (tmp_path / "msg.json").write_text(
        json.dumps(
            {
                "category": "transactional",
                "to": {"phone": "+48600100200"},
                "content": {"text": "Your code is 4711"},
                "cascade": [{"channel": "sms"}],
            }
        )
    )
    (tmp_path / "people.csv").write_text(
        "phone,email\n+48600100210,ann@example.com\n+48600100211,bob@example.com\n"
    )
    return tmp_path


def user_env(dev_stack: DevStack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["CASCADE_URL"] = dev_stack.base_url
    # The README: "`KEY=$(cat .cascade/dev-api-key)` in the directory you started it from".
    env["KEY"] = dev_stack.key
    env["COLUMNS"] = "200"
    return env


@pytest.mark.parametrize("index", range(len(runnable_shell_blocks())))
def test_readme_shell_block_runs(dev_stack: DevStack, user_dir: Path, index: int) -> None:
    block = runnable_shell_blocks()[index]
    # `-f`: an HTTP error (4xx/5xx) fails the block; 207 (a batch with refused rows) is not.
    script = block.replace("localhost:8000", f"127.0.0.1:{dev_stack.port}").replace(
        "curl -s ", "curl -sSf "
    )
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=user_dir,
        env=user_env(dev_stack),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, (script, ran.stdout, ran.stderr)


def test_readme_webhook_receiver_answers_the_test_event_and_message_events(
    dev_stack: DevStack, tmp_path: Path
) -> None:
    (receiver_code,) = code_blocks("python")
    port = _free_port()
    receiver_file = tmp_path / "receiver.py"
    receiver_file.write_text(receiver_code.replace("9000", str(port)))
    headers = {"Authorization": f"Bearer {dev_stack.key}"}
    with httpx.Client(base_url=dev_stack.base_url, headers=headers, timeout=30) as api:
        endpoint = api.post(
            "/v1/webhooks",
            json={"url": f"http://127.0.0.1:{port}/hook", "event_types": ["message.delivered"]},
        ).json()
        receiver = subprocess.Popen(
            [sys.executable, "-u", str(receiver_file), endpoint["secret"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_listening(port)
            tested = api.post(f"/v1/webhooks/{endpoint['id']}/test").json()
            assert tested["succeeded"] is True, tested
            assert tested["status_code"] == 204
            sent = api.post(
                "/v1/messages",
                json={
                    "category": "transactional",
                    "to": {"phone": "+48600100200"},
                    "content": {"text": "Your code is 4711"},
                    "cascade": [{"channel": "sms"}],
                },
            ).json()
            delivered = _delivery_status(api, endpoint["id"], sent["id"])
            assert delivered == "succeeded"
        finally:
            receiver.terminate()
            out, err = receiver.communicate(timeout=10)
        api.delete(f"/v1/webhooks/{endpoint['id']}")
    assert f"webhook.test {endpoint['id']}" in out, (out, err)
    assert f"message.delivered {sent['id']} delivered" in out, (out, err)
    assert "Traceback" not in err


def _wait_listening(port: int) -> None:
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except httpx.ConnectError:
            time.sleep(0.05)
        except httpx.HTTPError:
            return
    raise AssertionError("the receiver does not listen")


def _delivery_status(api: httpx.Client, endpoint_id: str, message_id: str) -> str:
    for _ in range(300):
        page = api.get(f"/v1/webhooks/{endpoint_id}/deliveries").json()
        done = [
            d for d in page["data"] if d["status"] != "pending" and d["message_id"] == message_id
        ]
        if done:
            return str(done[0]["status"])
        time.sleep(0.1)
    raise AssertionError(f"no delivery finished: {page}")
