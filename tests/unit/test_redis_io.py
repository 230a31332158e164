"""Which Redis errors are an outage and which fail one command only (``redis_io.is_outage``)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.config import load_settings
from streams.redis_guard import CommandErrorLog, is_outage
from streams.redis_io import check_redis, redis_answers

COMMAND_ERRORS = [
    "ERR invalid expire time in 'set' command",
    "ERR value is not an integer or out of range",
    "ERR wrong number of arguments for 'set' command",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR Error running script (call to f_0123): @user_script:3: ERR invalid expire time",
    "NOSCRIPT No matching script. Please use EVAL.",
    "NOPERM this user has no permissions to run the 'eval' command",
]
OUTAGES = [
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "LOADING Redis is loading the dataset in memory",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
    "BUSY Redis is busy running a script.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "CLUSTERDOWN The cluster is down",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "NOREPLICAS Not enough good replicas to write.",
]


@pytest.mark.parametrize("reply", COMMAND_ERRORS)
def test_an_error_about_one_command_is_not_an_outage(reply: str) -> None:
    assert not is_outage(BaseParser.parse_error(reply))


@pytest.mark.parametrize("reply", OUTAGES)
def test_an_error_about_the_servers_state_is_an_outage(reply: str) -> None:
    assert is_outage(BaseParser.parse_error(reply))


def test_pipeline_annotated_errors_and_client_side_errors() -> None:
    # what redis-py raises from a pipeline run with raise_on_error=True
    annotated = "Command # 2 (SET k v EX 99999999999999999) of pipeline caused error: "
    assert not is_outage(ResponseError(annotated + "('invalid expire time in set',)"))
    assert is_outage(ResponseError(annotated + "('MISCONF unable to persist',)"))
    assert not is_outage(DataError("Invalid input of type: 'dict'"))
    for exc in (RedisConnectionError("refused"), RedisTimeoutError("slow"), OSError(),
                TimeoutError()):
        assert is_outage(exc)


def test_command_errors_are_logged_once_per_interval_without_arguments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    errors = CommandErrorLog(logging.getLogger("t"), "tests", interval=10, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="t")
    exc = ResponseError("Command # 1 (SET secret-key secret-value EX 1e99) of pipeline caused "
                        "error: invalid expire time")
    for _ in range(5):
        errors.note(exc)
    now[0] = 11
    errors.note(exc)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "(5 such errors since last report)" in lines[1]
    assert not any("secret" in line for line in lines)


class _Pinged:
    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc

    async def ping(self) -> Any:
        if self.exc is not None:
            raise self.exc
        return True


async def test_redis_that_refuses_ping_itself_still_counts_as_answering() -> None:
    settings = load_settings(environ={})
    refused = _Pinged(BaseParser.parse_error("NOPERM this user has no permissions to run "
                                             "the 'ping' command"))
    assert await check_redis(refused, settings)  # type: ignore[arg-type]
    assert await redis_answers(refused)  # type: ignore[arg-type]
    down = _Pinged(BaseParser.parse_error("LOADING Redis is loading the dataset in memory"))
    assert not await check_redis(down, settings)  # type: ignore[arg-type]
    with pytest.raises(ResponseError):
        await redis_answers(_Pinged(BaseParser.parse_error("MISCONF cannot persist")))
