"""Export stage: the merged model re-saved as the user asks (shard size, legacy .bin format, infer_dtype), for
`export_dir`, with the training template as its chat template and the template's stop words as its end of
sequence, and an Ollama Modelfile (tasks.ollama). Cached like every stage, so a repeated export only
copies files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core.hardware import has_cuda, storage_dtype, torch_dtype
from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step, unkeyed
from tasks.ollama import modelfile
from tasks.templates.choice import TemplateChoice
from tasks.templates.encode import stop_token_ids
from tasks.templates.jinja import to_jinja


class ExportConfig(StageConfig):
    shard_size_gb: int
    legacy_format: bool  # pytorch_model.bin instead of safetensors
    # what training formatted with, options included: written as the tokenizer's chat template unless it resolves
    # to the tokenizer's own (`auto`), and its stop words as the generation config's end-of-sequence ids
    template: TemplateChoice
    dtype: str  # infer_dtype, resolved as the imported model is stored (a full fine-tune trains in fp32)
    device: str = unkeyed("cpu", "where the weights are loaded to be re-saved; the bytes are the same")


def plan(recipe: Recipe, merged: Step) -> Step:
    e = recipe.export
    choice = TemplateChoice.of(recipe.data)
    config = ExportConfig(shard_size_gb=e.export_size, legacy_format=e.export_legacy_format,
                          template=choice,
                          dtype=storage_dtype(recipe.model.infer_dtype), device=e.export_device)
    return STAGE.step("export", config, {"model": merged})


def save_legacy(model, folder: Path, max_shard_size: str) -> None:
    """PyTorch .bin shards with their index, as transformers 4 wrote them (transformers 5 only writes
    safetensors); the split follows huggingface_hub's, so loaders find the shards the usual way. The tensors
    are those transformers' own save writes, under the checkpoint's names: it undoes the conversions it makes
    on loading (a Mixtral's experts are fused in memory, one tensor per expert on disk), and they are on the
    CPU whatever device the model is on."""
    import shutil
    import tempfile

    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as saved:
        model.save_pretrained(saved)
        state = {name: tensor for file in sorted(Path(saved).glob("*.safetensors"))
                 for name, tensor in load_file(str(file)).items()}
        for file in Path(saved).iterdir():  # config, generation config, a remote-code model's own modules
            if not file.name.startswith("model.safetensors") and file.suffix != ".safetensors":
                shutil.copy(file, folder / file.name)
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, folder / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def build(config: ExportConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = ctx.inputs["model"].part("model")
    device = "cuda" if config.device == "auto" and has_cuda() else "cpu"
    remote = remote_code(ctx.inputs["model"])
    quantized = "quantization_config" in json.loads((source / "config.json").read_text())  # its dtype is its own
    dtype = "auto" if quantized else torch_dtype(config.dtype)  # as LlamaFactory's export casts to infer_dtype
    model = AutoModelForCausalLM.from_pretrained(str(source), device_map=device, dtype=dtype, **remote)
    tokenizer = AutoTokenizer.from_pretrained(str(source), **remote)
    template = config.template.load(tokenizer)
    stops = stop_token_ids(tokenizer, template)
    end_at_turns_end(model, tokenizer.eos_token_id, stops)
    if config.legacy_format:
        save_legacy(model, out / "model", f"{config.shard_size_gb}GB")
    else:
        model.save_pretrained(str(out / "model"), max_shard_size=f"{config.shard_size_gb}GB")
    if not template.jinja:  # apply_chat_template renders what the model learned
        tokenizer.chat_template = to_jinja(template)
    tokenizer.save_pretrained(str(out / "model"))
    context = getattr(model.config, "max_position_embeddings", None)
    (out / "model" / "Modelfile").write_text(modelfile(template, tokenizer, stops, context), encoding="utf-8")
    return Built("exported_model", {"model": "model"}, config.keyed())


def end_at_turns_end(model, eos_id: int | None, stop_ids: list[int]) -> None:
    """The generation config's eos_token_id lists every id that ends a reply: EOS first, then the ids the model
    shipped (Qwen2.5-Instruct's <|endoftext|>), then the template's stop words (llama3's <|eot_id|> with a base
    model's <|end_of_text|>), so generate(), vLLM and TGI stop at the turn's end as TuneFactory's own chat does,
    not run on into the next turn."""
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return
    shipped = generation.eos_token_id
    shipped = list(shipped) if isinstance(shipped, (list, tuple)) else [shipped]
    ids = list(dict.fromkeys(i for i in [eos_id, *shipped, *stop_ids] if i is not None))
    if ids:
        generation.eos_token_id = ids[0] if len(ids) == 1 else ids


STAGE = Stage(
    name="export",
    plan=plan,
    build=build,
    code=("tasks.export", "tasks.templates", "tasks.ollama"),
    libraries=("torch", "transformers", "safetensors", "huggingface-hub"),
    heavy=True,
)
