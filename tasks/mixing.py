"""Merging several datasets (materialized or streaming) into one, as mix_strategy says."""

from __future__ import annotations

from collections.abc import Sequence


def merge_parts(parts: list, strategy: str | None, probs: Sequence[float] | None, seed: int | None):
    """Merge datasets: concatenate, or interleave until the first (under) or last (over) runs out."""
    import datasets

    if len(parts) == 1 or strategy in (None, "concat"):
        return datasets.concatenate_datasets(parts)
    stopping = "first_exhausted" if strategy == "interleave_under" else "all_exhausted"
    weights = list(probs) if probs else None
    return datasets.interleave_datasets(parts, probabilities=weights, seed=seed, stopping_strategy=stopping)
