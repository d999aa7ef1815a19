"""What the tokenize stage reports about its output: length statistics, padding share, a preview."""

from __future__ import annotations

import random
import statistics

from tasks.packing import padding_share
from tasks.templates.show import CLOSE, OPEN, mark_trained


def length_stats(lengths: list[int], trainable: list[int]) -> dict[str, float]:
    """Rows, tokens, mean/max length and the share of tokens that carry loss."""
    if not lengths:
        return {"rows": 0}
    return {"rows": len(lengths), "tokens": sum(lengths), "mean_len": round(statistics.mean(lengths), 1),
            "max_len": max(lengths), "trainable_share": round(sum(trainable) / max(sum(lengths), 1), 4)}


def shuffled_padding_share(lengths: list[int], batch_size: int, seed: int) -> float:
    """Share of pad tokens when rows are batched in a seeded random order, as the trainer samples them."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return round(padding_share([lengths[i] for i in order], batch_size), 4)


def preview_markdown(tokenizer, rows, stats: dict, count: int = 3) -> str:
    """A markdown report: length statistics per split and a few decoded samples, trainable spans marked."""
    lines = ["# Tokenized data", "", "| split | " + " | ".join(next(iter(stats.values()), {})) + " |"]
    lines.append("|---" * (1 + len(next(iter(stats.values()), {}))) + "|")
    lines += [f"| {split} | " + " | ".join(str(v) for v in values.values()) + " |" for split, values in stats.items()]
    lines += ["", f"## First {min(count, len(rows))} training samples ({OPEN}trainable{CLOSE})", ""]
    for index in range(min(count, len(rows))):
        text = mark_trained(tokenizer, rows[index]["input_ids"], rows[index]["labels"])
        lines += [f"### sample {index}", "", "```", text, "```", ""]
    return "\n".join(lines)
