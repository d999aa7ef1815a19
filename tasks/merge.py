"""Merge stage: the base checkpoint with the trained adapter folded in (after the adapter it started from, when
create_new_adapter merged that one into the base for training), as safetensors plus tokenizer,
ready for any inference engine. Full and freeze runs already hold whole weights: they are re-saved.

The merged artifact has one canonical layout, so its content (and what evaluation keys on) does not
depend on export options; the export stage writes the shard size and format a user asks for.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step


class MergeConfig(StageConfig):
    """Nothing to choose: what is merged follows from the train artifact's kind."""


def plan(recipe: Recipe, model: Step, trained: Step, start: Step | None = None) -> Step:
    """The merge of `trained` into `model`; `start` is the adapter training started from (adapter_name_or_path)."""
    inputs = {"model": model, "train": trained}
    lora = getattr(trained.config, "lora", None)
    if start is not None and lora is not None and lora.create_new_adapter:
        inputs["start"] = start  # training merged it into the base first: so does the merge
    return STAGE.step("merge", MergeConfig(), inputs)


def build(config: MergeConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = ctx.inputs["model"].part("model")
    trained = ctx.inputs["train"]
    remote = remote_code(ctx.inputs["model"])
    if trained.kind == "adapter":
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **remote)
        if "start" in ctx.inputs:  # create_new_adapter: the adapter training started from, then the new one
            model = PeftModel.from_pretrained(model, str(ctx.inputs["start"].part("adapter"))).merge_and_unload()
        model = PeftModel.from_pretrained(model, str(trained.part("adapter"))).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(trained.part("model")), **remote)
        model.config.use_cache = True  # the Trainer saved its training-time false; inference wants the KV cache
    model.save_pretrained(str(out / "model"))
    AutoTokenizer.from_pretrained(str(base_dir), **remote).save_pretrained(str(out / "model"))
    ctx.log.info("merged model written (%s)", "adapter merged" if trained.kind == "adapter" else "full weights")
    return Built("merged_model", {"model": "model"}, {"from": trained.kind, **remote})


STAGE = Stage(
    name="merge",
    plan=plan,
    build=build,
    code=("tasks.merge",),
    libraries=("torch", "transformers", "peft", "safetensors"),
    heavy=True,
)
