"""Which training checkpoint a re-run resumes from: the newest one that is complete, checked fully."""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def checkpoint_problem(path: Path, save_only_model: bool) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it can: trainer state that parses,
    weights whose safetensors headers read, and (unless save_only_model) optimizer and scheduler state."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            return "trainer_state.json has no global_step"
    except (OSError, ValueError):
        return "trainer_state.json is missing or torn"
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        if (path / "latest").is_file() and not save_only_model:  # ZeRO-3 without gathering 16-bit weights on
            return deepspeed_problem(path)  # save (a user's DeepSpeed config): the model is in its shards only
        return "no model or adapter weights"
    from safetensors import safe_open

    for file in weights:
        if file.suffix == ".json":
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # a torn or truncated safetensors file
            return f"{file.name} does not read ({type(exc).__name__})"
    for file in sorted(path.glob("rng_state*.pth")):  # one per rank; a torn one fails every resume's load
        if not is_zip(file):
            return f"{file.name} is torn"
    if not save_only_model and (path / "latest").is_file():  # DeepSpeed: optimizer state sharded per rank
        return deepspeed_problem(path)
    if not save_only_model:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not is_zip(path / name):
                return f"{name} is missing or torn (the optimizer would restart from scratch)"
    return None


def is_zip(file: Path) -> bool:
    """Whether a torch.save file is whole: it writes a zip, and a torn one has no directory."""
    try:
        zipfile.ZipFile(file).close()
        return True
    except (OSError, zipfile.BadZipFile):
        return False


def deepspeed_problem(path: Path) -> str | None:
    """Why a DeepSpeed checkpoint cannot be resumed from: the tag `latest` names, its model and optimizer shards."""
    tag = (path / "latest").read_text().strip()
    shards = sorted((path / tag).glob("*optim_states.pt")) if tag else []
    if not shards or not sorted((path / tag).glob("*model_states.pt")):
        return f"DeepSpeed state {tag or '(no tag)'} is missing its model or optimizer shards"
    for file in [*shards, path / "scheduler.pt"]:
        if not is_zip(file):
            return f"{file.name} is missing or torn (the optimizer would restart from scratch)"
    return None


def numbered_checkpoints(staging: Path) -> list[Path]:
    """The checkpoint-N folders under staging, oldest (lowest N) first."""
    numbered = [p for p in staging.glob(f"{CHECKPOINT_PREFIX}*") if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    return sorted(numbered, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def latest_usable_checkpoint(staging: Path, save_only_model: bool, log: logging.Logger | logging.LoggerAdapter):
    """The newest checkpoint-N under staging that passes `checkpoint_problem`; unusable ones are removed."""
    for path in reversed(numbered_checkpoints(staging)):
        problem = checkpoint_problem(path, save_only_model)
        if problem is None:
            log.info("resuming training from %s", path.name)
            return path
        log.warning("not resuming from %s: %s; trying an older checkpoint", path.name, problem)
        shutil.rmtree(path, ignore_errors=True)  # killed while saving: never resume from it
    return None
