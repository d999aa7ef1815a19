"""A fixed sample conversation rendered with a template, trained spans marked ⟦like this⟧."""

from __future__ import annotations

from itertools import groupby

from tasks.core.errors import RecipeError
from tasks.templates.base import IGNORE_INDEX, format_pairs
from tasks.templates.encode import encode_pairs, supervised_example
from tasks.templates.registry import TEMPLATES, get_template

SAMPLE_SYSTEM = "You are a concise assistant."
SAMPLE = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "8."},
]
OPEN, CLOSE = "⟦", "⟧"


def mark(text: str, trained: bool) -> str:
    """Text wrapped in the trained-span marks when trained."""
    return f"{OPEN}{text}{CLOSE}" if trained else text


def render_sample(name: str, tokenizer=None) -> str:
    """The sample rendered with template name; with a tokenizer the marks follow the real label mask,
    without one the text is written with placeholder <bos>/<eos> (auto needs a tokenizer)."""
    template = get_template(name)
    if tokenizer is None:
        if template.jinja:
            raise RecipeError("template 'auto' renders with a model's own chat_template: name a model to show it")
        pairs = format_pairs(template, SAMPLE, SAMPLE_SYSTEM, "<bos>", "<eos>")
        return "".join(mark(prompt, False) + mark(response, True) for prompt, response in pairs)
    pairs = encode_pairs(tokenizer, template, SAMPLE, SAMPLE_SYSTEM)
    input_ids, labels = supervised_example(pairs, cutoff_len=1 << 30, train_on_prompt=False, mask_history=False)
    return mark_trained(tokenizer, input_ids, labels)


def mark_trained(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decoded tokens with the runs that carry loss wrapped in ⟦ ⟧."""
    runs = [(trained, len(list(run))) for trained, run in groupby(label != IGNORE_INDEX for label in labels)]
    # Decode growing prefixes and cut the differences, so spaces a tokenizer folds into a token stay visible.
    shown, text, end = [], "", 0
    for trained, length in runs:
        end += length
        longer = tokenizer.decode(input_ids[:end], clean_up_tokenization_spaces=False)
        shown.append(mark(longer[len(text) :], trained))
        text = longer
    return "".join(shown)


def list_templates() -> list[tuple[str, str]]:
    """(name, one-line description) of every template, sorted by name."""
    return [(name, template.description) for name, template in sorted(TEMPLATES.items())]
