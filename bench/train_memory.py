"""Where the train stage's memory goes: resident set size after each phase of the demo's LoRA step.

The step is bench/mfu.py's in the precision the train stage picks for `bf16: true` on this machine (bf16
autocast with the frozen linears held in bf16 where the CPU has bf16 instructions, else fp32), with gradient
checkpointing as the demo trains: the bundled SmolLM2-135M-Instruct, LoRA r16 on all linear layers, the
demo's rows. It prints RSS (and the high-water mark) after the imports, after the model is loaded and
wrapped, and after each step, so a change aimed at the demo's peak can be judged phase by phase. RSS
moves by 100-200 MiB between identical runs (glibc and oneDNN keep freed memory): compare several runs of
each variant.

    python bench/train_memory.py [--steps 12] [--batch 8] [--trim-steps N] [--no-checkpointing] [--hide-bitsandbytes]

`--trim-steps N` hands the heap's free pages back every N steps, as the train stage does every
HEAP_TRIM_STEPS (tasks.train_common); 0 never trims, to show what the trimming saves and costs.

`--hide-bitsandbytes` runs without bitsandbytes importable: peft imports it as peft is imported, and it
compiles kernels with torch.compile as it loads (torch._inductor, sympy, networkx). The difference between
the two runs is what that import costs a run that quantizes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.core.memory import share_one_malloc_arena, trim_heap  # noqa: E402  (imports nothing heavy)
from tasks.train_common import HEAP_TRIM_STEPS  # noqa: E402


def resident() -> str:
    """VmRSS and VmHWM of this process, in MiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    rss, hwm = (int(status[key].split()[0]) // 1024 for key in ("VmRSS", "VmHWM"))
    return f"rss {rss:5d} MiB  peak {hwm:5d} MiB"


def main() -> None:
    share_one_malloc_arena()  # as the command does before anything else
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", type=Path,
                        default=Path.home() / ".cache" / "tunefactory-bench" / "smollm2-135m-instruct")
    parser.add_argument("--trim-steps", type=int, default=HEAP_TRIM_STEPS,
                        help="hand the heap's free pages back every N steps (0: never)")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="keep every activation (disable_gradient_checkpointing: true)")
    parser.add_argument("--hide-bitsandbytes", action="store_true",
                        help="make bitsandbytes unimportable, to show what its import costs")
    args = parser.parse_args()
    if args.hide_bitsandbytes:
        sys.modules["bitsandbytes"] = None  # find_spec() answers None, import raises ImportError
    import peft  # noqa: F401  (imported here so the imports phase counts it and what it imports)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.mfu import attach_lora, demo_rows, train_step
    from bench.vs_llamafactory import import_model
    from tasks.core.hardware import mixed_precision

    bf16 = mixed_precision(bf16=True, fp16=False) == "bf16"

    print(f"imports: {resident()}  (bitsandbytes imported: {sys.modules.get('bitsandbytes') is not None})")
    folder = args.model if (args.model / "config.json").exists() else import_model(args.model.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa"), bf16=bf16,
                        checkpointing=not args.no_checkpointing)
    model.train()
    print(f"model loaded and wrapped ({'bf16 autocast' if bf16 else 'fp32'}): {resident()}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    rows = demo_rows(tokenizer, args.batch * args.steps)
    for step in range(args.steps):
        batch = rows[step * args.batch : (step + 1) * args.batch]
        start = time.perf_counter()
        train_step(model, optimizer, batch, bf16=bf16)
        tokens = sum(len(row["input_ids"]) for row in batch)
        print(f"step {step + 1:2d} ({tokens:4d} tokens, {time.perf_counter() - start:.2f} s): {resident()}")
        if args.trim_steps and (step + 1) % args.trim_steps == 0:
            trim_heap()
    print(f"bitsandbytes imported at the end: {sys.modules.get('bitsandbytes') is not None}")


if __name__ == "__main__":
    main()
