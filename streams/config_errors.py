"""Configuration error messages that name the key and never echo a secret.

Usage::

    raise ConfigError(format_error(validation_error, raw_data)) from None
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from streams.redact import Redactor, url_secrets

# Keys whose values may be secrets: masked in any error text, just in case.
_SECRET_KEY = re.compile(r"pass|secret|token|key", re.IGNORECASE)
# A quoted token in a PyYAML problem ('found undefined alias %r'): a value starting with
# '*', '&' or '!' would be printed whole; one or two characters say enough.
_QUOTED = re.compile(r"'[^'\s]{3,}'|\"[^\"\s]{3,}\"")


def _suspects(data: Any, budget: int = 100_000) -> list[str]:
    """Strings in raw config data that may be secrets: values of secret-looking keys and
    passwords in URLs (and their query parameters). Only used to mask error text; the walk
    is bounded (YAML aliases can make a small file a huge tree)."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [("", data)]
    while stack and budget > 0:
        budget -= 1
        key, node = stack.pop()
        if isinstance(node, Mapping):
            stack += [(str(k), v) for k, v in node.items()]
        elif isinstance(node, list | tuple):
            stack += [(key, v) for v in node]
        elif isinstance(node, str):
            if _SECRET_KEY.search(key):
                found.append(node)
            found += url_secrets(node)
    return found


def format_error(exc: ValidationError, data: Any) -> str:
    """One line naming the first invalid key, with anything that could be a secret masked."""
    err = exc.errors()[0]
    loc = ".".join(str(p)[:64] for p in err["loc"]) or "(root)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    # pydantic's messages do not quote the input (its str() does: never used), but a
    # validator's own message might: mask whatever in the input could be a secret.
    return Redactor(_suspects(data))(f"invalid config key {loc}: {err['msg']}{more}")


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what is wrong, never the text there: PyYAML's str() quotes the lines
    around the error, and a password may sit on them."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None)
    what = _QUOTED.sub("'...'", str(problem)) if problem else type(exc).__name__
    return f"{where}: {what}"
