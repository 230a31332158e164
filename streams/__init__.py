"""llm-streams: a Kafka stream processor that puts LLMs behind event-driven pipelines.

The package reads like the data flow (README, "Architecture"): ``intake`` (records in, acks
out) -> ``cache`` (pay once per answer) -> ``dispatch`` (which endpoint, when, the HTTP call)
-> ``output`` (response and dead-letter records), on a shared core (``config``, ``contract``,
``errors``, ``metrics``, ``logs``, ``redact``, ``kafka_io``, ``redis_io``, ``redis_guard``);
``tools`` holds the command line.

Usage::

    from streams import load_settings
    settings = load_settings("config/default.yaml")
"""

from streams.config import Settings, load_settings
from streams.contract import Completion, Request, parse_request
from streams.errors import ConfigError, StreamsError

__all__ = [
    "Completion",
    "ConfigError",
    "Request",
    "Settings",
    "StreamsError",
    "load_settings",
    "parse_request",
]
