from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.harness import Mock, Stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def stack(tmp_path: Path, mocks: list[Mock]) -> Stack:
    return Stack(
        tmp_path,
        endpoints=[
            {"name": "mock-a", "url": f"{mocks[0].url}/v1", "weight": 3, "timeout_seconds": 5},
            {"name": "mock-b", "url": f"{mocks[1].url}/v1", "weight": 1, "timeout_seconds": 5},
        ],
    )
