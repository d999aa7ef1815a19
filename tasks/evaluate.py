"""Evaluate stage: score one model artifact on the held-out split.

Perplexity over the reference replies, and ROUGE-1/2/L and BLEU-4 of generated replies. Writes
`metrics.json` (flat keys, scores x100 as LlamaFactory reports them), `generated_predictions.jsonl`
(prompt, label, predict) and a readable `report.md`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.hardware import attn_implementation
from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec

STAGE = "evaluate"


def plan(recipe, tokenized: StageSpec, scored: StageSpec, role: str) -> StageSpec:
    config = {**recipe.slice_for(STAGE), "attn_implementation": attn_implementation(recipe.model.flash_attn)}
    return make_spec(
        STAGE,
        f"evaluate[{role}]",
        config,
        {"data": tokenized, "model": scored},
        ["tasks.evaluate", "tasks.metrics"],
        ("torch", "transformers", "evaluate", "rouge-score", "nltk"),
        {"role": role},
    )


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def perplexity(model, rows, pad_id: int, batch_size: int) -> dict[str, float]:
    """exp(mean negative log-likelihood) over label tokens, summed exactly across batches."""
    import torch

    total_nll, total_tokens = 0.0, 0
    for batch in batches(list(zip(rows["input_ids"], rows["labels"], strict=True)), batch_size):
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    loss = total_nll / max(total_tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}


def generate(
    model, tokenizer, prompts: list[list[int]], config: dict[str, Any], generation: dict[str, Any]
) -> list[str]:
    """Replies to tokenized prompts, generated in left-padded batches."""
    import torch

    pad_id = generation["pad_token_id"]
    sampling = (
        {"temperature": config["temperature"], "top_p": config["top_p"], "top_k": config["top_k"]}
        if config["do_sample"]
        else {}
    )
    replies = []
    for batch in batches(prompts, config["per_device_eval_batch_size"]):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=config["max_new_tokens"],
                do_sample=config["do_sample"],
                repetition_penalty=config["repetition_penalty"],
                eos_token_id=generation["stop_token_ids"],
                pad_token_id=pad_id,
                **sampling,
            )
        replies += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [reply.strip() for reply in replies]


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L and BLEU-4, x100."""
    from tasks.metrics import load

    scores = {
        **load("rouge").compute(predictions=predictions, references=references),
        **load("bleu").compute(predictions=predictions, references=references),
    }
    return {name: round(100 * value, 4) for name, value in scores.items()}


def report(role: str, model_id: str, metrics: dict[str, Any], examples: list[dict[str, str]]) -> str:
    lines = [
        f"# Evaluation of the {role} model",
        "",
        f"Model artifact: `{model_id}`",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## First predictions", ""]
    for example in examples[:5]:
        lines += [f"- **label**: {example['label']}", f"  **predict**: {example['predict']}"]
    return "\n".join(lines) + "\n"


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)  # sampling, when enabled, is reproducible for a given key
    model_dir = ctx.inputs["model"] / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=config["attn_implementation"])
    model.eval()
    rows = datasets.load_from_disk(str(ctx.inputs["data"] / "eval"))
    generation = json.loads((ctx.inputs["data"] / "generation.json").read_text())
    metrics: dict[str, Any] = perplexity(model, rows, generation["pad_token_id"], config["per_device_eval_batch_size"])
    examples: list[dict[str, str]] = []
    if config["do_predict"] and config["predict_with_generate"] and "prompt_ids" in rows.column_names:
        predictions = generate(model, tokenizer, rows["prompt_ids"], config, generation)
        examples = [
            {"prompt": p, "label": label, "predict": pred}
            for p, label, pred in zip(rows["prompt_text"], rows["label_text"], predictions, strict=True)
        ]
        metrics.update(text_scores(predictions, rows["label_text"]))
    model_id = ctx.spec.inputs["model"]
    metrics.update({"num_samples": len(rows), "model_artifact": model_id, "role": ctx.spec.locators["role"]})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (out / "generated_predictions.jsonl").open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(report(ctx.spec.locators["role"], model_id, metrics, examples))
    ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    ctx.log.info("%s: %s", ctx.spec.label, {k: v for k, v in metrics.items() if isinstance(v, float)})
    return {"metrics": metrics}


@task(name="evaluate", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def evaluate_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
