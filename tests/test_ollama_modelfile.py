"""The Ollama Modelfile written with an export: a TEMPLATE in Go's template language that writes a conversation
as the training template does. The expected TEMPLATEs below were checked by rendering them with Go's
text/template (what Ollama executes) against the exported Jinja template: all templates declared here, six
conversations each (with and without a system prompt, multi-turn, tool results, ending on a reply), the same text."""

from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from tasks.ollama import modelfile, to_go_template
from tasks.templates.registry import TEMPLATES

SMOLLM = (
    '{{ $system := .System }}{{ if not $system }}{{ $system = "You are a helpful AI assistant named SmolLM, trained '
    'by Hugging Face" }}{{ end }}{{ if $system }}{{ "<|im_start|>system\\n" }}{{ $system }}{{ "<|im_end|>\\n" }}'
    '{{ end }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $text := $m.Content }}'
    '{{ "<|im_start|>user\\n" }}{{ $text }}{{ "<|im_end|>\\n<|im_start|>assistant\\n" }}'
    '{{ else if eq $m.Role "tool" }}{{ $text := $m.Content }}{{ "<|im_start|>tool\\n" }}{{ $text }}'
    '{{ "<|im_end|>\\n<|im_start|>assistant\\n" }}{{ else if eq $m.Role "assistant" }}{{ $m.Content }}'
    '{{ "<|im_end|>\\n" }}{{ end }}{{ end }}'
)
LLAMA2 = (
    '{{ $system := .System }}{{ $block := "" }}{{ if $system }}{{ $block = print "<<SYS>>\\n" $system '
    '"\\n<</SYS>>\\n\\n" }}{{ end }}{{ $fold := -1 }}{{ range $i, $m := .Messages }}{{ if and (lt $fold 0) '
    '(ne $m.Role "system") }}{{ $fold = $i }}{{ end }}{{ end }}{{ range $i, $m := .Messages }}'
    '{{ if eq $m.Role "user" }}{{ $text := $m.Content }}{{ if eq $i $fold }}{{ $text = print $block $text }}'
    '{{ end }}{{ "<s>[INST] " }}{{ $text }}{{ " [/INST]" }}{{ else if eq $m.Role "tool" }}'
    '{{ $text := $m.Content }}{{ if eq $i $fold }}{{ $text = print $block $text }}{{ end }}{{ "<s>[INST] " }}'
    '{{ $text }}{{ " [/INST]" }}{{ else if eq $m.Role "assistant" }}{{ " " }}{{ $m.Content }}{{ " </s>" }}'
    '{{ end }}{{ end }}'
)


def test_chatml_with_a_default_system_prompt():
    assert to_go_template(TEMPLATES["smollm2"], "<s>", "</s>") == SMOLLM


def test_a_system_block_folded_into_the_first_turn_and_special_tokens_filled_in():
    assert to_go_template(TEMPLATES["llama2"], "<s>", "</s>") == LLAMA2


STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


@pytest.mark.parametrize("name", sorted(name for name, t in TEMPLATES.items() if not t.jinja))
def test_every_template_is_actions_only(name):
    """No text outside {{ }}: Ollama's renderer would print it as it stands, and `{{-` would trim next to it. Every
    literal is a valid Go string (JSON's escapes; no \\u surrogate halves), and no triple quote ends the TEMPLATE."""
    template = TEMPLATES[name]
    variants = [template, replace(template, default_system='say "hi"\n😀')]
    if template.thought_words:
        variants += [replace(template, enable_thinking=False), replace(template, preserve_thinking=True)]
    for variant in variants:
        go = to_go_template(variant, "<s>", "</s>")
        assert '"""' not in go
        assert not re.search(r"\\u[dD][89abAB]", go)
        without_strings = STRING.sub('""', go)
        assert re.fullmatch(r"(\{\{ [^{}]+ \}\})+", without_strings), without_strings


def test_the_modelfile_names_the_stop_tokens_and_a_context_the_model_has():
    tokenizer = SimpleNamespace(bos_token=None, eos_token="<|im_end|>",
                                convert_ids_to_tokens=lambda ids: ["<|im_end|>", "<|im_start|>"][:len(ids)])
    text = modelfile(TEMPLATES["smollm2"], tokenizer, [2, 1], 2048)
    assert "\nFROM .\n" in text and f'\nTEMPLATE """{SMOLLM}"""\n' in text
    assert text.endswith('PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"\nPARAMETER num_ctx 2048\n')
    assert modelfile(TEMPLATES["smollm2"], tokenizer, [2], 131072).endswith("PARAMETER num_ctx 4096\n")
    auto = modelfile(TEMPLATES["auto"], tokenizer, [2], None)  # Ollama reads the tokenizer's own template
    assert "TEMPLATE" not in auto and auto.endswith('PARAMETER stop "<|im_end|>"\nPARAMETER num_ctx 4096\n')
