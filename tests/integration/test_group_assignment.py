"""Workers joining a settled group one at a time each get a share of the partitions.

faust's assignor (with its default table standby replica) let the first workers keep
``ceil(partitions / workers)`` each, so the third of three workers on the 4 partitions got none
(CI's rate-quota test: 0, 2, 2 for 60 s). ``streams/intake/assignor.py``: shares differ by at
most one, however the workers joined and left.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.harness import Stack, settled_shares, start_worker

pytestmark = pytest.mark.integration

PARTITIONS = 4  # the Stack's requests topic


async def test_workers_joining_one_at_a_time_each_get_a_share(tmp_path: Path) -> None:
    stack = Stack(tmp_path, endpoints=[{"name": "ep", "url": "http://127.0.0.1:9/v1"}])
    workers = []
    seen = []
    try:
        for _ in range(3):
            workers.append(start_worker(stack))
            await workers[-1].ready()
            seen.append(sorted(await settled_shares(workers, PARTITIONS)))
        workers.pop(0).stop()  # the first one leaves
        seen.append(sorted(await settled_shares(workers, PARTITIONS)))
    finally:
        for w in workers:
            w.stop()
    assert seen == [[4], [2, 2], [1, 1, 2], [2, 2]]
