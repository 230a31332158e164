"""Smooth weighted round-robin (nginx style) over the endpoints that serve a model.

Each pick adds every usable endpoint's weight to its running score, takes the highest and
subtracts the round's total from the winner. Over any window the picks interleave in
proportion to the weights (3:1 gives a a b a a a b a ..., never aaab bursts). An endpoint
that is not usable for this pick (cooling down, saturated, excluded for a retry) is skipped
without being credited, so its share flows to the others. Weight 0 means never.

State is kept per set of serving endpoints, so requests for one model do not skew the
shares of another when the sets of endpoints serving them differ. The sets are fixed by the
config: a model named in some endpoint's ``models`` has its own, every other model shares
the set of endpoints without ``models``. Model names invented by requests add no state.

Usage::

    balancer = Balancer(settings.endpoints)
    endpoint = balancer.pick("gpt-4o-mini", lambda e: e.name not in cooling)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from streams.config import EndpointConfig


class _Rotation:
    __slots__ = ("endpoints", "current")

    def __init__(self, endpoints: list[EndpointConfig]) -> None:
        self.endpoints = endpoints
        self.current = [0.0] * len(endpoints)


class Balancer:
    """Picks endpoints for a model by weight; not thread-safe (one event loop)."""

    def __init__(self, endpoints: Sequence[EndpointConfig]) -> None:
        # Weight-0 endpoints are left out entirely: they are never picked.
        live = [e for e in endpoints if e.weight > 0]
        by_set: dict[tuple[str, ...], _Rotation] = {}

        def rotation(members: list[EndpointConfig]) -> _Rotation:
            key = tuple(e.name for e in members)
            return by_set.setdefault(key, _Rotation(members))

        self._any = rotation([e for e in live if e.models is None])
        named = {m for e in endpoints for m in e.models or ()}
        self._models = {m: rotation([e for e in live if e.serves(m)]) for m in named}

    def _rotation(self, model: str) -> _Rotation:
        return self._models.get(model, self._any)

    def candidates(self, model: str) -> list[EndpointConfig]:
        """Every endpoint that could ever serve ``model`` (serves it, weight > 0)."""
        return self._rotation(model).endpoints

    def pick(
        self, model: str, usable: Callable[[EndpointConfig], bool] | None = None
    ) -> EndpointConfig | None:
        """The next endpoint for ``model`` among those ``usable`` says yes to, or None."""
        state = self._rotation(model)
        current = state.current
        total = 0.0
        best = -1
        for i, endpoint in enumerate(state.endpoints):
            if usable is not None and not usable(endpoint):
                continue
            current[i] += endpoint.weight
            total += endpoint.weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return state.endpoints[best]
