"""Planning a recipe never imports torch (or transformers): a no-op re-run only plans and finds every stage
cached, and torch's import alone was 2 of its 10 s on the 2-core machine. The hardware answers that planning
needs (is there a GPU, does the CPU compute bf16) come from the operating system, and must agree with torch's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core import hardware
from tasks.core.recipe import load_recipe, trainer_names

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name in
                 ("examples", "recipes"))

SCRIPT = """
import sys
from flows.cli import main
for recipe in sys.argv[2:]:
    assert main(["run", recipe, "--dry-run", "--home", sys.argv[1]]) == 0, recipe
    print(recipe, sorted({"torch", "transformers"} & set(sys.modules)), flush=True)
"""


def needs_module_names(recipe: str) -> bool:
    """Whether planning checks the recipe's keys against the model's modules (freeze tuning, named LoRA targets,
    additional_target): that builds the model's structure on torch's meta device, so it imports torch."""
    finetuning = load_recipe(REPO / recipe).finetuning
    return (finetuning.finetuning_type == "freeze" or finetuning.lora_target.strip() != "all"
            or bool(finetuning.additional_target))


def test_every_bundled_recipe_plans_without_importing_torch(tmp_path):
    """Every recipe but those whose keys name model modules; they plan last, in the same process."""
    trainer_names()  # the per-version cache of transformers' option names, which a fresh machine builds once
    checked = sorted(RECIPES, key=needs_module_names)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store"), *checked], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith("configs/"))
    assert len(RECIPES) > 20 and set(imported) == set(RECIPES)
    without_torch = {recipe: libs for recipe, libs in imported.items() if not needs_module_names(recipe)}
    assert len(without_torch) > 20 and {recipe: libs for recipe, libs in without_torch.items() if libs != "[]"} == {}


def test_the_cpu_flags_agree_with_torchs_bf16_probes():
    assert hardware.linux_cpu_flags() is not None  # the suite runs on Linux
    assert hardware.cpu_has_native_bf16() == hardware.torch_says_cpu_has_native_bf16()


def test_no_gpu_device_node_means_torch_sees_no_gpu():
    import torch

    assert hardware.has_cuda() == torch.cuda.is_available()
    if not hardware.has_gpu_device_node():
        assert not torch.cuda.is_available()


@pytest.mark.parametrize(("flags", "native"), [({"avx2", "avx512_bf16"}, True), ({"amx_tile", "fma"}, True),
                                               ({"avx2", "avx512f"}, False)])
def test_bf16_follows_the_kernels_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(hardware, "linux_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "has_cuda", lambda: False)  # the CPU path, also on a machine with a GPU
    assert hardware.cpu_has_native_bf16() is native
    assert hardware.mixed_precision(bf16=True, fp16=False) == ("bf16" if native else "fp32")
