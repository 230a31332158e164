"""Smooth weighted round-robin: shares match weights; unusable endpoints' share flows on."""

from __future__ import annotations

from collections import Counter

from streams.config import EndpointConfig
from streams.dispatch.balancer import Balancer


def _ep(name: str, weight: float, models: list[str] | None = None) -> EndpointConfig:
    return EndpointConfig(name=name, url=f"http://{name}.test/v1", weight=weight, models=models)


def test_weights_3_1_0_over_10000() -> None:
    balancer = Balancer([_ep("a", 3), _ep("b", 1), _ep("c", 0)])
    counts = Counter(balancer.pick("m").name for _ in range(10_000))  # type: ignore[union-attr]
    assert abs(counts["a"] / 10_000 - 0.75) <= 0.02
    assert abs(counts["b"] / 10_000 - 0.25) <= 0.02
    assert counts["c"] == 0


def test_smooth_interleaving() -> None:
    balancer = Balancer([_ep("a", 3), _ep("b", 1)])
    seq = "".join(balancer.pick("m").name for _ in range(40))  # type: ignore[union-attr]
    assert "aaaa" not in seq and "bb" not in seq
    assert seq.count("a") == 30


def test_unusable_endpoint_share_flows_to_the_others() -> None:
    balancer = Balancer([_ep("a", 1), _ep("b", 1), _ep("c", 2)])
    counts = Counter(
        balancer.pick("m", lambda e: e.name != "c").name  # type: ignore[union-attr]
        for _ in range(1000)
    )
    assert counts == {"a": 500, "b": 500}
    # once usable again, c gets its share at once (no catch-up burst beyond its weight)
    counts = Counter(balancer.pick("m").name for _ in range(1000))  # type: ignore[union-attr]
    assert counts == {"a": 250, "b": 250, "c": 500}


def test_models_and_weight_zero() -> None:
    balancer = Balancer(
        [_ep("any", 1), _ep("only-x", 1, ["x"]), _ep("never", 0), _ep("y", 1, ["y"])]
    )
    assert [e.name for e in balancer.candidates("x")] == ["any", "only-x"]
    assert [e.name for e in balancer.candidates("z")] == ["any"]
    picks = {balancer.pick("x").name for _ in range(10)}  # type: ignore[union-attr]
    assert picks == {"any", "only-x"}
    assert balancer.pick("x", lambda e: False) is None
    assert Balancer([_ep("zero", 0)]).candidates("x") == []


def test_invented_model_names_add_no_state_and_share_the_wildcard_rotation() -> None:
    balancer = Balancer([_ep("a", 3), _ep("b", 1), _ep("x-only", 1, ["x"])])
    rotations = len({id(r) for r in balancer._models.values()}) + 1
    picks = Counter(balancer.pick(f"made-up-{i}").name  # type: ignore[union-attr]
                    for i in range(4_000))
    assert picks == {"a": 3_000, "b": 1_000}  # the shares hold across names
    assert len(balancer._models) == 1 and rotations == 2
    assert [e.name for e in balancer.candidates("x")] == ["a", "b", "x-only"]
    assert [e.name for e in balancer.candidates("made-up-99")] == ["a", "b"]
