"""Model FLOP utilisation of a LoRA SFT step: achieved training FLOP/s against this machine's matmul peak.

The step is the train stage's own (tasks.lean_training: one unpadded row per batch, per-sample attention,
logits only at label positions, AdamW on the adapter) on the bundled SmolLM2-135M-Instruct and the
demo's rows (its chat template, cutoff 256, batch 8). FLOPs count the work the loss needs, on non-pad
tokens only: every linear layer 2 FLOPs per weight per token forward and 2 backward (the base is frozen:
gradients flow to activations, not to its weights), the LoRA matrices 6, the output head only at
positions that predict a label, and causal attention 2 x 2 x hidden x sum of squared sample lengths / 2
per layer forward, twice that backward. The peak is the best of repeated 2048 x 2048 matmuls in the
step's precision (fp32, or bf16 with --bf16).

After the timed steps, a few more run under torch.profiler to split the step into its matrix products
(matmuls and the fused attention kernels) and everything else. The MFU the step would reach if everything
else took no time is the ceiling that removing overheads alone can reach at these matrix shapes.

The step's small matrices bound its MFU (hidden size 576, LoRA rank 16); `--shape 1b` runs the same step
on a randomly initialised Llama of 1.1B parameters (hidden 2048, 16 layers, the bundled tokenizer) to
show the figure at a size people tune.

    python bench/mfu.py [--bf16] [--steps 16] [--batch 8] [--model FOLDER | --shape 1b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tasks  # noqa: E402,F401  (before torch, as in the train stage: sets torch's allocator up)


def matmul_peak(dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """Best GEMM rate in FLOP/s over a few seconds."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    best, stop = 0.0, time.monotonic() + seconds
    while time.monotonic() < stop:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def demo_rows(tokenizer, count: int, cutoff: int = 256) -> list[dict[str, list[int]]]:
    """The demo's training rows through the model's chat template, prompt masked."""
    rows = []
    for line in (REPO / "configs" / "data" / "pydoc_summaries_train.jsonl").read_text().splitlines()[:count]:
        row = json.loads(line)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{row['instruction']}\n{row['input']}"}],
                                               add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(row["output"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + reply_ids)[:cutoff]
        rows.append({"input_ids": ids, "labels": ([-100] * len(prompt_ids) + reply_ids)[:cutoff]})
    return rows


def step_flops(model, rows: list[dict[str, list[int]]], lora_params: int) -> float:
    """The FLOPs one training step needs for these rows (see the module docstring)."""
    config = model.config
    head = config.vocab_size * config.hidden_size
    linear = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n
                 and "lora_" not in n and "lm_head" not in n)
    tokens = sum(len(r["input_ids"]) for r in rows)
    labelled = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    squares = sum(len(r["input_ids"]) ** 2 for r in rows)
    attention = 3 * config.num_hidden_layers * 2 * config.hidden_size * squares  # fwd 1x, bwd 2x, causal half of 4
    return 4 * linear * tokens + 4 * head * labelled + 6 * lora_params * tokens + attention


def attach_lora(model, bf16: bool, checkpointing: bool = False):
    """The train stage's LoRA r16 on every linear layer, per-sample attention, and (under bf16 autocast) the
    frozen linears and embeddings held in bf16; with gradient checkpointing as the demo trains, if asked."""
    from peft import LoraConfig, get_peft_model

    from tasks.lean_training import use_varlen_attention
    from tasks.train_methods import hold_frozen_weights_in_bf16

    use_varlen_attention(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if bf16:
        hold_frozen_weights_in_bf16(model)
    return model


def train_step(model, optimizer, batch, bf16: bool) -> None:
    """One optimizer step of the train stage's loss on these rows: logits at label positions only."""
    import torch

    from tasks.lean_training import FlatCollator, label_logits, token_loss

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = token_loss(*label_logits(model, FlatCollator()(batch)))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


MATRIX_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def matrix_share(run_step, steps: range) -> tuple[float, float]:
    """Seconds per step in matrix products, and in all, for these steps run under torch.profiler (whose
    per-op overhead makes the whole a little slower than the timed steps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for step in steps:
            run_step(step)
        whole = time.perf_counter() - start
    matrix = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATRIX_OPS) / 1e6
    return matrix / len(steps), whole / len(steps)


SHAPES = {"1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)  # fewer: first-shape kernel builds dominate
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast; the peak is bf16's")
    parser.add_argument("--model", type=Path,
                        default=Path.home() / ".cache" / "tunefactory-bench" / "smollm2-135m-instruct")
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="a random Llama of this size with the model's tokenizer, instead of its weights")
    args = parser.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bench.vs_llamafactory import import_model

    folder = args.model if (args.model / "config.json").exists() else import_model(args.model.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if args.shape:
        config = AutoConfig.from_pretrained(folder)
        for name, value in SHAPES[args.shape].items():
            setattr(config, name, value)
        config._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = attach_lora(model, args.bf16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    profiled = range(args.steps + 1, args.steps + 5)
    rows = demo_rows(tokenizer, args.batch * profiled.stop)

    def batch(step: int) -> list[dict[str, list[int]]]:
        return rows[step * args.batch : (step + 1) * args.batch]

    def run_step(step: int) -> None:
        train_step(model, optimizer, batch(step), args.bf16)

    times, flops = [], []
    for step in range(args.steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        run_step(step)
        if step:
            times.append(time.perf_counter() - start)
            flops.append(step_flops(model, batch(step), lora))
    matrix_seconds, profiled_seconds = matrix_share(run_step, profiled)
    profiled_flops = sum(step_flops(model, batch(step), lora) for step in profiled) / len(profiled)
    fp32, bf16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    peak = bf16 if args.bf16 else fp32
    achieved = sum(flops) / sum(times)
    size = f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters"
    print(f"model: {args.shape + ' (random weights), ' if args.shape else ''}{size}")
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
          f"python={platform.python_version()}  date: {time.strftime('%Y-%m-%d')}")
    print(f"matmul peak (2048 x 2048): fp32 {fp32 / 1e9:.1f} GFLOP/s, bf16 {bf16 / 1e9:.1f} GFLOP/s")
    print(f"training: {args.steps} steps x batch {args.batch}, {sum(times) / len(times):.2f} s/step, "
          f"{sum(flops) / len(flops) / 1e9:.1f} GFLOP/step -> {achieved / 1e9:.1f} GFLOP/s")
    print(f"profiled steps: {matrix_seconds:.2f} of {profiled_seconds:.2f} s/step in matrix products "
          f"({matrix_seconds / profiled_seconds:.0%}); with every other op free: "
          f"mfu ceiling {profiled_flops / matrix_seconds / peak:.3f}")
    print(f"mfu={achieved / peak:.3f}")


if __name__ == "__main__":
    main()
