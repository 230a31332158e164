"""faust's partition assignor, with every worker's share of a topic within one of the others'.

faust's ``CopartitionedAssignor`` keeps each worker's partitions (sticky) up to a capacity,
then hands out the rest round robin over the workers sorted once. With table standby
replicas on (faust's default, 1) the capacity is ``ceil(partitions / workers)``, and a worker
joining a settled group could get none: 4 partitions, 3 workers joining one at a time gave
2, 2, 0. The app runs without standbys (we keep no tables), so the capacity is ``floor``;
the round robin can still leave shares two apart (9 partitions, 4 workers: 3, 3, 2, 1).
After faust's assignment, ``BalancedAssignor`` moves partitions one at a time from the
largest share to the smallest until they differ by at most one: the fewest moves, so a
rebalance still keeps most partitions where they were.

Usage::

    faust.App(..., table_standby_replicas=0, PartitionAssignor=PartitionAssignor)
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from faust.assignor import partition_assignor as upstream
from faust.assignor.client_assignment import CopartitionedAssignment
from faust.assignor.copartitioned_assignor import CopartitionedAssignor


def balance(clients: list[CopartitionedAssignment]) -> None:
    """Move active partitions from the largest share to the smallest until they differ by
    at most one (standbys are left as they are: a client never takes one it stands by for)."""
    while clients:
        most = max(clients, key=lambda c: len(c.actives))
        least = min(clients, key=lambda c: len(c.actives))
        if len(most.actives) - len(least.actives) <= 1:
            return
        movable = sorted(most.actives - least.standbys)
        if not movable:
            return
        most.unassign_partition(movable[-1], active=True)
        least.assign_partition(movable[-1], active=True)


class BalancedAssignor(CopartitionedAssignor):
    """faust's copartitioned assignor, then ``balance``."""

    def get_assignment(self) -> MutableMapping[str, CopartitionedAssignment]:
        out = super().get_assignment()
        balance(list(out.values()))
        return out


_NAME = "CopartitionedAssignor"


@contextmanager
def _balanced() -> Iterator[None]:
    # faust's _perform_assignment builds its CopartitionedAssignor by this module name; the
    # assignment runs synchronously, so nothing else sees the swap
    saved = vars(upstream)[_NAME]
    setattr(upstream, _NAME, BalancedAssignor)
    try:
        yield
    finally:
        setattr(upstream, _NAME, saved)


class PartitionAssignor(upstream.PartitionAssignor):
    """faust's assignor with ``BalancedAssignor`` for every copartitioned group."""

    def _perform_assignment(self, cluster: Any, member_metadata: Any) -> Any:
        with _balanced():
            return super()._perform_assignment(cluster, member_metadata)
