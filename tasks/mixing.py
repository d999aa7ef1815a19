"""Merging several datasets (materialized or streaming) into one, as mix_strategy says."""

from __future__ import annotations


def merge_parts(parts: list, strategy: str, probs: str | None, seed: int):
    """Merge datasets: concatenate, or interleave until the first (under) or last (over) runs out."""
    import datasets

    if len(parts) == 1 or strategy == "concat":
        return datasets.concatenate_datasets(parts)
    weights = [float(p) for p in probs.split(",")] if probs else None
    stopping = "first_exhausted" if strategy == "interleave_under" else "all_exhausted"
    return datasets.interleave_datasets(parts, probabilities=weights, seed=seed, stopping_strategy=stopping)
