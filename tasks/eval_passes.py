"""The model passes of an evaluation: perplexity over reference replies, generation of replies, and both
from one forward of each batch.

`score_and_generate` is the one the evaluate stage runs on supervised rows. Generation's prefill (one
forward of every prompt) was most of its time (4.6 of 7.0 s for the demo's 77 prompts), and perplexity ran
a forward of the same prompts with their replies. One forward of prompt + reply gives both: the loss at
the reply's positions, and a KV cache whose prompt part generation continues from. Causal attention
makes the prompt's keys and values the same with or without the reply after it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tasks.core.errors import DataError
from tasks.core.stage import check_stop
from tasks.lean_training import (
    FlatCollator,
    flat_batches_supported,
    label_logits,
    label_positions,
    supports_label_only_logits,
)

if TYPE_CHECKING:
    from tasks.evaluate import EvaluateConfig


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def padded_batch(pad_id: int):
    """Right-padded input_ids, labels and attention_mask of a list of rows."""
    import torch

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(row["input_ids"]) for row in rows)
        pad = [width - len(row["input_ids"]) for row in rows]
        return {"input_ids": torch.tensor([r["input_ids"] + [pad_id] * n for r, n in zip(rows, pad, strict=True)]),
                "labels": torch.tensor([r["labels"] + [-100] * n for r, n in zip(rows, pad, strict=True)]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * n
                                                for r, n in zip(rows, pad, strict=True)])}

    return collate


def to_model(model, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's tensors on the model's device (evaluation runs on the GPU where there is one)."""
    return {key: value.to(model.device) if hasattr(value, "to") else value for key, value in batch.items()}


def loss_metrics(total_nll: float, total_tokens: int) -> dict[str, float]:
    if not total_tokens:  # a loss of 0 would read as a perfect model, and retune would promote it
        raise DataError("the evaluation data has no reply token to score (each reply was cut off at cutoff_len, "
                        "or there are no rows)")
    loss = total_nll / total_tokens
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}


def perplexity(model, rows, pad_id: int, batch_size: int, progress: bool) -> dict[str, float]:
    """exp(mean negative log-likelihood) over label tokens, summed exactly across batches."""
    return loss_metrics(*label_nll(model, rows, pad_id, batch_size, progress))


def label_nll(model, rows, pad_id: int, batch_size: int, progress: bool) -> tuple[float, int]:
    """(summed negative log-likelihood, label tokens) of the rows. Each batch is one unpadded row with logits
    only at label positions where the model allows it (tasks.lean_training)."""
    import torch
    from tqdm.auto import tqdm

    lean = flat_batches_supported(model) and supports_label_only_logits(model)
    collate = FlatCollator() if lean else padded_batch(pad_id)
    total_nll, total_tokens = 0.0, 0
    examples = [{"input_ids": i, "labels": labels} for i, labels in zip(rows["input_ids"], rows["labels"], strict=True)]
    for batch in tqdm(list(batches(examples, batch_size)), desc="perplexity", disable=not progress):
        check_stop()
        inputs = to_model(model, collate(batch))
        with torch.no_grad():
            if lean:
                logits, targets = label_logits(model, inputs)
            else:
                targets = inputs.pop("labels")[:, 1:]
                logits = model(**inputs).logits[:, :-1]
                logits = logits.reshape(-1, logits.shape[-1])
        nll = torch.nn.functional.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    return total_nll, total_tokens


def generation_options(config: EvaluateConfig, generation: dict[str, Any]) -> dict[str, Any]:
    """model.generate's keyword arguments for this evaluation: greedy unless the recipe samples."""
    options = {"do_sample": False, "max_new_tokens": config.max_new_tokens, "pad_token_id": generation["pad_token_id"],
               "repetition_penalty": config.repetition_penalty, "eos_token_id": generation["stop_token_ids"]}
    if config.sampling is not None:
        options |= {"do_sample": True, "temperature": config.sampling.temperature, "top_p": config.sampling.top_p,
                    "top_k": config.sampling.top_k}
    return options


def left_padded(sequences: list[list[int]], pad_id: int, device="cpu"):
    """(ids, attention mask) of sequences padded on the left to one width, as generation wants them."""
    import torch

    width = max(len(sequence) for sequence in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


def generate(model, tokenizer, prompts: list[list[int]], config: EvaluateConfig, generation: dict[str, Any]
             ) -> list[str]:
    """Replies to tokenized prompts, generated in left-padded batches of prompts of similar length (so little
    is padded), returned in the prompts' order."""
    import torch
    from tqdm.auto import tqdm

    options = generation_options(config, generation)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    replies: dict[int, str] = {}
    for batch in tqdm(list(batches(order, config.batch_size)), desc="generate", disable=not config.progress):
        check_stop()
        ids, mask = left_padded([prompts[i] for i in batch], generation["pad_token_id"], model.device)
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=mask, **options)
        texts = tokenizer.batch_decode(output[:, ids.shape[1]:], skip_special_tokens=True)
        replies |= dict(zip(batch, texts, strict=True))
    return [replies[i].strip() for i in range(len(prompts))]


