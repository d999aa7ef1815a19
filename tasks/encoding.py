"""Row-level encoding of aligned rows into model inputs; the tokenize stage maps these over datasets,
and streaming training applies them lazily to the same rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.core.errors import DataError
from tasks.templates import Template, encode_pairs, generation_prompt, supervised_example


def row_kind(row: dict[str, Any]) -> str:
    """sft, preference, kto or pretrain, read off an aligned row."""
    if row["kto_tag"] is not None:
        return "kto"
    if len(row["response"]) == 2:
        return "preference"
    return "sft" if row["response"] else "pretrain"


def check_kind(row: dict[str, Any], stage: str) -> None:
    """Refuse rows the training stage cannot learn from (preference pairs, KTO labels) with their row index."""
    kind = row_kind(row)
    if kind in ("preference", "kto"):
        raise DataError(f"row {row['row']}: {kind} data needs stage {'rm/dpo' if kind == 'preference' else 'kto'}, "
                        f"which this version does not run; use it with stage sft or pt only after converting it")
    if stage == "sft" and kind == "pretrain":
        raise DataError(f"row {row['row']}: a text-only (pretraining) row has no reply to learn; use stage: pt")


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The SFT conversation: the prompt turns and the reply."""
    return list(row["prompt"]) + list(row["response"][:1])


def system_prompt(row: dict[str, Any], template: Template) -> str:
    """The row's system prompt (or the template's default) with its tool definitions written in."""
    return template.system_with_tools(row["system"] or template.default_system, row["tools"])


@dataclass(frozen=True)
class Masking:
    """How a conversation is cut and which tokens carry loss."""

    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False


def encode_supervised(row: dict[str, Any], tokenizer, template: Template, masking: Masking) -> dict[str, Any]:
    """input_ids and labels of one conversation, masked and truncated as the recipe says."""
    check_kind(row, "sft")
    pairs = encode_pairs(tokenizer, template, conversation(row), system_prompt(row, template))
    input_ids, labels = supervised_example(pairs, masking.cutoff_len, masking.train_on_prompt, masking.mask_history)
    return {"input_ids": input_ids, "labels": labels}


def encode_for_eval(row: dict[str, Any], tokenizer, template: Template, masking: Masking) -> dict[str, Any]:
    """encode_supervised plus the generation prompt and the reference reply."""
    pairs = encode_pairs(tokenizer, template, conversation(row), system_prompt(row, template))
    prompt = generation_prompt(pairs, masking.cutoff_len)
    return {**encode_supervised(row, tokenizer, template, masking), "prompt_ids": prompt,
            "label_text": row["response"][0]["content"], "prompt_text": tokenizer.decode(prompt)}


def template_overhead(tokenizer, template: Template) -> int:
    """Tokens the template itself spends on one exchange (default system prompt, empty turns)."""
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    pairs = encode_pairs(tokenizer, template, empty, template.default_system)
    return sum(len(source) + len(target) for source, target in pairs)


def document_text(row: dict[str, Any]) -> str:
    """The text a pretraining stage learns from: the document, or every turn of a conversation."""
    check_kind(row, "pt")
    return row["text"] or "\n".join(turn["content"] for turn in conversation(row))


def encode_document(row: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Token ids of one document followed by EOS, untruncated (packing chunks them later)."""
    ids = tokenizer.encode(document_text(row), add_special_tokens=False) + [tokenizer.eos_token_id]
    return {"input_ids": ids}


def truncated_document(row: dict[str, Any], cutoff_len: int) -> dict[str, Any]:
    """An unpacked pretraining example: a document's first cutoff_len tokens, all of them trained on."""
    ids = row["input_ids"][:cutoff_len]
    return {"input_ids": ids, "labels": ids}
