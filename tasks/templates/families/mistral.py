"""Mistral's [INST] formats; the three tokenizer generations differ in spaces and in where the system goes."""

from tasks.templates.base import Template

TEMPLATES = [
    # Mistral-7B-Instruct-v0.3, Mixtral-8x22B, Mistral-Small/Large: the system text leads the LAST user turn.
    Template(
        name="mistral",
        prefix="{bos_token}",
        system="{content}\n\n",
        system_in_user="last",
        user="[INST] {content}[/INST]",
        assistant=" {content}{eos_token}",
        # Published tool turns also carry 9-character call ids, which our data does not have.
        observation='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]',
        function="[TOOL_CALLS] {content}{eos_token}",
        tool_format="mistral",
        description="Mistral v3 tokenizer (7B v0.3, Mixtral 8x22B): system text in the last [INST]",
    ),
    # Mistral-7B-Instruct-v0.1 / v0.2, Mixtral-8x7B-Instruct: spaces around [INST], system in the FIRST turn.
    Template(
        name="mistral_v1",
        prefix="{bos_token}",
        system="{content}\n\n",
        system_in_user="first",
        user=" [INST] {content} [/INST]",
        assistant=" {content}{eos_token}",
        description="Mistral v1 tokenizer (7B v0.1/v0.2, Mixtral 8x7B): ' [INST] ... [/INST]'",
    ),
    # Mistral-Nemo-Instruct-2407 (Tekken): no spaces at all, system in the last user turn.
    Template(
        name="mistral_nemo",
        prefix="{bos_token}",
        system="{content}\n\n",
        system_in_user="last",
        user="[INST]{content}[/INST]",
        assistant="{content}{eos_token}",
        observation='[TOOL_RESULTS]{"content": {content}}[/TOOL_RESULTS]',
        function="[TOOL_CALLS]{content}{eos_token}",
        tool_format="mistral",
        description="Mistral Tekken tokenizer (Nemo, Ministral, Pixtral): '[INST]...[/INST]' without spaces",
    ),
]
