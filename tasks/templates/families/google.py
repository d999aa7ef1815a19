"""Google's Gemma turns."""

from tasks.templates.base import Template

TEMPLATES = [
    # google/gemma-3-*-it (same turns as Gemma 1/2, whose templates reject a system role): the system
    # text leads the first user turn.
    Template(
        name="gemma",
        prefix="{bos_token}",
        system="{content}\n\n",
        system_in_user="first",
        user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
        assistant="{content}<end_of_turn>\n",
        stop_words=("<end_of_turn>",),
        description="Gemma 1/2/3 '<start_of_turn>user / model' turns, system text in the first turn",
    ),
]
