"""Export stage: the merged model re-saved as the user asks (shard size, legacy .bin format), for
`export_dir`. Cached like every stage, so a repeated export only copies files.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step


class ExportConfig(StageConfig):
    shard_size_gb: int
    legacy_format: bool  # pytorch_model.bin instead of safetensors


def plan(recipe: Recipe, merged: Step) -> Step:
    e = recipe.export
    config = ExportConfig(shard_size_gb=e.export_size, legacy_format=e.export_legacy_format)
    return STAGE.step("export", config, {"model": merged})


def save_legacy(model, folder: Path, max_shard_size: str) -> None:
    """PyTorch .bin shards with their index, as transformers 4 wrote them (transformers 5 only writes
    safetensors); the split follows huggingface_hub's, so loaders find the shards the usual way."""
    import json

    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, folder / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(str(folder))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(folder))


def build(config: ExportConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = ctx.inputs["model"].part("model")
    model = AutoModelForCausalLM.from_pretrained(str(source))
    if config.legacy_format:
        save_legacy(model, out / "model", f"{config.shard_size_gb}GB")
    else:
        model.save_pretrained(str(out / "model"), max_shard_size=f"{config.shard_size_gb}GB")
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out / "model"))
    return Built("exported_model", {"model": "model"}, config.keyed())


STAGE = Stage(
    name="export",
    plan=plan,
    build=build,
    code=("tasks.export",),
    libraries=("torch", "transformers", "safetensors", "huggingface-hub"),
    heavy=True,
)
