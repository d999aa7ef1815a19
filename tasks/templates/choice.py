"""The chat template a stage formats with, as a typed config: the recipe's `template` (None: the
tokenizer's own chat template, else `empty`) and its overrides. Stages key it; builds resolve it
against the model artifact's tokenizer (whose bytes are in the stage's key)."""

from __future__ import annotations

from typing import Any

from tasks.core.stage import StageConfig
from tasks.templates.base import Template
from tasks.templates.registry import TEMPLATES, check_template, get_template


class TemplateChoice(StageConfig):
    name: str | None  # None: resolved from the tokenizer (auto if it has a chat template, else empty)
    default_system: str | None = None
    tool_format: str | None = None
    enable_thinking: bool | None = None  # reasoning templates; for auto, only false (passed to its chat template)
    preserve_thinking: bool | None = None

    @classmethod
    def of(cls, data: Any, name: str | None = None) -> TemplateChoice:
        """The recipe data section's template and the options that apply to it (name replaces its template)."""
        name = name or data.template
        check_template(name)
        reasoning = name is not None and bool(TEMPLATES[name].thought_words)
        # auto (named, or no template with a tokenizer chat template): only a false enable_thinking is passed on
        auto_thinking = False if name in (None, "auto") and data.enable_thinking is False else None
        return cls(name=name, default_system=data.default_system, tool_format=data.tool_format,
                   enable_thinking=data.enable_thinking if reasoning else auto_thinking,
                   preserve_thinking=data.preserve_thinking if reasoning else None)

    def load(self, tokenizer=None) -> Template:
        """The configured template (None resolved against the tokenizer)."""
        return get_template(self.name, tokenizer, default_system=self.default_system, tool_format=self.tool_format,
                            enable_thinking=self.enable_thinking, preserve_thinking=self.preserve_thinking)
