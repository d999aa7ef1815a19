"""Adapter stage: a LoRA adapter (or a reward model) from a folder, brought into the store so training can
start from it (`adapter_name_or_path`) or score with it (`reward_model`).

The folder is keyed by its content. A reward model folder holds the adapter and its head, as this
tool's rm artifacts do (`adapter/` beside `value_head.safetensors`) or as LlamaFactory saves them (the
adapter files and `value_head.safetensors` side by side, with TRL's `v_head.summary.weight` key).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from tasks.core.errors import RecipeError
from tasks.core.hashing import tree_digest
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step

HEAD_KEYS = ("weight", "v_head.summary.weight", "score.weight")
BIAS_KEYS = ("bias", "v_head.summary.bias", "score.bias")


class AdapterConfig(StageConfig):
    source: str  # content digest of the folder
    kind: Literal["adapter", "reward_model"]


def adapter_folder(folder: Path) -> Path | None:
    """Where the adapter files are: the folder itself or its adapter/ subfolder."""
    for candidate in (folder, folder / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def plan(folder: Path, kind: str, key: str, label: str) -> Step:
    """Import `folder` for the recipe key `key`; a folder that is not an adapter (or reward model) is refused."""
    if not folder.is_dir():
        raise RecipeError(f"key '{key}': {folder} is not a folder, an artifact id or a recipe file")
    if adapter_folder(folder) is None:
        raise RecipeError(f"key '{key}': {folder} holds no LoRA adapter (adapter_config.json)")
    if kind == "reward_model" and not (folder / "value_head.safetensors").is_file():
        raise RecipeError(f"key '{key}': {folder} is not a reward model (no value_head.safetensors); train one "
                          "with stage: rm")
    return STAGE.step(label, AdapterConfig(source=tree_digest(folder), kind=kind), locators={"folder": str(folder)})


def build(config: AdapterConfig, ctx: BuildContext, out: Path) -> Built:
    from safetensors.torch import load_file, save_file

    folder = Path(ctx.locators["folder"])
    source = adapter_folder(folder)
    (out / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / "adapter" / name)
    layout = {"adapter": "adapter"}
    if config.kind == "reward_model":
        weights = load_file(str(folder / "value_head.safetensors"))
        head = next((weights[k] for k in HEAD_KEYS if k in weights), None)
        if head is None:
            raise RecipeError(f"{folder / 'value_head.safetensors'}: no head weight among {', '.join(HEAD_KEYS)}")
        kept = {"weight": head.float().reshape(1, -1).contiguous()}
        bias = next((weights[k] for k in BIAS_KEYS if k in weights), None)
        if bias is not None:  # TRL's value head (LlamaFactory's rm) has one; every reward is shifted by it
            kept["bias"] = bias.float().reshape(1).contiguous()
        save_file(kept, str(out / "value_head.safetensors"))
        layout["value_head"] = "value_head.safetensors"
    return Built(config.kind, layout, {"weights": "adapter"})


STAGE = Stage(name="adapter", plan=plan, build=build, code=("tasks.adapter",), libraries=("safetensors",))
