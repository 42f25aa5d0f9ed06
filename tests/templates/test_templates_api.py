"""Templates through the API: CRUD, rendering per channel at accept time (checked on the
provider simulators' wire), missing variables as 422, and locale fallback."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import Simulators, Tenant
from tests.helpers import eventually, send, wait_until_final

VARIANTS: dict[str, Any] = {
    "push": {"title": "Hi {{ name }}", "body": "Your code is {{ code }}"},
    "sms": {"text": "{{ name }}, your code is {{ code }}"},
    "email": {
        "subject": "Code for {{ name }}",
        "text": "Code: {{ code }}",
        "html": "<p>Hello {{ name }}, your code is <b>{{ code }}</b></p>",
    },
    "messenger": {"template_name": "otp_code", "template_language": "en", "params": ["{{ code }}"]},
}


async def create(
    tenant: Tenant, name: str, locale: str = "en", variants: dict[str, Any] | None = None
) -> httpx.Response:
    return await tenant.client.post(
        "/v1/templates", json={"name": name, "locale": locale, "variants": variants or VARIANTS}
    )


def templated(name: str, to: dict[str, Any], cascade: list[dict[str, Any]], **content: Any) -> Any:
    return {
        "category": "transactional",
        "to": to,
        "content": {"template": name, **content},
        "cascade": cascade,
    }


async def test_templates_are_created_read_listed_replaced_and_deleted(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    created = await create(tenant, "otp")
    template = created.json()
    duplicate = await create(tenant, "otp")
    polish = await create(tenant, "otp", "pl", {"sms": {"text": "Twój kod: {{ code }}"}})
    listed = (await tenant.client.get("/v1/templates", params={"limit": 1})).json()
    second_page = (
        await tenant.client.get(
            "/v1/templates", params={"limit": 1, "cursor": listed["next_cursor"]}
        )
    ).json()
    replaced = await tenant.client.put(
        f"/v1/templates/{template['id']}",
        json={"name": "otp", "locale": "en", "variants": {"sms": {"text": "{{ code }}"}}},
    )
    theirs = await other_tenant.client.get(f"/v1/templates/{template['id']}")
    deleted = await tenant.client.delete(f"/v1/templates/{template['id']}")
    gone = await tenant.client.get(f"/v1/templates/{template['id']}")

    assert created.status_code == 201
    assert template["id"].startswith("tpl_")
    assert template["variables"] == ["code", "name"]
    # Braces are in GSM-7's extension table: two septets each.
    assert template["sms"] == {"encoding": "gsm7", "units": 43, "segments": 1}
    assert duplicate.status_code == 409
    assert polish.json()["sms"]["encoding"] == "ucs2"  # "ó" is not in GSM-7
    assert [t["locale"] for t in listed["data"] + second_page["data"]] == ["en", "pl"]
    assert second_page["next_cursor"] is None
    assert replaced.json()["variables"] == ["code"]
    assert replaced.json()["variants"]["email"] is None
    assert theirs.status_code == 404
    assert deleted.status_code == 204
    assert gone.status_code == 404


async def test_a_template_that_does_not_compile_is_refused(tenant: Tenant) -> None:
    response = await create(tenant, "broken", variants={"sms": {"text": "Hi {{ name"}})

    assert response.status_code == 422
    assert response.json()["errors"][0]["path"] == "body.variants.sms.text"
    assert response.json()["errors"][0]["type"] == "template_syntax"


async def test_each_channel_gets_its_own_rendered_variant(
    tenant: Tenant, simulators: Simulators
) -> None:
    name = f"otp-{uuid.uuid4().hex[:6]}"
    await create(tenant, name)
    data = {"name": "<Ann>", "code": "4711"}
    email = f"{name}@example.com"

    ids = [
        await send(
            tenant.client,
            templated(
                name,
                {"phone": "+48600100200"},
                [{"channel": "sms", "provider": "twilio"}],
                data=data,
            ),
        ),
        await send(
            tenant.client,
            templated(
                name,
                {"email": email},
                [{"channel": "email", "provider": "smtp", "timeout": 3}],
                data=data,
            ),
        ),
        await send(
            tenant.client,
            templated(
                name,
                {"whatsapp": "+48600100205"},
                [{"channel": "messenger", "provider": "whatsapp"}],
                data=data,
            ),
        ),
        await send(
            tenant.client,
            templated(
                name,
                {"push_token": f"tok-{name}"},
                [{"channel": "push", "provider": "fcm"}],
                data=data,
            ),
        ),
    ]
    for message_id in ids[:3]:
        await wait_until_final(tenant.client, message_id)

    sms = next(
        m for m in simulators.twilio.message_submits if m.form.get("Body", "").startswith("<Ann>")
    )
    mail = next(m for m in simulators.smtp.messages if email in m.rcpt_tos).message
    whatsapp = next(
        r.json()
        for r in simulators.whatsapp.requests
        if r.body and r.json().get("to") == "48600100205" and r.json().get("type") == "template"
    )
    push = await eventually(
        lambda: [s for s in simulators.fcm.sends if s.body["message"]["token"] == f"tok-{name}"]
    )

    assert sms.form["Body"] == "<Ann>, your code is 4711"
    assert mail["Subject"] == "Code for <Ann>"
    html = mail.get_body(("html",))
    text = mail.get_body(("plain",))
    assert html is not None and text is not None
    assert html.get_content().strip() == ("<p>Hello &lt;Ann&gt;, your code is <b>4711</b></p>")
    assert text.get_content().strip() == "Code: 4711"
    assert whatsapp["template"] == {
        "name": "otp_code",
        "language": {"code": "en"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "4711"}]}],
    }
    assert push[0].body["message"]["notification"] == {
        "title": "Hi <Ann>",
        "body": "Your code is 4711",
    }


async def test_a_missing_variable_is_a_422_at_accept_time(tenant: Tenant) -> None:
    name = f"otp-{uuid.uuid4().hex[:6]}"
    await create(tenant, name)

    response = await tenant.client.post(
        "/v1/messages",
        json=templated(name, {"phone": "+48600100200"}, [{"channel": "sms"}], data={"code": 1}),
    )

    assert response.status_code == 422
    error = response.json()["errors"][0]
    assert error["path"] == "body.content.data"
    assert error["type"] == "missing_variable"
    assert "'name' is undefined" in error["message"]


async def test_unknown_templates_and_channels_without_a_variant_are_422(tenant: Tenant) -> None:
    name = f"sms-only-{uuid.uuid4().hex[:6]}"
    await create(tenant, name, variants={"sms": {"text": "Hi"}})

    unknown = await tenant.client.post(
        "/v1/messages", json=templated("nope", {"phone": "+48600100200"}, [{"channel": "sms"}])
    )
    no_variant = await tenant.client.post(
        "/v1/messages",
        json=templated(name, {"email": "ann@example.com"}, [{"channel": "email"}]),
    )
    both = await tenant.client.post(
        "/v1/messages",
        json=templated(name, {"phone": "+48600100200"}, [{"channel": "sms"}], text="inline"),
    )

    assert unknown.json()["errors"][0]["type"] == "unknown_template"
    assert no_variant.json()["errors"][0]["type"] == "missing_content"
    assert both.status_code == 422


async def test_the_locale_falls_back_region_then_language_then_tenant_then_english(
    tenant: Tenant, simulators: Simulators
) -> None:
    name = f"hello-{uuid.uuid4().hex[:6]}"
    for locale, text in (("en", "Hello"), ("pl", "Cześć"), ("de", "Hallo")):
        await create(tenant, name, locale, {"sms": {"text": text + " {{ n }}"}})

    async def rendered(locale: str | None) -> str:
        marker = uuid.uuid4().hex[:8]
        extra = {"locale": locale} if locale else {}
        await wait_until_final(
            tenant.client,
            await send(
                tenant.client,
                templated(
                    name,
                    {"phone": "+48600100200"},
                    [{"channel": "sms", "provider": "twilio"}],
                    data={"n": marker},
                    **extra,
                ),
            ),
        )
        return next(
            m.form["Body"]
            for m in simulators.twilio.message_submits
            if m.form.get("Body", "").endswith(marker)
        ).rsplit(" ", 1)[0]

    regional = await rendered("pl-PL")
    unknown_language = await rendered("fr")
    default = await rendered(None)
    await tenant.client.put("/v1/policy", json={"locale": "de"})
    tenant_default = await rendered("fr-CA")

    assert (regional, unknown_language, default, tenant_default) == (
        "Cześć",
        "Hello",
        "Hello",
        "Hallo",
    )
