"""Data-worker features through the DAG on the tiny model: mixing, packing, preview."""

import json

import datasets
import pytest

from flows.cli import main
from flows.finetune import finetune
from tasks.core.recipe import load_recipe
from tasks.tokenize import merge_parts


def numbered(prefix: str, count: int):
    return datasets.Dataset.from_list([{"id": f"{prefix}{i}"} for i in range(count)])


def test_mix_strategies():
    a, b = numbered("a", 6), numbered("b", 2)
    assert merge_parts([a, b], "concat", None, 0)["id"] == [f"a{i}" for i in range(6)] + ["b0", "b1"]
    under = merge_parts([a, b], "interleave_under", None, 0)["id"]
    assert under == ["a0", "b0", "a1", "b1"]  # stops as soon as the shorter dataset runs out
    over = merge_parts([a, b], "interleave_over", None, 0)["id"]
    assert set(over) == {f"a{i}" for i in range(6)} | {"b0", "b1"}  # runs until the longer one is used up
    weighted = merge_parts([a, b], "interleave_under", "0.9,0.1", 3)["id"]
    assert sum(x.startswith("a") for x in weighted) > sum(x.startswith("b") for x in weighted)


@pytest.mark.parametrize("neat", [True, False])
def test_packing_through_the_dag(write_recipe, workdir, neat):
    recipe = write_recipe(neat_packing=neat, packing=not neat, cutoff_len=256, max_samples=16, val_size=4,
                          eval_dataset=None)
    summary = finetune(load_recipe(recipe))
    tokenized = workdir / "artifacts" / "tokenize" / next(s.key for s in summary.stages if s.stage == "tokenize")
    rows = datasets.load_from_disk(str(tokenized / "train"))
    stats = json.loads((tokenized / "stats.json").read_text())
    assert "position_ids" in rows.column_names and len(rows) < 12  # 12 training samples, fewer packed rows
    restarts = [sum(p == 0 for p in positions) for positions in rows["position_ids"]]
    assert max(restarts) > 1 if neat else set(restarts) == {1}  # neat: positions restart at every sample
    assert stats["train"]["max_len"] <= 256 and stats["train"]["padding_share"] < 0.3
    train_dir = workdir / "artifacts" / "train" / next(s.key for s in summary.stages if s.stage == "train")
    assert json.loads((train_dir / "train_results.json").read_text())["global_step"] >= 1


def test_data_preview_prints_marked_samples_and_statistics(capsys, write_recipe):
    assert main(["data", "preview", str(write_recipe(cutoff_len=512))]) == 0
    out = capsys.readouterr().out
    assert "| split |" in out and "padding_share" in out and "trainable_share" in out
    assert "⟦" in out and "<|im_start|>assistant\n⟦" in out  # the reply is marked trainable, the prompt is not
