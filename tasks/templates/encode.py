"""Pure functions from a conversation to token ids and labels: encoding, truncation, masking, stopping."""

from __future__ import annotations

from itertools import accumulate

from tasks.templates import auto
from tasks.templates.base import IGNORE_INDEX, Template, fill, format_pairs


def render(fmt: str, content: str, tokenizer) -> str:
    """Fill a format string with the tokenizer's BOS/EOS, then the content taken literally."""
    return fill(fmt, content, tokenizer.bos_token or "", tokenizer.eos_token or "")


def encode_pieces(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text piece. The pieces are tokenized as one string where every piece boundary is
    also a token boundary, so the ids equal the whole conversation's tokenization (what
    apply_chat_template gives); if a token would straddle a boundary, each piece is tokenized alone."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    if not getattr(tokenizer, "is_fast", False):
        return [encode(text) for text in texts]
    joined = tokenizer("".join(texts), add_special_tokens=False, return_offsets_mapping=True)
    offsets = joined["offset_mapping"]
    ends = list(accumulate(len(text) for text in texts))
    inner = set(ends[:-1])
    if any(cut in inner for start, stop in offsets for cut in range(start + 1, stop)):
        return [encode(text) for text in texts]
    pieces: list[list[int]] = [[] for _ in texts]
    piece = 0
    for token, (start, _) in zip(joined["input_ids"], offsets, strict=True):
        while piece < len(texts) - 1 and start >= ends[piece]:
            piece += 1
        pieces[piece].append(token)
    return pieces


def encode_pairs(tokenizer, template: Template, messages: list[dict], system: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per user/assistant exchange; system and prefix go before the first."""
    if template.jinja:
        variables = {} if template.enable_thinking else {"enable_thinking": False}
        if not template.enable_thinking:  # every thought goes, as LlamaFactory's reasoning template removes them
            messages = auto.without_thoughts(messages)
        texts = auto.chat_template_pairs(tokenizer, messages, system, variables)
    else:
        texts = format_pairs(template, messages, system, tokenizer.bos_token or "", tokenizer.eos_token or "")
    ids = encode_pieces(tokenizer, [piece for pair in texts for piece in pair])
    return [(ids[i], ids[i + 1]) for i in range(0, len(ids), 2)]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """Truncated (source, target) lengths within cutoff_len, keeping both in proportion (as LlamaFactory)."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))  # LlamaFactory's rounding
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def supervised_example(
    pairs: list[tuple[list[int], list[int]]], cutoff_len: int, train_on_prompt: bool, mask_history: bool,
    efficient_eos: int | None = None,
) -> tuple[list[int], list[int]]:
    """input_ids and labels (IGNORE_INDEX where no loss is taken) for one conversation. With mask_history
    only the last reply is trained and it is kept first: turns are cut from the last one backwards, so
    older turns are truncated (or dropped) before it (LlamaFactory's supervised processor).

    `efficient_eos` (the EOS id, for templates whose turns end without it: Template.efficient_eos) trains the stop
    as LlamaFactory does: the first token of each later prompt is labelled EOS (not with mask_history, which trains
    the last reply only), so the model learns to stop after every reply, and the conversation's closing EOS is kept
    out of the truncation (one token is kept for it)."""
    closing: list[int] = []
    if efficient_eos is not None and pairs and pairs[-1][1][-1:] == [efficient_eos]:
        closing = [efficient_eos]
        pairs = [*pairs[:-1], (pairs[-1][0], pairs[-1][1][:-1])]
    input_ids: list[int] = []
    labels: list[int] = []
    order = list(reversed(pairs)) if mask_history else pairs
    for turn, (source, target) in enumerate(order):
        budget = cutoff_len - len(closing) - len(input_ids)
        if budget <= 0:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), budget)
        source, target = source[:source_len], target[:target_len]
        source_labels = source if train_on_prompt else [IGNORE_INDEX] * len(source)
        if efficient_eos is not None and turn and source and not mask_history:  # the reply before it ends here
            source_labels = [efficient_eos, *source_labels[1:]]
        target_labels = [IGNORE_INDEX] * len(target) if (mask_history and turn != 0) else target
        if mask_history:  # walking backwards: earlier turns go in front
            input_ids, labels = source + target + input_ids, source_labels + target_labels + labels
        else:
            input_ids, labels = input_ids + source + target, labels + source_labels + target_labels
    if not input_ids:  # no room for the conversation: the closing EOS alone would predict nothing
        return [], []
    return input_ids + closing, labels + closing


def generation_prompt(pairs: list[tuple[list[int], list[int]]], cutoff_len: int) -> list[int]:
    """Prompt ids for generating the last reply: earlier exchanges plus the last prompt."""
    history = [token for source, target in pairs[:-1] for token in source + target]
    source, target = pairs[-1]
    source_len, _ = infer_seqlen(len(history) + len(source), len(target), cutoff_len)
    return (history + source)[:source_len]


def stop_token_ids(tokenizer, template: Template) -> list[int]:
    """Token ids that end an assistant reply: EOS plus the template's stop words (auto: the turn's end token)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    words = auto.end_of_turn_tokens(tokenizer) if template.jinja else template.stop_words
    for word in words:
        token = tokenizer.convert_tokens_to_ids(word)
        if token is not None and token != tokenizer.unk_token_id:
            ids.add(token)
    return sorted(ids)
