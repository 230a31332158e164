from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Mock, Stack
from tests.integration.redis_cluster import LocalCluster


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local Redis Cluster (3 masters, 3 replicas), started once for the session's tests that
    ask for it; a test that kills a node restores the six before it ends."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
