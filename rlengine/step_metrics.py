"""`StepMetrics`: a training step's numbers, gathered on each trainer rank and reduced over the
trainer ranks in ONE collective per step.

Each key is reduced one way, named where it is added:
    mean(key, value, weight)   weighted mean over every addition on every rank
    total(key, value)          sum over every addition on every rank
    max(key, value) / min(...) extremes over ranks
"""
from __future__ import annotations

import math

import torch.distributed as dist


class StepMetrics:
    def __init__(self):
        self._acc: dict[str, tuple[str, float, float]] = {}    # key -> (kind, value, weight)

    def _add(self, kind: str, key: str, value: float, weight: float = 0.0) -> None:
        old = self._acc.get(key)
        if old is not None and old[0] != kind:
            raise ValueError(f"metric {key!r} added as {kind} and as {old[0]}")
        self._acc[key] = _combine(kind, old[1:] if old else None, (float(value), float(weight)))

    def mean(self, key: str, value: float, weight: float = 1.0) -> None:
        self._add("mean", key, float(value) * weight, weight)

    def means(self, values: dict, weight: float = 1.0) -> None:
        for key, value in values.items():
            self.mean(key, value, weight)

    def total(self, key: str, value: float) -> None:
        self._add("total", key, value)

    def max(self, key: str, value: float) -> None:
        self._add("max", key, value)

    def min(self, key: str, value: float) -> None:
        self._add("min", key, value)

    def reduce(self, group=None) -> dict[str, float]:
        """Every rank of `group` gets the same dict (one all_gather of this rank's accumulators)."""
        mine = dict(self._acc)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            everyone: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(everyone, mine, group=group)
        else:
            everyone = [mine]
        merged: dict[str, tuple[str, float, float]] = {}
        for acc in everyone:
            for key, (kind, value, weight) in acc.items():
                old = merged.get(key)
                merged[key] = _combine(kind, old[1:] if old else None, (value, weight))
        return {key: _finish(kind, value, weight) for key, (kind, value, weight) in sorted(merged.items())}


def _combine(kind: str, old: tuple[float, float] | None, new: tuple[float, float]) -> tuple[str, float, float]:
    if old is None:
        return (kind, *new)
    if kind in ("mean", "total"):
        return kind, old[0] + new[0], old[1] + new[1]
    pick = max if kind == "max" else min
    return kind, pick(old[0], new[0]), 0.0


def _finish(kind: str, value: float, weight: float) -> float:
    if kind != "mean":
        return value
    return value / weight if weight > 0 else math.nan
