"""Google's Gemma turns."""

from tasks.templates.base import Template

GEMMA_USER = "<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
GEMMA_TOOL = "<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n"


def gemma(name: str, description: str, **fields) -> Template:
    """Gemma's turns; its templates refuse a system role, so the system text leads the first user turn."""
    formats = {"prefix": "{bos_token}", "system": "{content}\n\n", "system_in_user": "first", "user": GEMMA_USER,
               "assistant": "{content}<end_of_turn>\n", "stop_words": ("<end_of_turn>",)}
    return Template(name=name, description=description, **{**formats, **fields})


TEMPLATES = [
    # google/gemma-3-*-it (same turns as Gemma 1/2).
    gemma("gemma", "Gemma 1/2/3 '<start_of_turn>user / model' turns, system text in the first turn"),
    # google/gemma-2-*-it, as LlamaFactory writes it: tool turns, its efficient_eos (EOS labelled where each later
    # prompt starts, and closing the conversation), EOS also stopping generation.
    gemma("gemma2", "Gemma 2 '<start_of_turn>user / model' turns", observation=GEMMA_TOOL, suffix="{eos_token}",
          efficient_eos=True, stop_words=("<end_of_turn>", "<eos>")),
    *[
        gemma(name, f"{label} '<start_of_turn>user / model' turns (text only), system text in the first turn",
              observation=GEMMA_TOOL)
        for name, label in (("gemma3", "Gemma 3"), ("gemma3n", "Gemma 3n"))
    ],
]