def score_and_generate(model, tokenizer, rows, config: EvaluateConfig, generation: dict[str, Any]
                       ) -> tuple[dict[str, float], list[str]]:
    """Perplexity over the reference replies and generated replies, from one forward of prompt + reply per
    batch (see the module docstring). Rows whose input does not begin with their generation prompt (a
    prompt truncated differently) get the two passes apart."""
    from tqdm.auto import tqdm

    prompts, inputs, labels = rows["prompt_ids"], rows["input_ids"], rows["labels"]
    sharable = flat_batches_supported(model)  # remote-code models: no promise on caches and positions
    shared = [i for i in range(len(prompts)) if sharable and list(inputs[i][: len(prompts[i])]) == list(prompts[i])]
    apart = sorted(set(range(len(prompts))) - set(shared))
    total_nll, total_tokens, replies = 0.0, 0, {}
    if apart:
        rest = {"input_ids": [inputs[i] for i in apart], "labels": [labels[i] for i in apart]}
        total_nll, total_tokens = label_nll(model, rest, generation["pad_token_id"], config.batch_size,
                                            config.progress)
        replies = dict(zip(apart, generate(model, tokenizer, [prompts[i] for i in apart], config, generation),
                           strict=True))
    order = sorted(shared, key=lambda i: (len(prompts[i]), i))
    options = generation_options(config, generation)
    for batch in tqdm(list(batches(order, config.batch_size)), desc="evaluate", disable=not config.progress):
        check_stop()
        nll, tokens, texts = _score_and_generate_batch(
            model, tokenizer, [prompts[i] for i in batch], [inputs[i] for i in batch], [labels[i] for i in batch],
            options)
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
        replies |= dict(zip(batch, texts, strict=True))
    return loss_metrics(total_nll, total_tokens), [replies[i].strip() for i in range(len(prompts))]


def _score_and_generate_batch(model, tokenizer, prompts, inputs, labels, options) -> tuple[float, int, list[str]]:
    """(summed label NLL, label tokens, replies) of one batch. Rows are laid out with their prompts
    left-padded to one width and their replies right-padded after it, so every prompt ends at the same
    column and the cache cut there is a left-padded batch of prompts, as generation expects."""
    import torch
    from transformers import DynamicCache

    pad_id = options["pad_token_id"]
    width = max(len(p) for p in prompts)
    reply = max(len(i) - len(p) for i, p in zip(inputs, prompts, strict=True))
    ids, mask, targets = [], [], []
    for prompt, row_ids, row_labels in zip(prompts, inputs, labels, strict=True):
        left, right = width - len(prompt), reply - (len(row_ids) - len(prompt))
        ids.append([pad_id] * left + list(row_ids) + [pad_id] * right)
        mask.append([0] * left + [1] * len(row_ids) + [0] * right)
        targets.append([-100] * (left + 1) + list(row_labels[1:]) + [-100] * right)  # a row's first token
        # has nothing before it to be predicted from (train_on_prompt labels it), as in FlatCollator
    ids, mask = torch.tensor(ids, device=model.device), torch.tensor(mask, device=model.device)
    targets, keep = label_positions(torch.tensor(targets, device=model.device))
    lean = supports_label_only_logits(model)
    only_labels = {"logits_to_keep": keep} if lean else {}
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       past_key_values=cache, use_cache=True, **only_labels)
        logits = output.logits.reshape(-1, output.logits.shape[-1]) if lean else output.logits[keep]
        nll = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum").item()
        # Generation recomputes the prompts' last token, to get its first logits.
        generated = model.generate(input_ids=ids[:, :width], attention_mask=mask[:, :width],
                                   past_key_values=cut_cache(cache, width - 1), **options)
    texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return nll, int(keep.sum()), texts


def cut_cache(cache, length: int):
    """The cache cut back to its first `length` positions, or None (generation then runs its own prefill) where
    a layer keeps less than every position: a sliding-window layer past its window has dropped the prompt's
    start, and cutting its end would not bring that back."""
    from transformers.cache_utils import DynamicLayer

    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    cache.crop(length - cache.get_seq_length())  # transformers 5: a negative count of positions to drop
    return cache
