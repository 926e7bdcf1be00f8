"""Batches of similar lengths: a longest-first list cut into runs that keep to a clip count
and a budget of padded audio seconds, so little of any batch is padding."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def plan_batches(
    items: list[tuple[T, float]], batch_size: int, batch_seconds: float
) -> list[list[tuple[T, float]]]:
    """Consecutive runs of a longest-first list of (item, seconds), each at most
    `batch_size` items and `batch_seconds` of padded audio (items x the longest); an item
    over the budget runs alone."""
    batches: list[list[tuple[T, float]]] = []
    for item in items:
        if (
            not batches
            or len(batches[-1]) >= batch_size
            or (len(batches[-1]) + 1) * batches[-1][0][1] > batch_seconds
        ):
            batches.append([])
        batches[-1].append(item)
    return batches
