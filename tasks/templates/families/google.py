"""Google's Gemma turns."""

from tasks.templates.base import Template

GEMMA_USER = "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"

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
    # google/gemma-2-*-it: Gemma's turns; its template refuses a system role, so the system text leads the
    # first user turn (as LlamaFactory writes it). EOS also stops generation.
    Template(
        name="gemma2",
        prefix="{bos_token}",
        system="{content}\n\n",
        system_in_user="first",
        user=GEMMA_USER,
        assistant="{content}<end_of_turn>\n",
        observation="<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n",
        stop_words=("<end_of_turn>", "<eos>"),
        description="Gemma 2 '<start_of_turn>user / model' turns",
    ),
    *[
        Template(
            name=name,
            prefix="{bos_token}",
            system="{content}\n\n",
            system_in_user="first",
            user=GEMMA_USER,
            assistant="{content}<end_of_turn>\n",
            observation="<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n",
            stop_words=("<end_of_turn>",),
            description=f"{label} '<start_of_turn>user / model' turns (text only), system text in the first turn",
        )
        for name, label in (("gemma3", "Gemma 3"), ("gemma3n", "Gemma 3n"))
    ],
]
