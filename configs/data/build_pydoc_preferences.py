"""Build the bundled preference and feedback datasets from the `pydoc_summaries` rows.

For each function, the true one-line summary is the `chosen` reply and the summary of another function
of the same module (a plausible but wrong answer; another module's when the module has one function)
the `rejected` one. The feedback (KTO) rows label a reply true (its own summary) or false (another
function's), alternating by a hash of the function's name. Splits follow pydoc_summaries: whole
modules are train or test, so no test function or summary is seen in training.

    python configs/data/build_pydoc_preferences.py      # rewrites the four .jsonl files beside it
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stable_index(text: str, size: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % size


def module_of(source: str) -> str:
    return source.rsplit(".", 1)[0]


def wrong_summary(row: dict, rows: list[dict], by_module: dict[str, list[dict]]) -> str:
    """The summary of another function: of the same module if it has one, else of any other module."""
    pool = [r for r in by_module[module_of(row["source"])] if r["output"] != row["output"]]
    pool = pool or [r for r in rows if r["output"] != row["output"]]
    return pool[stable_index(row["source"], len(pool))]["output"]


def build(split: str) -> tuple[int, int]:
    rows = [json.loads(line) for line in (HERE / f"pydoc_summaries_{split}.jsonl").read_text().splitlines()]
    by_module: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_module[module_of(row["source"])].append(row)
    pairs, feedback = [], []
    for row in rows:
        rejected = wrong_summary(row, rows, by_module)
        prompt = {"instruction": row["instruction"], "input": row["input"]}
        pairs.append({**prompt, "chosen": row["output"], "rejected": rejected, "source": row["source"]})
        desirable = stable_index("feedback:" + row["source"], 2) == 0
        feedback.append({**prompt, "output": row["output"] if desirable else rejected, "label": desirable,
                         "source": row["source"]})
    for name, items in (("preferences", pairs), ("feedback", feedback)):
        (HERE / f"pydoc_{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return len(pairs), sum(r["label"] for r in feedback)


if __name__ == "__main__":
    for split in ("train", "test"):
        count, desirable = build(split)
        print(f"{split}: {count} pairs, {count} feedback rows ({desirable} desirable)")
