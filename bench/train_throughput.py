"""Benchmark the train stage on a fixed job: LoRA SFT of the bundled SmolLM2-135M on 64 bundled rows.

Prints the machine, seconds per stage, training tokens/s (non-padding tokens) and peak RSS.
Runs in a fresh artifact store (so every stage builds) unless --home names one to reuse.

    .venv/bin/python bench/train_throughput.py [--steps 8] [--batch 8] [--model PATH] [--home DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default=None, help="model_name_or_path (default: the bundled SmolLM2)")
    parser.add_argument("--home", default=None, help="artifact store to use (default: a fresh temp dir)")
    args = parser.parse_args()

    home = args.home or tempfile.mkdtemp(prefix="tunefactory-bench-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(home) / 'mlflow.db'}")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.cli import QUIET_DEFAULTS

    for name, value in QUIET_DEFAULTS.items():  # as the CLI runs: no telemetry, quiet stores
        os.environ.setdefault(name, value)
    from flows.finetune import finetune
    from tasks.core.recipe import load_recipe

    overrides = [
        f"max_steps={args.steps}",
        f"per_device_train_batch_size={args.batch}",
        "max_samples=64",
        "do_eval=false",
        "output_dir=",
        "save_steps=1000",
        "logging_steps=1",
    ]
    if args.model:
        overrides.append(f"model_name_or_path={args.model}")
    recipe = load_recipe(REPO / "configs" / "recipes" / "demo_sft_lora.yaml", overrides)
    import torch

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"torch_threads={torch.get_num_threads()} cuda={torch.cuda.is_available()} python={platform.python_version()}"
    )
    print(
        f"date: {time.strftime('%Y-%m-%d')}  job: {args.steps} steps x batch {args.batch}, cutoff "
        f"{recipe.data.cutoff_len}, lora_rank {recipe.finetuning.lora_rank}"
    )
    summary = finetune(recipe, home=home)
    for stage in summary.stages:
        print(f"  {stage.label:<28} {'cached' if stage.cached else 'built':<7} {stage.seconds:8.1f} s")
    results = json.loads((Path(summary.artifacts["train"]) / "train_results.json").read_text())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"train: {results['global_step']} steps, {results['tokens_trained']} non-pad tokens in "
        f"{results['train_seconds']:.1f} s -> {results['tokens_per_second']:.1f} tokens/s"
    )
    print(f"peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
