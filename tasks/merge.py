"""Merge stage: the base checkpoint with the trained adapter folded in, as sharded safetensors
plus tokenizer, ready for any inference engine. Full and freeze runs already hold whole weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec

STAGE = "merge"


def plan(recipe, model: StageSpec, trained: StageSpec) -> StageSpec:
    return make_spec(
        STAGE,
        "merge",
        recipe.slice_for(STAGE),
        {"model": model, "train": trained},
        ["tasks.merge"],
        ("torch", "transformers", "peft", "safetensors"),
    )


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = ctx.inputs["model"] / "model"
    adapter_dir = ctx.inputs["train"] / "adapter"
    if adapter_dir.is_dir():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(base_dir))
        model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(ctx.inputs["train"] / "model"))
    model.save_pretrained(
        str(out / "model"),
        max_shard_size=f"{config['export_size']}GB",
        safe_serialization=not config["export_legacy_format"],
    )
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out / "model"))
    ctx.log.info("merged model written (%s)", "adapter merged" if adapter_dir.is_dir() else "full weights")
    return {"merged_adapter": adapter_dir.is_dir()}


@task(name="merge", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def merge_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
