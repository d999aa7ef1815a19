"""Vocabulary changes when a model is imported (LlamaFactory's resize_vocab, add_tokens,
add_special_tokens, new_special_tokens_config, init_special_tokens).

Tokens are added to the tokenizer, the embedding matrix (and an untied head) grows to the tokenizer's
size, and each new row starts at the mean of the existing rows: plus Gaussian noise of std 1/sqrt(dim)
with `noise_init` (LlamaFactory's default), or at the mean of its description's tokens with
`desc_init` (`desc_init_w_noise` adds the noise). Training then makes those rows trainable (LoRA saves
the embedding and head as modules_to_save), so the model learns to use the new tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from tasks.core.errors import RecipeError, read_utf8


def token_list(text: str | None) -> list[str]:
    """Comma-separated tokens, as LlamaFactory reads add_tokens / add_special_tokens."""
    return [token.strip() for token in (text or "").split(",") if token.strip()]


def read_descriptions(path: str | None) -> dict[str, str]:
    """new_special_tokens_config: a YAML mapping of token -> description text; a RecipeError naming the file."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"key 'new_special_tokens_config': {file} not found")
    try:
        values = yaml.safe_load(read_utf8(file, "new_special_tokens_config", RecipeError))
    except yaml.YAMLError as exc:
        raise RecipeError(f"key 'new_special_tokens_config': {file} is not valid YAML ({exc.__class__.__name__})"
                          ) from None
    if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise RecipeError(f"key 'new_special_tokens_config': {file} must map each token to its description text")
    return values


def missing_tokens(tokenizer, tokens: list[str] | tuple[str, ...]) -> list[str]:
    """The tokens the tokenizer does not have as single tokens."""
    vocab = tokenizer.get_vocab()
    return [token for token in tokens if token not in vocab]


def check_template_tokens(tokenizer, template) -> None:
    """A named template's stop tokens must be single tokens of the tokenizer; a RecipeError naming the first
    missing one otherwise (resize_vocab adds them)."""
    if template.jinja:
        return
    missing = missing_tokens(tokenizer, template.stop_words)
    if missing:
        raise RecipeError(f"key 'template': '{template.name}' ends replies with {missing[0]!r}, which the model's "
                          "tokenizer does not have; set resize_vocab: true to add it as a special token (its "
                          "embedding row is then trained), or leave template unset to use the model's own")


def init_rows(weight, new_ids: list[int], init: str, description_ids: dict[int, list[int]]) -> None:
    """Initialise the new rows of an embedding (or head) matrix in place."""
    import torch

    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[new_ids] = False
    mean = weight[keep].mean(dim=0)
    dim = weight.shape[1]
    for row in new_ids:
        source = [i for i in description_ids.get(row, []) if keep[i]] if init.startswith("desc_init") else []
        value = weight[source].mean(dim=0) if source else mean
        if init in ("noise_init", "desc_init_w_noise"):
            value = value + torch.randn(dim, dtype=weight.dtype) / math.sqrt(dim)
        weight[row] = value


def grow_vocabulary(model, tokenizer, tokens: tuple[str, ...], special: tuple[str, ...], init: str,
                    descriptions: dict[str, str], resize: bool) -> dict[str, Any]:
    """Add tokens (plain and special), grow the embeddings and initialise the new rows; what changed."""
    import torch

    new = missing_tokens(tokenizer, tokens) + [t for t in missing_tokens(tokenizer, special) if t not in tokens]
    tokenizer.add_tokens(missing_tokens(tokenizer, tokens), special_tokens=False)
    tokenizer.add_tokens(missing_tokens(tokenizer, special), special_tokens=True)
    rows = model.get_input_embeddings().weight.shape[0]
    grows = len(tokenizer) > rows
    if not new and not (resize and grows):
        return {}
    if grows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tail = range(rows, len(tokenizer)) if grows else range(0)
    new_ids = sorted({tokenizer.convert_tokens_to_ids(token) for token in new} | set(tail))
    description_ids = {tokenizer.convert_tokens_to_ids(token): tokenizer.encode(text, add_special_tokens=False)
                       for token, text in descriptions.items()}
    with torch.no_grad():
        init_rows(model.get_input_embeddings().weight, new_ids, init, description_ids)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            init_rows(head.weight, new_ids, init, description_ids)
    return {"added_tokens": new, "added_token_ids": new_ids, "vocab_size": len(tokenizer)}
