"""Prompt templates: Jinja2 in its sandbox, where an undefined variable or field is an error.

A template that does not compile is a ``ConfigError`` at start (``compile_template``); a
render that fails (a missing field, a sandbox refusal, an error inside an expression) is a
``TemplateFailed`` naming the template and the field, which becomes a ``template`` dead
letter. A string without ``{{``/``{%`` is a constant and is never rendered.

Usage::

    tpl = compile_template("prompt.user", "Ticket: {{ event.subject }}", pipeline="triage")
    text = tpl.render({"event": {"subject": "refund"}})
"""

from __future__ import annotations

import re
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from streams.errors import ConfigError, TemplateFailed

# Bounds what a hostile event can make one render produce (e.g. a loop over a huge range).
MAX_RENDERED_CHARS = 1_000_000


class _Missing(jinja2.StrictUndefined):
    """StrictUndefined whose error names the missing field alone (not "'dict object' has...")."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        name = self._undefined_name
        return f"missing field {name!r}" if name is not None else str(super()._undefined_message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=_Missing, autoescape=False, keep_trailing_newline=False,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["tojson"] = _tojson  # JSON for the model, not HTML-escaped like Jinja's own
    return env


def _tojson(value: Any, indent: int | None = None) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=indent, default=str)


_ENV = _environment()


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


# Literal text and ``{{ event.a.b }}`` fields only (ids, tenants, most prompts): rendered
# without Jinja's per-render context (~10 us a template) whenever every step of every field
# is a key of a JSON object; anything else takes Jinja's own path.
_FIELD = re.compile(r"\{\{\s*event((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*\}\}")
_SENTINEL = "\x00{}\x00"

Plan = tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]  # literals (one more), field paths


def _plan(source: str, compiled: jinja2.Template) -> Plan | None:
    """The template as literal texts between field paths, or None if it is anything more.

    The literals are what Jinja itself renders around the fields (its newline handling
    included): the template is rendered once with a marker in each field and split on them.
    """
    matches = list(_FIELD.finditer(source))
    rest = _FIELD.sub("", source)
    if not matches or is_template(rest) or "\x00" in source:
        return None
    paths = list(dict.fromkeys(tuple(m.group(1)[1:].split(".")) for m in matches))
    # Jinja reads a dict's attribute before its key (event.items is the method): not ours
    if any(hasattr(dict, p) for path in paths for p in path):
        return None
    event: dict[str, Any] = {}
    for i, path in enumerate(paths):
        node = event
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if type(child) is not dict:
                return None  # a field is both a value and an object: Jinja would fail
            node = child
        if path[-1] in node:
            return None  # a value and an object
        node[path[-1]] = _SENTINEL.format(i)
    try:
        rendered = compiled.render({"event": event})
    except Exception:
        return None
    literals = re.split("\x00\\d+\x00", rendered)
    order = [int(m) for m in re.findall("\x00(\\d+)\x00", rendered)]
    if len(order) != len(matches):
        return None
    return tuple(literals), tuple(paths[i] for i in order)


class Template:
    """One compiled template (or a constant); ``where`` names it in errors."""

    __slots__ = ("where", "source", "_compiled", "_plan")

    def __init__(self, where: str, source: str, compiled: jinja2.Template | None) -> None:
        self.where = where
        self.source = source
        self._compiled = compiled
        self._plan = _plan(source, compiled) if compiled is not None else None

    @property
    def constant(self) -> bool:
        """No fields, no tags: ``render`` always returns ``source``."""
        return self._compiled is None

    def render(self, context: dict[str, Any]) -> str:
        """The rendered text; raises ``TemplateFailed`` naming this template and the field."""
        if self._compiled is None:
            return self.source
        if self._plan is not None and (text := self._fast(context)) is not None:
            return text
        try:
            text = self._compiled.render(context)
        except jinja2.UndefinedError as exc:
            raise TemplateFailed(f"{self.where}: {exc.message}") from None
        except SecurityError as exc:
            raise TemplateFailed(f"{self.where}: refused by the sandbox: {exc}") from None
        except Exception as exc:  # an error inside the template's own expression (1/0, int('x'))
            raise TemplateFailed(f"{self.where}: {type(exc).__name__}: {exc}") from None
        if len(text) > MAX_RENDERED_CHARS:
            raise TemplateFailed(f"{self.where}: rendered {len(text)} characters, over "
                                 f"{MAX_RENDERED_CHARS}")
        return text

    def _fast(self, context: dict[str, Any]) -> str | None:
        """The plan's render, or None where Jinja must answer (a step that is not a key of a
        JSON object: a missing field's error, a list's attribute, text over the limit)."""
        assert self._plan is not None
        literals, paths = self._plan
        event = context.get("event")
        parts = [literals[0]]
        for path, literal in zip(paths, literals[1:], strict=True):
            value: Any = event
            for key in path:
                if type(value) is not dict or key not in value:
                    return None
                value = value[key]
            parts.append(str(value))
            parts.append(literal)
        text = "".join(parts)
        return text if len(text) <= MAX_RENDERED_CHARS else None


def compile_template(where: str, source: str, *, pipeline: str) -> Template:
    """Compile ``source``; raises ``ConfigError`` naming the pipeline, template and problem."""
    if not is_template(source):
        return Template(where, source, None)
    try:
        return Template(where, source, _ENV.from_string(source))
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"pipeline {pipeline}: {where} does not compile: {exc.message} "
                          f"(line {exc.lineno})") from None
