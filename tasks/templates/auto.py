"""`template: auto`: format with the tokenizer's own jinja chat_template, split turn by turn.

Successive prefixes of the conversation are rendered (with the generation prompt after a user-side
turn); the differences between them are the prompt and response pieces, so labels cover exactly
what the template writes for each reply.
"""

from __future__ import annotations

import os
import re

from tasks.core.errors import RecipeError
from tasks.templates.base import Template, check_roles
from tasks.templates.tools import RESULTS_SEPARATOR, stored_calls

AUTO = Template(
    name="auto",
    user="",
    assistant="",
    jinja=True,
    description="the tokenizer's own jinja chat_template, split into prompt/reply turn by turn",
)
PICK_NAMED = "set `template` to a named template instead (`tunefactory templates list`)"


def chat_messages(message: dict) -> list[dict]:
    """One of our messages in chat_template terms: observation -> tool (the results of parallel calls as one
    tool message each), function -> assistant tool_calls."""
    role, content = message["role"], message["content"]
    if role == "observation":
        return [{"role": "tool", "content": result} for result in content.split(RESULTS_SEPARATOR)]
    if role == "function":
        calls = stored_calls(content)
        if not calls:
            return [{**message, "role": "assistant"}]
        return [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}
                                                                     for call in calls]}]
    return [{"role": role, "content": content}]


def with_call_ids(conversation: list[dict]) -> list[dict]:
    """Tool calls numbered call00001, call00002, ... through the conversation, and each tool message given the id
    of the call it answers (in order): templates that write ids need them (Mistral's: 9 or more alphanumeric
    characters), and neither a dataset row nor an API request keeps ids, so both are numbered alike."""
    numbered, waiting, count = [], [], 0
    for message in conversation:
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                count += 1
                calls.append({**call, "id": f"call{count:05d}"})
            message, waiting = {**message, "tool_calls": calls}, [call["id"] for call in calls]
        elif message["role"] == "tool" and waiting:
            message = {**message, "tool_call_id": waiting.pop(0)}
        numbered.append(message)
    return numbered


def render_chat(tokenizer, conversation: list[dict], generation: bool, variables: dict | None = None) -> str:
    """The tokenizer's chat_template applied to a conversation, as text (`variables`: the template's own, such as
    Qwen3's enable_thinking)."""
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation,
                                             **(variables or {}))
    except Exception as error:  # the template's own raise_exception, or jinja errors
        raise RecipeError(
            f"key 'template': the tokenizer's chat_template rejected a conversation ({error}); {PICK_NAMED}"
        ) from error


def token_starts(tokenizer, text: str) -> set[int]:
    """Character offsets where the tokenizer starts a token in text (every offset for slow tokenizers)."""
    if not getattr(tokenizer, "is_fast", False):
        return set(range(len(text) + 1))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return {start for start, _ in offsets} | {len(text)}


def turn_end(tokenizer, full: str, rendered: str, message: dict, start: int) -> int | None:
    """Where a message's rendering ends inside the full conversation's text; None if it cannot be placed."""
    if full.startswith(rendered):
        return len(rendered)
    # Some templates write the last reply differently from one in history (EOS after the conversation,
    # an empty thinking block): anchor on the reply's content and keep the whole tokens that both
    # renderings write after it (the end-of-turn marker).
    content = message["content"].strip()
    at_full, at_rendered = full.find(content, start), rendered.rfind(content)
    if message["role"] != "assistant" or not content or at_full < 0 or at_rendered < 0:
        return None
    tail = rendered[at_rendered + len(content) :]
    shared = len(os.path.commonprefix([full[at_full + len(content) :], tail]))
    return at_full + len(content) + max(cut for cut in token_starts(tokenizer, tail) if cut <= shared)


THOUGHT = re.compile(r"<think>.*?</think>\s*", re.DOTALL)  # the <think> block Qwen3 and DeepSeek-R1 write


def without_thoughts(messages: list[dict]) -> list[dict]:
    """Messages with the replies' <think> blocks removed (`enable_thinking: false` with a model's own template)."""
    return [{**m, "content": THOUGHT.sub("", m["content"])} if m["role"] in ("assistant", "function") else m
            for m in messages]


def chat_template_pairs(tokenizer, messages: list[dict], system: str, variables: dict | None = None
                        ) -> list[tuple[str, str]]:
    """(prompt text, response text) per exchange, cut from the tokenizer's chat_template rendering. With
    `enable_thinking: false` among the variables, a template that reads it (Qwen3's) ends each generation prompt
    with the empty thinking block, which so stays untrained, as LlamaFactory's reasoning template does."""
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"key 'template': 'auto' needs the tokenizer's chat_template, but it has none; {PICK_NAMED}")
    check_roles(messages)
    messages = messages[: len(messages) // 2 * 2]
    head = [{"role": "system", "content": system}] if system else []
    conversation, ends = list(head), []  # ends[i]: the chat messages up to and including our message i
    for message in messages:
        conversation += chat_messages(message)
        ends.append(len(conversation))
    conversation = with_call_ids(conversation)
    full = render_chat(tokenizer, conversation, generation=False, variables=variables)
    cuts: list[int] = []
    for index, message in enumerate(messages):
        # the variables shape the generation prompt of the reply trained last; history renders without them, as
        # the full conversation writes it (Qwen3 writes no thinking block in replies before the last)
        last_prompt = index == len(messages) - 2
        rendered = render_chat(tokenizer, conversation[: ends[index]], generation=index % 2 == 0,
                               variables=variables if last_prompt else None)
        cut = turn_end(tokenizer, full, rendered, message, cuts[-1] if cuts else 0)
        if cut is None or (cuts and cut < cuts[-1]):
            raise RecipeError(
                f"key 'template': the tokenizer's chat_template does not render this conversation turn by turn "
                f"(message {index} changes once later turns are added, e.g. the system prompt moves); {PICK_NAMED}"
            )
        cuts.append(cut)
    if not cuts:
        return []
    cuts[-1] = len(full)  # whatever the template writes after the last reply belongs to it
    pieces = [full[a:b] for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
    return list(zip(pieces[0::2], pieces[1::2], strict=True))


def end_of_turn_tokens(tokenizer) -> tuple[str, ...]:
    """The special token the chat_template writes right after a reply (e.g. <|eot_id|>), if there is one."""
    marker = "Reply-7f3a"
    exchange = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = render_chat(tokenizer, exchange, generation=False)
    except RecipeError:
        return ()
    tail = text[text.rfind(marker) + len(marker) :].lstrip()
    added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return next(((token,) for token in added if token and tail.startswith(token)), ())
