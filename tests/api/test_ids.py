"""Public ids: one prefix per kind, named once in `app.ids`."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from app.ids import IdPrefix, from_public, new_id, to_public

ROOT = Path(__file__).resolve().parents[2]


def test_a_public_id_round_trips_only_under_its_own_prefix() -> None:
    value = new_id()
    public = to_public(IdPrefix.MESSAGE, value)
    assert public == f"msg_{value.hex}"
    assert from_public(IdPrefix.MESSAGE, public) == value
    assert from_public(IdPrefix.ATTEMPT, public) is None
    assert from_public(IdPrefix.MESSAGE, "msg_" + "z" * 32) is None
    assert isinstance(from_public(IdPrefix.WEBHOOK_ENDPOINT, f"whe_{uuid.uuid4().hex}"), uuid.UUID)


def test_no_code_spells_a_prefix_instead_of_naming_it() -> None:
    spelled = re.compile(r"""_public\(\s*["']""")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("app", "providers", "tests")
        for path in (ROOT / folder).rglob("*.py")
        if spelled.search(path.read_text())
    ]
    assert offenders == []
