"""Cache keys: a hash of everything that changes an answer, scoped by tenant.

The key never contains the prompt: only a tenant tag (a hash of the tenant name, or ``_``)
and a digest of the canonical request. Two requests get the same key exactly when they
would get the same answer from the same model: same tenant, model, normalized messages and
output-relevant parameters. Parameter order and JSON key order never matter.

The idempotency store has keys of its own: ``idem_key`` scopes a request id by its tenant
(tag and digest), and ``fingerprint`` digests a request's whole content, so an id reused
with other content is told apart from a redelivery.

Hash tags (Redis Cluster, ``redis.cluster: true``). A cluster stores a key on the shard of its
slot, the CRC16 of the key or, when the key holds ``{...}``, of the text between the first ``{``
and the next ``}`` (its hash tag). A Lua script or ``MGET`` may only touch keys of one slot, so:

- Keys that one script or one multi-key command touches together share one hash tag. The rate
  limiter's keys (the global ``rps`` with every endpoint's ``rpm``/``tpm``/``conc``, checked in
  one script) are ``{prefix}:rl:...`` and the cooldowns' (``until`` and ``probe``, one script;
  all of them in one ``MGET``) ``{prefix}:cd:...``: one tag, ``redis_cluster.shared_tag``, on
  one shard. (These names predate cluster support: the single-server keys are unchanged.)
- Keys touched one at a time carry no tag, so they spread over every slot: the cache
  (``{prefix}:c:...`` below, no braces in the real key), locks (``:l:``) and idempotency
  records (``:r:``). Their batched reads are split per slot (``redis_cluster.mget_by_slot``).
- A new family follows the same rule: a tenant's budget windows checked in one script share
  a tag of that tenant, ``{prefix:b:<tenant_tag>}:...`` (tenants spread over the shards); a
  script that checks a budget together with the rate limits must use the limiter's tag
  instead. ``redis.key_prefix`` may hold no braces in cluster mode (config validation).

Usage::

    key = cache_key(req, settings.cache.normalize)   # "3f2a...c1:9be0...42"
    redis_key = f"{prefix}:c:{key}"
    f"{prefix}:r:{idem_key(req.tenant, req.id)}", fingerprint(req, source_topic)
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import orjson

from streams.config import NormalizeConfig
from streams.contract import Request

# Bump when the canonical form changes, so old entries are never read with new meaning.
KEY_VERSION = "v1"
IDEM_VERSION = "i1"
_IDEM_PERSON = b"llmstreams-" + IDEM_VERSION.encode()
FINGERPRINT_SIZE = 16  # bytes

# Parameters that do not change the answer. Everything else in params is part of the key:
# an unknown parameter may change the output, and a spurious miss costs money once while a
# wrong hit returns a wrong answer forever (until TTL).
IGNORED_PARAMS = frozenset(
    {
        "user",
        "metadata",
        "stream_options",
        "timeout",
        "request_timeout",
        "store",
        "prompt_cache_key",
        "safety_identifier",
        "extra_headers",
    }
)

NO_TENANT = "_"


def _hex(data: bytes, size: int) -> str:
    return hashlib.blake2b(data, digest_size=size).hexdigest()


@functools.lru_cache(maxsize=4096)  # tenants are few; this runs for every record
def tenant_tag(tenant: str | None) -> str:
    """The key namespace of a tenant: 16 hex chars, or ``_`` for requests without one.

    Hashed so that any tenant string (with ':' or '*') makes a safe, bounded key segment;
    ``SCAN MATCH {prefix}:c:{tag}:*`` still finds one tenant's entries.
    """
    if not tenant:
        return NO_TENANT
    return _hex(tenant.encode("utf-8"), 8)


def normalize_text(text: str, normalize: NormalizeConfig) -> str:
    """Apply the configured text normalization (whitespace collapse, case folding)."""
    if normalize.whitespace:
        text = " ".join(text.split())
    if normalize.case_fold:
        text = text.casefold()
    return text


def _normalize_messages(
    messages: list[dict[str, Any]], normalize: NormalizeConfig
) -> list[dict[str, Any]]:
    if not (normalize.whitespace or normalize.case_fold):
        return messages
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            msg = {**msg, "content": normalize_text(content, normalize)}
        elif isinstance(content, list):
            parts = [
                {**p, "text": normalize_text(p["text"], normalize)}
                if isinstance(p, dict) and isinstance(p.get("text"), str)
                else p
                for p in content
            ]
            msg = {**msg, "content": parts}
        out.append(msg)
    return out


def _canonical_numbers(value: Any) -> Any:
    # temperature=1 and temperature=1.0 ask for the same thing; JSON spells them differently.
    # bool is an int subclass but True must stay True, so only real floats are touched.
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {k: _canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical_numbers(v) for v in value]
    return value


def _dumps(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        # orjson refuses integers beyond 64 bits (valid JSON, rare); the stdlib does not.
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def cache_key(req: Request, normalize: NormalizeConfig) -> str:
    """``"{tenant_tag}:{digest}"`` of a request; 128-bit blake2b digest in hex.

    The tenant is hashed into the digest as well as into the prefix, so even a key built
    by hand under the wrong tag cannot match another tenant's entry.
    """
    if req.kind == "embedding":
        return embedding_key(req)
    params = {k: v for k, v in req.params.items() if k not in IGNORED_PARAMS}
    doc = [
        KEY_VERSION,
        req.tenant or None,
        req.model,
        _normalize_messages(req.chat_messages(), normalize),
        _canonical_numbers(params),
    ]
    return f"{tenant_tag(req.tenant)}:{_hex(_dumps(doc), 16)}"


def idem_key(tenant: str | None, request_id: str) -> str:
    """``"{tenant_tag}:{digest}"`` of a request id in its tenant, for the idempotency store.

    As in ``cache_key``, the tenant is in the digest too: no id of one tenant can name
    another tenant's record. Ids are unbounded user strings, hence the hash.
    """
    t = (tenant or "").encode("utf-8")
    h = hashlib.blake2b(len(t).to_bytes(2, "big") + t, digest_size=16, person=_IDEM_PERSON)
    h.update(request_id.encode("utf-8"))  # the tenant's length first: no two pairs collide
    return f"{tenant_tag(tenant)}:{h.hexdigest()}"


def fingerprint(req: Request, topic: str) -> bytes:
    """16-byte digest of a request record's whole content and the topic it came from.

    Every field of the parsed request counts (``metadata``, ``priority``, ``deadline``,
    cache control...), unknown fields do not (they are dropped at parsing); JSON key order
    and whitespace do not either. So a redelivery has the fingerprint of the original, and
    an id reused with any other content does not. (Valid JSON has no NaN or Infinity, which
    orjson would write as null; validation rejects them.)
    """
    # Fields added since (``kind``, ``batch_api``) count only when set away from their
    # default: a request's print is what it was before they existed, so records already
    # remembered stay redeliveries after an upgrade.
    if req.kind == "chat" and req.batch_api is None:  # the common case, without a set built
        exclude: set[str] | None = _ALL_ADDED
    else:
        exclude = {name for name, default in _ADDED_FIELDS if getattr(req, name) == default} or None
    doc = [IDEM_VERSION, topic, req.model_dump(exclude=exclude)]
    return hashlib.blake2b(_dumps(doc), digest_size=FINGERPRINT_SIZE).digest()


_ADDED_FIELDS = (("kind", "chat"), ("batch_api", None))
_ALL_ADDED = {name for name, _ in _ADDED_FIELDS}
EMBEDDING_KEY_VERSION = "e1"


def embedding_key(req: Request) -> str:
    """``"{tenant_tag}:{digest}"`` of one embedding input: tenant, model, the exact input
    (no normalization: any character may change a vector), ``dimensions`` and
    ``encoding_format`` (``user`` changes nothing)."""
    params = req.params
    doc = [
        EMBEDDING_KEY_VERSION,
        req.tenant or None,
        req.model,
        req.input,
        params.get("dimensions"),
        params.get("encoding_format") or "float",
    ]
    return f"{tenant_tag(req.tenant)}:{_hex(_dumps(doc), 16)}"
