"""Mistral's newer Tekken formats: Mistral Small 3 ([SYSTEM_PROMPT] block) and Ministral."""

from tasks.templates.base import Template

TOOLS = {
    "observation": '[TOOL_RESULTS]{"content": {content}}[/TOOL_RESULTS]',
    "function": "[TOOL_CALLS]{content}{eos_token}",
    "tool_format": "mistral",  # [AVAILABLE_TOOLS] and [TOOL_CALLS] lists, as LlamaFactory's ministral/mistral_small
}

TEMPLATES = [
    # mistralai/Mistral-Small-3.1-24B-Instruct-2503 (v7 Tekken): the system prompt is its own block after BOS.
    # Unlike the published template, which writes a long default system prompt carrying today's date
    # (strftime_now) when the conversation has none, none is written here (as LlamaFactory): a date would make
    # the training text depend on the day it is rendered. Set default_system for one.
    Template(
        name="mistral_small",
        prefix="{bos_token}",
        system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]",
        user="[INST]{content}[/INST]",
        assistant="{content}{eos_token}",
        description="Mistral Small 3.x '[SYSTEM_PROMPT] ... [INST]...[/INST]'",
        **TOOLS,
    ),
    # mistralai/Ministral-8B-Instruct-2410: the published (Tekken v3) template writes the system text in the
    # LAST user turn; LlamaFactory's ministral folds it into the first. (Ministral's own file was not found to
    # check against; Mistral-Nemo-Instruct-2407's Tekken v3 template, which llama.cpp quotes, does this.)
    Template(
        name="ministral",
        prefix="{bos_token}",
        system="{content}\n\n",
        system_in_user="last",
        user="[INST]{content}[/INST]",
        assistant="{content}{eos_token}",
        description="Ministral 8B '[INST]...[/INST]' without spaces, system text in the last turn",
        **TOOLS,
    ),
]
