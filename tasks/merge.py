"""Merge stage: the base checkpoint with the trained adapter folded in, as safetensors plus tokenizer,
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


def plan(recipe: Recipe, model: Step, trained: Step) -> Step:
    return STAGE.step("merge", MergeConfig(), {"model": model, "train": trained})


def build(config: MergeConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = ctx.inputs["model"].part("model")
    trained = ctx.inputs["train"]
    remote = remote_code(ctx.inputs["model"])
    if trained.kind == "adapter":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), **remote)
        model = PeftModel.from_pretrained(base, str(trained.part("adapter"))).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(trained.part("model")), **remote)
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
