"""Fixtures of the fault suite: its private stack (once per session), mocks, a Stack, a fleet."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.faults.report import render
from tests.faults.stack import PrivateStack
from tests.faults.trial import ROWS, Fleet
from tests.integration.harness import Mock, Stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.faults)


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("FAULTS_RESULTS")
    if out and ROWS:
        Path(out).write_text(json.dumps([asdict(r) for r in ROWS], indent=1))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ROWS:
        terminalreporter.section("fault suite")
        terminalreporter.write_line(render(ROWS))


@pytest.fixture(scope="session")
def private_stack() -> Iterator[PrivateStack]:
    """The suite's own Kafka and Redis; stopped at the end if this session started them."""
    stack = PrivateStack.from_env()
    started = not stack.is_up()
    if started:
        stack.run("up")
    try:
        yield stack
    finally:
        if started and not os.environ.get("KEEP_STACK"):
            stack.run("down")


@pytest.fixture
def stack(tmp_path: Path, mocks: list[Mock], private_stack: PrivateStack) -> Iterator[Stack]:
    """Topics, group and config on the private stack; both servers up before and after."""
    private_stack.run("kafka-start")
    private_stack.run("redis-start")
    try:
        yield Stack(
            tmp_path,
            endpoints=[
                {"name": "mock-a", "url": f"{mocks[0].url}/v1", "timeout_seconds": 10},
                {"name": "mock-b", "url": f"{mocks[1].url}/v1", "timeout_seconds": 10},
            ],
            kafka=private_stack.bootstrap,
            redis_url=private_stack.redis_url(),
        )
    finally:  # a scenario that failed half-way must not leave a server stopped
        private_stack.run("kafka-start")
        private_stack.run("redis-start")


@pytest.fixture
def fleet(stack: Stack) -> Iterator[Fleet]:
    """Workers of one scenario; any still running at the end is killed."""
    f = Fleet(stack)
    try:
        yield f
    finally:
        f.kill_all()
