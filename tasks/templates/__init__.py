"""Chat templates as data, and the pure functions that turn a conversation into tokens and labels.

base: the Template record and text formatting; families/: one declaration per named template;
auto: `template: auto` (the tokenizer's own jinja template); encode: ids, truncation, masking;
show: a sample rendering with the trained spans marked, for `tunefactory templates show`.
"""

from tasks.templates.base import IGNORE_INDEX, Template, format_pairs
from tasks.templates.encode import (
    encode_pairs,
    generation_prompt,
    infer_seqlen,
    render,
    stop_token_ids,
    supervised_example,
)
from tasks.templates.registry import TEMPLATES, check_template, configure, get_template, template_name

__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "Template",
    "check_template",
    "configure",
    "encode_pairs",
    "format_pairs",
    "generation_prompt",
    "get_template",
    "infer_seqlen",
    "render",
    "stop_token_ids",
    "supervised_example",
    "template_name",
]
