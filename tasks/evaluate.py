"""Evaluate stage: score one model artifact on the held-out split.

Perplexity over the reference replies, and ROUGE-1/2/L and BLEU-4 of generated replies. Writes
`metrics.json` (flat keys, scores x100 as LlamaFactory reports them), `generated_predictions.jsonl`
(prompt, label, predict) and a readable `report.md`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.errors import DataError
from tasks.core.hardware import attn_implementation, compute_device, mixed_precision, torch_dtype
from tasks.core.loading import remote_code
from tasks.core.mapped_weights import load_causal_lm
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step, check_stop, unkeyed
from tasks.eval_passes import batches, padded_batch, perplexity, score_and_generate, to_model
from tasks.lean_training import use_varlen_attention
from tasks.rows import load_rows


class Sampling(BaseModel):
    model_config = ConfigDict(frozen=True)

    temperature: float
    top_p: float
    top_k: int
    seed: int


class EvaluateConfig(StageConfig):
    batch_size: int  # also shapes padding, and so the last digits of the scores
    generate: bool  # generation metrics (ROUGE/BLEU) besides perplexity
    max_new_tokens: int | None
    repetition_penalty: float | None
    sampling: Sampling | None  # None: greedy decoding
    attn_implementation: str | None  # None: transformers chooses
    dtype: str  # "auto" (as stored), or the half precision the recipe trains in (see `inference_dtype`)
    progress: bool = unkeyed(True, "show progress bars")

    @property
    def rng_seed(self) -> int:
        return self.sampling.seed if self.sampling else 0


def configure(recipe: Recipe) -> EvaluateConfig:
    """The evaluation options that apply: generation settings only when generating, sampling only when sampling."""
    e = recipe.evaluation
    generate = e.do_predict and e.predict_with_generate and recipe.finetuning.stage not in ("pt", "rm")
    sampling = Sampling(temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, seed=recipe.training.seed)
    return EvaluateConfig(
        batch_size=e.per_device_eval_batch_size,
        generate=generate,
        max_new_tokens=e.max_new_tokens if generate else None,
        repetition_penalty=e.repetition_penalty if generate else None,
        sampling=sampling if generate and e.do_sample else None,
        attn_implementation=attn_implementation(recipe.model.flash_attn),
        dtype=inference_dtype(recipe),
    )


def inference_dtype(recipe: Recipe) -> str:
    """The dtype models are evaluated in. As LlamaFactory casts a model it does not train to the compute
    dtype, a recipe that trains in bf16 (or fp16 on a GPU) evaluates in it: half the weight memory, and
    generation, bound by reading the weights once per token, runs faster. Elsewhere the stored dtype."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision(recipe.training.bf16, recipe.training.fp16),
                                                       "auto")


def plan(recipe: Recipe, tokenized: Step, scored: Step, role: str) -> Step:
    return STAGE.step(f"evaluate[{role}]", configure(recipe), {"data": tokenized, "model": scored}, {"role": role})


def pair_preference(model, pairs, pad_id: int, batch_size: int, progress: bool) -> dict[str, float]:
    """How often the model prefers the chosen reply of a pair: its per-token average log-prob is higher than the
    rejected reply's (pair_accuracy), and by how much on average (pair_margin)."""
    import torch
    from tqdm.auto import tqdm

    from tasks.lean_training import FlatCollator, flat_batches_supported, label_token_logps, supports_label_only_logits
    from tasks.preference_losses import sequence_logps

    label_only = supports_label_only_logits(model)  # the head only at reply tokens, on unpadded rows where it can
    collate = FlatCollator() if label_only and flat_batches_supported(model) else padded_batch(pad_id)
    margins: list[float] = []
    rows = list(zip(pairs["chosen_ids"], pairs["chosen_labels"], pairs["rejected_ids"], pairs["rejected_labels"],
                    strict=True))
    for batch in tqdm(list(batches(rows, batch_size)), desc="pairs", disable=not progress):
        check_stop()
        sequences = [{"input_ids": c, "labels": cl} for c, cl, _, _ in batch]
        sequences += [{"input_ids": r, "labels": rl} for _, _, r, rl in batch]
        inputs = to_model(model, collate(sequences))
        labels = inputs.pop("labels")
        with torch.no_grad():
            logps, label_mask = label_token_logps(model, inputs, labels, label_only)
        chosen, rejected = sequence_logps(logps, label_mask, average=True).chunk(2)
        margins += (chosen - rejected).tolist()
    return {"pair_accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
            "pair_margin": sum(margins) / max(len(margins), 1), "num_pairs": len(margins)}


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L and BLEU-4, x100."""
    from tasks.metrics import load

    scores = {
        **load("rouge").compute(predictions=predictions, references=references),
        **load("bleu").compute(predictions=predictions, references=references),
    }
    return {name: round(100 * value, 4) for name, value in scores.items()}


def report(metrics: dict[str, Any], examples: list[dict[str, str]]) -> str:
    lines = ["# Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "## First predictions", ""]
    for example in examples[:5]:
        lines += [f"- **label**: {example['label']}", f"  **predict**: {example['predict']}"]
    return "\n".join(lines) + "\n"


def build(config: EvaluateConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoTokenizer

    data = ctx.inputs["data"]
    model_dir = ctx.inputs["model"].part("model")
    remote = remote_code(ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **remote)
    dtype = "auto" if config.dtype == "auto" else torch_dtype(config.dtype)
    model = load_causal_lm(model_dir, dtype, device=compute_device(), attn_implementation=config.attn_implementation,
                           **remote)
    use_varlen_attention(model)  # per-sample attention for the flattened perplexity batches; SDPA when generating
    model.eval()
    generation = json.loads(data.part("generation").read_text())
    metrics: dict[str, Any] = {}
    examples: list[dict[str, str]] = []
    if data.info.get("eval_missing"):
        raise DataError(data.info["eval_missing"])
    if data.has("eval"):
        rows = load_rows(data.part("eval"))
        if config.generate and data.info.get("eval_prompts"):
            scores, predictions = score_and_generate(model, tokenizer, rows, config, generation)
            metrics |= scores
            examples = [
                {"prompt": p, "label": label, "predict": pred}
                for p, label, pred in zip(rows["prompt_text"], rows["label_text"], predictions, strict=True)
            ]
            metrics.update(text_scores(predictions, rows["label_text"]))
        else:
            metrics |= perplexity(model, rows, generation["pad_token_id"], config.batch_size, config.progress)
        metrics["num_samples"] = len(rows)
    if data.has("eval_pairs"):
        pairs = load_rows(data.part("eval_pairs"))
        metrics |= pair_preference(model, pairs, generation["pad_token_id"], config.batch_size, config.progress)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (out / "generated_predictions.jsonl").open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(report(metrics, examples), encoding="utf-8")
    ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    ctx.log_files([out / "generated_predictions.jsonl", out / "report.md"])
    ctx.log.info("scores: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    layout = {"metrics": "metrics.json", "predictions": "generated_predictions.jsonl", "report": "report.md"}
    return Built("metrics", layout, metrics)


STAGE = Stage(
    name="evaluate",
    plan=plan,
    build=build,
    code=("tasks.evaluate", "tasks.eval_passes", "tasks.metrics", "tasks.rows", "tasks.preference_losses",
          "tasks.lean_training", "tasks.varlen_attention", "tasks.core.mapped_weights"),
    # the metric modules' libraries too: jieba's segmentation and regex's Unicode tables shape every text score
    libraries=("torch", "transformers", "evaluate", "rouge-score", "nltk", "jieba", "rouge-chinese", "regex"),
    heavy=True,
)
