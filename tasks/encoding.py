"""Row-level encoding of aligned rows into model inputs; the tokenize stage maps these over datasets,
and streaming training applies them lazily to the same rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.core.errors import DataError
from tasks.packing import pack_pretraining
from tasks.sources import origin_text
from tasks.templates import (
    IGNORE_INDEX,
    Template,
    encode_pairs,
    generation_prompt,
    infer_seqlen,
    supervised_example,
)


def row_kind(row: dict[str, Any]) -> str:
    """sft, preference, kto or pretrain, read off an aligned row."""
    if row["kto_tag"] is not None:
        return "kto"
    if len(row["response"]) == 2:
        return "preference"
    return "sft" if row["response"] else "pretrain"


NEEDS = {"preference": "stage rm or dpo", "kto": "stage kto", "pretrain": "stage pt", "sft": "stage sft"}


def row_location(row: dict[str, Any]) -> str:
    """Where an aligned row came from, for messages: its dataset (where tokenize adds it), file and row."""
    place = origin_text(row.get("file"), row["row"])
    return f"{row['dataset']}, {place}" if row.get("dataset") else place


def check_kind(row: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse a row of a kind the objective cannot learn from, naming where it is."""
    kind = row_kind(row)
    if kind not in allowed:
        raise DataError(f"{row_location(row)}: a {kind} row cannot be used here; it needs {NEEDS[kind]}")


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


def row_pairs(row: dict[str, Any], messages: list[dict], tokenizer, template: Template) -> list:
    """The row's messages encoded (prompt ids, reply ids) per exchange; a message the template cannot write
    is a DataError naming the row."""
    try:
        return encode_pairs(tokenizer, template, messages, system_prompt(row, template))
    except DataError as error:
        raise DataError(f"{row_location(row)}: {error}" if "row" in row else str(error)) from None


def encode_supervised(row: dict[str, Any], tokenizer, template: Template, masking: Masking) -> dict[str, Any]:
    """input_ids and labels of one conversation, masked and truncated as the recipe says."""
    check_kind(row, ("sft",))
    return supervised(row, tokenizer, template, masking)


def supervised(row: dict[str, Any], tokenizer, template: Template, masking: Masking) -> dict[str, Any]:
    """input_ids and labels of the row's prompt and first reply (for a preference row: the chosen one)."""
    pairs = row_pairs(row, conversation(row), tokenizer, template)
    input_ids, labels = supervised_example(pairs, masking.cutoff_len, masking.train_on_prompt, masking.mask_history,
                                           tokenizer.eos_token_id if template.efficient_eos else None)
    return {"input_ids": input_ids, "labels": labels}


def encode_for_eval(row: dict[str, Any], tokenizer, template: Template, masking: Masking) -> dict[str, Any]:
    """The supervised encoding plus the generation prompt and the reference reply (a preference row's chosen
    reply; a KTO row's reply, which the caller keeps only where it is desirable)."""
    check_kind(row, ("sft", "preference", "kto"))
    pairs = row_pairs(row, conversation(row), tokenizer, template)
    prompt = generation_prompt(pairs, masking.cutoff_len)
    return {**supervised(row, tokenizer, template, masking), "prompt_ids": prompt,
            "label_text": row["response"][0]["content"], "prompt_text": tokenizer.decode(prompt)}


def prompt_and_reply(row: dict[str, Any], reply: dict[str, str], tokenizer, template: Template
                     ) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) for one reply to the row's prompt: earlier turns and the last user turn make the
    prompt, as LlamaFactory's encode_oneturn does."""
    pairs = row_pairs(row, list(row["prompt"]) + [reply], tokenizer, template)
    history = [token for source, target in pairs[:-1] for token in source + target]
    return history + pairs[-1][0], pairs[-1][1]


