"""The named templates, gathered from the family modules, and lookup by name."""

from __future__ import annotations

from dataclasses import replace

from tasks.core.errors import RecipeError, did_you_mean
from tasks.templates.auto import AUTO
from tasks.templates.base import Template
from tasks.templates.families import (
    chatml,
    deepseek,
    generic,
    google,
    ibm,
    meta,
    microsoft,
    mistral,
    mistral3,
    openai,
    others,
    qwen3,
    vendors,
)

FAMILIES = (generic, chatml, qwen3, meta, mistral, mistral3, google, microsoft, deepseek, ibm, openai, vendors, others)


def collect(templates: list[Template]) -> dict[str, Template]:
    """Name -> template; a name declared twice is a programming error."""
    registry: dict[str, Template] = {}
    for template in templates:
        if template.name in registry:
            raise ValueError(f"template {template.name} is declared twice")
        registry[template.name] = template
    return registry


TEMPLATES: dict[str, Template] = collect([t for family in FAMILIES for t in family.TEMPLATES] + [AUTO])


# LlamaFactory's templates for image/video/audio models that have no text-only declaration here.
MULTIMODAL = {"ernie_vl", "glm4v", "glm4_5v", "glm_ocr", "granite3_vision", "intern_vl", "intern_s1", "keye_vl",
              "kimi_vl", "lfm2_vl", "mllama", "llava", "llava_next", "llava_next_llama3", "llava_next_mistral",
              "llava_next_qwen", "llava_next_yi", "llava_next_video", "llava_next_video_mistral",
              "llava_next_video_yi", "mimo_vl", "minicpm_v", "minicpm_v_4_6", "minicpm_o", "ministral3", "paligemma",
              "paligemma_chat", "pixtral", "qwen2_audio", "qwen2_vl", "qwen3_vl", "qwen3_vl_nothink",
              "video_llava", "yi_vl", "youtu_vl", "moss_vl", "qwen2_omni", "qwen3_omni", "qwen3_omni_nothink",
              "dots_ocr"}


def check_template(name: str | None) -> None:
    """A RecipeError listing the known names unless name is one of them (None: chosen by the tokenizer)."""
    if name in MULTIMODAL:
        raise RecipeError(f"key 'template': '{name}' is a multimodal template; image/video/audio inputs are not "
                          "supported yet")
    if name is not None and name not in TEMPLATES:
        known = did_you_mean(name, TEMPLATES) or f" (known: {', '.join(sorted(TEMPLATES))})"
        raise RecipeError(f"key 'template': unknown template '{name}'{known}")


def template_name(name: str | None, tokenizer=None) -> str:
    """The template to use: the one named, else the tokenizer's own chat template ('auto') when it has
    one, else 'empty' (as LlamaFactory does without a `template`: its get_template_and_fix_tokenizer)."""
    if name is not None:
        return name
    return "auto" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "empty"


def get_template(name: str | None, tokenizer=None, **options) -> Template:
    """The template called name (None: see template_name) with the recipe's template options applied."""
    check_template(name)
    return configure(TEMPLATES[template_name(name, tokenizer)], **options)


def configure(template: Template, default_system: str | None = None, tool_format: str | None = None,
              enable_thinking: bool | None = None, preserve_thinking: bool | None = None) -> Template:
    """The template with LlamaFactory's overrides: default_system, tool_format, and for reasoning
    templates enable_thinking / preserve_thinking (None leaves the template's own)."""
    changes: dict = {}
    if default_system is not None:
        changes["default_system"] = default_system
    if tool_format is not None:  # as LlamaFactory's override: calls written in the template's plain reply format
        changes.update(tool_format=tool_format, tools="", function="")
    if template.thought_words or template.jinja:  # auto: passed to the chat template (Qwen3's reads it)
        if enable_thinking is not None:
            changes["enable_thinking"] = enable_thinking
    if template.thought_words:
        if preserve_thinking is not None:
            changes["preserve_thinking"] = preserve_thinking
    return replace(template, **changes) if changes else template
