"""Rendering templates: a sandboxed Jinja2 environment, strict about missing variables.

Template code is customer input: it runs in `SandboxedEnvironment` (no attribute access
to internals), with `StrictUndefined` (a missing variable is an error at accept time,
not an empty string in the customer's SMS), autoescaping for HTML only, and bounds on
the few operators that can build huge values (`'x' * 10**9`).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from providers.base import Channel

MAX_RENDERED_CHARS = 100_000
MAX_EXPONENT = 64

# Variant field → the `Content` field it fills, per channel. Fields absent here (a
# provider template's name and language) are used literally, never rendered.
CONTENT_FIELDS: Mapping[Channel, Mapping[str, str]] = {
    Channel.PUSH: {"title": "title", "body": "text"},
    Channel.MESSENGER: {"text": "text", "params": "template_params"},
    Channel.SMS: {"text": "text"},
    Channel.EMAIL: {"subject": "subject", "text": "text", "html": "html"},
}
LITERAL_FIELDS: Mapping[str, str] = {
    "template_name": "template_name",
    "template_language": "template_language",
}


class BoundedSandbox(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, op: str, left: Any, right: Any) -> Any:
        if op == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponents are limited to {MAX_EXPONENT}")
        if op == "*":
            for sequence, times in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | list | tuple)
                    and isinstance(times, int)
                    and len(sequence) * times > MAX_RENDERED_CHARS
                ):
                    raise SecurityError("the result would be too large")
        return {"*": operator.mul, "**": operator.pow}[op](left, right)


_TEXT = BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_HTML = BoundedSandbox(undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True)


class TemplateProblem(Exception):
    """A field of a variant that does not compile or render; `path` is relative."""

    def __init__(self, path: str, message: str, kind: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
        self.kind = kind


def _environment(channel: Channel, field: str) -> BoundedSandbox:
    return _HTML if channel is Channel.EMAIL and field == "html" else _TEXT


@lru_cache(maxsize=4096)
def _compiled(source: str, html: bool) -> Template:
    return (_HTML if html else _TEXT).from_string(source)


def _sources(channel: Channel, variant: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(relative path, source) of every renderable string in a variant."""
    sources: list[tuple[str, str]] = []
    for field in CONTENT_FIELDS[channel]:
        value = variant.get(field)
        if isinstance(value, str):
            sources.append((field, value))
        elif isinstance(value, list):
            sources.extend((f"{field}[{i}]", item) for i, item in enumerate(value))
    return sources


def syntax_problems(variants: Mapping[str, Mapping[str, Any]]) -> list[TemplateProblem]:
    problems = []
    for channel_name, variant in variants.items():
        channel = Channel(channel_name)
        for path, source in _sources(channel, variant):
            field = path.split("[", 1)[0]
            try:
                _compiled(source, _environment(channel, field) is _HTML)
            except TemplateSyntaxError as exc:
                problems.append(
                    TemplateProblem(
                        f"{channel_name}.{path}", f"line {exc.lineno}: {exc.message}", "syntax"
                    )
                )
    return problems


def variables(variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The top-level variables the variants use (what `data` must provide)."""
    names: set[str] = set()
    for channel_name, variant in variants.items():
        for _, source in _sources(Channel(channel_name), variant):
            names |= meta.find_undeclared_variables(_TEXT.parse(source))
    return sorted(names)


def render_variant(
    channel: Channel, variant: Mapping[str, Any], data: Mapping[str, Any]
) -> dict[str, Any]:
    """The channel's content (fields of `providers.base.Content`) with `data` filled in."""
    content: dict[str, Any] = {}
    for field, target in CONTENT_FIELDS[channel].items():
        value = variant.get(field)
        if isinstance(value, list):
            content[target] = [
                _render(channel, field, f"{field}[{i}]", item, data) for i, item in enumerate(value)
            ]
        elif isinstance(value, str):
            content[target] = _render(channel, field, field, value, data)
    for field, target in LITERAL_FIELDS.items():
        if isinstance(variant.get(field), str):
            content[target] = variant[field]
    return content


def _render(channel: Channel, field: str, path: str, source: str, data: Mapping[str, Any]) -> str:
    try:
        rendered = _compiled(source, _environment(channel, field) is _HTML).render(data)
    except SecurityError as exc:
        raise TemplateProblem(f"{channel.value}.{path}", str(exc), "unsafe") from None
    except Exception as exc:
        # Customer template code can raise anything (a missing variable, 1/0, a bad filter).
        kind = "missing_variable" if type(exc).__name__ == "UndefinedError" else "render_error"
        raise TemplateProblem(f"{channel.value}.{path}", str(exc), kind) from None
    if len(rendered) > MAX_RENDERED_CHARS:
        raise TemplateProblem(f"{channel.value}.{path}", "the rendered text is too long", "size")
    return rendered


def channel_content(stored: Mapping[str, Any], channel: Channel | str) -> dict[str, Any]:
    """A message's stored content for one channel: shared fields, then the channel's own.

    Template messages store what was rendered at accept time per channel under
    `channels`; plain messages have only the shared fields.
    """
    shared = {k: v for k, v in stored.items() if k not in ("channels", "template")}
    own = stored.get("channels", {}).get(Channel(channel).value, {})
    return {**shared, **own}
