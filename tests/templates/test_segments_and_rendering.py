"""SMS segment counts and the sandboxed renderer, with no I/O."""

from __future__ import annotations

import pytest

from app.templates.rendering import TemplateProblem, render_variant, syntax_problems, variables
from app.templates.segments import sms_segments
from providers.base import Channel


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        ("", "gsm7", 0, 0),
        ("a" * 160, "gsm7", 160, 1),
        ("a" * 161, "gsm7", 161, 2),
        ("a" * 306, "gsm7", 306, 2),
        ("a" * 307, "gsm7", 307, 3),
        ("€" * 80, "gsm7", 160, 1),  # extension characters cost two septets
        ("Zażółć", "ucs2", 6, 1),  # Polish diacritics are not GSM-7
        ("ż" * 70, "ucs2", 70, 1),
        ("ż" * 71, "ucs2", 71, 2),
        ("😀" * 35, "ucs2", 70, 1),  # astral characters are two UTF-16 units
    ],
)
def test_segments(text: str, encoding: str, units: int, segments: int) -> None:
    counted = sms_segments(text)
    assert (counted.encoding, counted.units, counted.segments) == (encoding, units, segments)


def test_an_escape_pair_is_never_split_across_parts() -> None:
    # 152 plain septets then "€" (2): the pair would straddle the first 153-septet part.
    assert sms_segments("a" * 152 + "€" + "a" * 10).segments == 2
    assert sms_segments("a" * 152 + "€" + "a" * 152).segments == 3


def test_a_surrogate_pair_is_never_split_across_parts() -> None:
    assert sms_segments("ż" * 66 + "😀" + "ż" * 66).segments == 3


def test_html_is_escaped_and_text_is_not() -> None:
    variant = {"subject": "Hi {{ name }}", "text": "Hi {{ name }}", "html": "<p>{{ name }}</p>"}
    rendered = render_variant(Channel.EMAIL, variant, {"name": "<Ann & Bob>"})
    assert rendered == {
        "subject": "Hi <Ann & Bob>",
        "text": "Hi <Ann & Bob>",
        "html": "<p>&lt;Ann &amp; Bob&gt;</p>",
    }


def test_a_missing_variable_is_an_error_not_an_empty_string() -> None:
    with pytest.raises(TemplateProblem) as caught:
        render_variant(Channel.SMS, {"text": "Code {{ code }}"}, {})
    assert caught.value.kind == "missing_variable"
    assert caught.value.path == "sms.text"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ 'x' * 1000000000 }}",
        "{{ 10 ** 100000 }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_the_sandbox_refuses_unsafe_or_huge_expressions(source: str) -> None:
    with pytest.raises(TemplateProblem):
        render_variant(Channel.SMS, {"text": source}, {})


def test_messenger_params_are_rendered_and_template_names_are_not() -> None:
    variant = {"template_name": "otp_{{ x }}", "params": ["{{ code }}", "{{ minutes }} min"]}
    rendered = render_variant(Channel.MESSENGER, variant, {"code": "4711", "minutes": 5})
    assert rendered == {"template_params": ["4711", "5 min"], "template_name": "otp_{{ x }}"}


def test_syntax_errors_and_variables_are_found_before_any_send() -> None:
    variants = {"sms": {"text": "Hi {{ name"}, "push": {"title": "{{ a }}", "body": "{{ b.c }}"}}
    problems = syntax_problems(variants)
    assert [(p.path, p.kind) for p in problems] == [("sms.text", "syntax")]
    assert variables({"push": variants["push"]}) == ["a", "b"]
