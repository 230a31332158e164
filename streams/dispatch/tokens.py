"""Token estimates: what a request will cost in tokens before the upstream says (for tpm limits).

Usage::

    tokens = estimate_tokens(req.chat_messages(), req.params)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Completion budget assumed when a request sets no max_tokens; corrected after the call.
DEFAULT_COMPLETION_TOKENS = 256


def estimate_tokens(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> int:
    """Offline token estimate: ~4 characters per token over the prompt, plus the completion.

    No tokenizer is downloaded; the tpm charge is corrected from the response's usage.
    """
    prompt, completion = estimate_parts(messages, params)
    return prompt + completion


def estimate_parts(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
                   ) -> tuple[int, int]:
    """``estimate_tokens`` as (prompt, completion): what a price applies to."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                chars += len(text) if isinstance(text, str) else 0
    prompt = chars // 4 + 4 * len(messages) + 3  # per-message framing, as OpenAI counts it
    completion = DEFAULT_COMPLETION_TOKENS
    for key in ("max_completion_tokens", "max_tokens"):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            completion = value
            break
    choices = params.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
        completion *= choices
    return prompt, completion