def encode_pairwise(row: dict[str, Any], tokenizer, template: Template, cutoff_len: int) -> dict[str, Any]:
    """Prompt + chosen and prompt + rejected, sharing one prompt cut; the responses are cut to one length,
    computed from the longer of them (LlamaFactory's pairwise processor). Prompt tokens carry no loss."""
    check_kind(row, ("preference",))
    prompt, chosen = prompt_and_reply(row, row["response"][0], tokenizer, template)
    _, rejected = prompt_and_reply(row, row["response"][1], tokenizer, template)
    source_len, target_len = infer_seqlen(len(prompt), max(len(chosen), len(rejected)), cutoff_len)
    prompt, chosen, rejected = prompt[:source_len], chosen[:target_len], rejected[:target_len]
    masked = [IGNORE_INDEX] * len(prompt)
    return {"chosen_ids": prompt + chosen, "chosen_labels": masked + chosen,
            "rejected_ids": prompt + rejected, "rejected_labels": masked + rejected}


def truncated_example(prompt: list[int], reply: list[int], cutoff_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels of one prompt and reply cut to cutoff_len, prompt masked."""
    source_len, target_len = infer_seqlen(len(prompt), len(reply), cutoff_len)
    prompt, reply = prompt[:source_len], reply[:target_len]
    return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply


def encode_feedback(rows: dict[str, list], tokenizer, template: Template, cutoff_len: int) -> dict[str, list]:
    """KTO rows (batched): each prompt with its reply, and with the previous row's reply for the KL estimate
    (the first row takes the last row's), as LlamaFactory's feedback processor pairs them."""
    items = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
    for item in items:
        check_kind(item, ("kto",))
    replies = [item["response"][0] for item in items]
    mismatched = replies[-1:] + replies[:-1]
    out: dict[str, list] = {"input_ids": [], "labels": [], "kl_input_ids": [], "kl_labels": [], "kto_tag": []}
    for item, kl_reply in zip(items, mismatched, strict=True):
        prompt, reply = prompt_and_reply(item, item["response"][0], tokenizer, template)
        _, kl = prompt_and_reply(item, kl_reply, tokenizer, template)
        input_ids, labels = truncated_example(prompt, reply, cutoff_len)
        kl_ids, kl_labels = truncated_example(prompt, kl, cutoff_len)
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["kl_input_ids"].append(kl_ids)
        out["kl_labels"].append(kl_labels)
        out["kto_tag"].append(bool(item["kto_tag"]))
    return out


def encode_prompt(row: dict[str, Any], tokenizer, template: Template, cutoff_len: int) -> dict[str, Any]:
    """A PPO rollout prompt: the conversation up to the reply, cut to leave the reply its share of cutoff_len."""
    check_kind(row, ("sft",))
    pairs = row_pairs(row, conversation(row), tokenizer, template)
    return {"input_ids": generation_prompt(pairs, cutoff_len)}


def template_overhead(tokenizer, template: Template) -> int:
    """Tokens the template itself spends on one exchange (default system prompt, empty turns)."""
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    pairs = encode_pairs(tokenizer, template, empty, template.default_system)
    return sum(len(source) + len(target) for source, target in pairs)


def document_text(row: dict[str, Any]) -> str:
    """The text a pretraining stage learns from: the document, or every turn of a conversation."""
    check_kind(row, ("pretrain", "sft"))
    return row["text"] or "\n".join(turn["content"] for turn in conversation(row))


def encode_document(row: dict[str, Any], tokenizer) -> dict[str, Any]:
    """Token ids of one document followed by EOS, untruncated (packing chunks them later); BOS first where the
    tokenizer adds one to what it encodes (Llama's), as LlamaFactory's pretraining does."""
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    ids = tokenizer.encode(document_text(row), add_special_tokens=False) + [tokenizer.eos_token_id]
    return {"input_ids": ids if bos is None else [bos, *ids]}


def document_blocks(documents: dict[str, list], cutoff_len: int) -> dict[str, list]:
    """A batch of encoded documents packed into cutoff_len blocks (batched map), all of them trained on."""
    blocks = pack_pretraining(documents["input_ids"], cutoff_len)
    return {"input_ids": blocks, "labels": blocks}


def truncated_document(row: dict[str, Any], cutoff_len: int) -> dict[str, Any]:
    """An unpacked pretraining example: a document's first cutoff_len tokens, all of them trained on."""
    ids = row["input_ids"][:cutoff_len]
    return {"input_ids": ids, "labels": ids}
