"""Chat inference for `tunefactory chat` and `tunefactory api`: a model (and, unmerged, an adapter) that answers
OpenAI-style messages, written through the recipe's chat template exactly as training encoded them.

Messages: an optional system message, then turns alternating user-side (`user`, `tool`) and assistant-side
(`assistant`, possibly with `tool_calls`), ending on the user side. Tool definitions join the system
prompt as the template lists them; a reply holding tool calls, written as the template's tool format
writes them (or as a bare `{"name": ..., "arguments": ...}` object), is returned as OpenAI `tool_calls`.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import StoppingCriteria

from tasks.core.errors import DataError, RecipeError
from tasks.core.hardware import place_on_compute_device
from tasks.encoding import prompt_and_reply
from tasks.templates import stop_token_ids
from tasks.templates.choice import TemplateChoice
from tasks.templates.tools import bare_tools, calls_text, read_calls, results_text

USER_SIDE = {"user": "user", "tool": "observation", "observation": "observation"}


class MessageError(ValueError):
    """Messages that cannot be written through a chat template (the API answers them with a 400)."""


@dataclass(frozen=True)
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | tool_calls
    tool_calls: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Generation:
    """The sampling settings no request field sets: the recipe's (top_k, repetition_penalty), as LlamaFactory's
    chat and API take its generating arguments; top_k applies when sampling (temperature > 0)."""

    top_k: int = 0
    repetition_penalty: float = 1.0


SAMPLING_DEFAULTS = Generation()


def check_backend(backend: str) -> None:
    """Refuse, in one line, an inference backend whose package is not installed."""
    if backend != "huggingface" and importlib.util.find_spec(backend) is None:
        raise RecipeError(f"key 'infer_backend': {backend} needs the {backend} package (and a GPU it supports); "
                          "it is not installed here: use infer_backend: huggingface")


def call_of(call: Any, index: int) -> dict[str, Any]:
    """{"name", "arguments"} of one OpenAI tool call in message `index`; MessageError when it is malformed."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not function.get("name"):
        raise MessageError(f"message {index}: a tool call without function.name")
    arguments = function.get("arguments") or "{}"
    try:
        return {"name": function["name"], "arguments": json.loads(arguments) if isinstance(arguments, str)
                else arguments}
    except ValueError:
        raise MessageError(f"message {index}: tool call arguments are not valid JSON") from None


def conversation(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """(system text, turns in the template's roles) from OpenAI-style messages; MessageError when they do not
    alternate or do not end on the user side. Tool calls and results are written as the openai dataset format
    stores them (tasks.formats.openai): one call as an object, parallel calls as a list, and the results of
    parallel calls (consecutive tool messages) as one turn holding their list."""
    system = ""
    turns: list[dict[str, str]] = []
    results: list[str] = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content") or ""
        if role in ("system", "developer") and index == 0:  # OpenAI's newer name for the system message
            system = content
        elif role == "tool" and turns and turns[-1]["role"] == "observation" and results:
            results.append(content)  # answers one of the parallel calls
            turns[-1]["content"] = results_text(results)
        elif role in USER_SIDE:
            turns.append({"role": USER_SIDE[role], "content": content})
            results = [content] if role == "tool" else []
        elif role == "assistant" and message.get("tool_calls"):
            calls = [call_of(call, index) for call in message["tool_calls"]]
            turns.append({"role": "function", "content": calls_text(calls)})
        elif role == "assistant":
            turns.append({"role": "assistant", "content": content})
        else:
            raise MessageError(f"message {index}: role {role!r} is not one of system (first), user, assistant, tool")
    for index, turn in enumerate(turns):
        if (turn["role"] in ("user", "observation")) != (index % 2 == 0):
            raise MessageError("messages must alternate user (or tool) and assistant turns")
    if not turns or len(turns) % 2 == 0:
        raise MessageError("the last message must be a user (or tool) message")
    return system, turns


def parse_tool_calls(text: str, tool_format: str = "default",
                     names: set[str] | None = None) -> list[dict[str, Any]] | None:
    """OpenAI tool_calls from a reply that calls tools, written as the template's tool format writes calls
    (or as a bare JSON call / <tool_call> blocks), or None. With `names` (the offered tools'), a call to any
    other name is no call: a JSON answer with a "name" field is an answer."""
    calls = read_calls(tool_format, text)
    if calls and names is not None and not all(call["name"] in names for call in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for call in calls] if calls else None


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    """The names of OpenAI-style tool definitions (wrapped or bare)."""
    return {tool.get("name") for tool in bare_tools(tools or []) if isinstance(tool, dict)}


def context_length(config) -> int | None:
    """The most tokens a model's positions cover (prompt and reply together), where its config says."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class ChatEngine:
    """Writes OpenAI-style messages through a named template and reads replies back; its subclasses generate
    (HuggingFaceEngine here, tasks.inference_vllm.VllmEngine)."""

    name: str
    tokenizer: Any
    context: int | None = None  # the model's context length, where known (subclasses set it)
    pad_id: int | None = None  # what generate pads a finished row of several with

    def __init__(self, model_dir: Path, template: str | TemplateChoice | None, adapter_dir: Path | None, name: str,
                 trust_remote_code: bool = False, generation: Generation = SAMPLING_DEFAULTS):
        from transformers import AutoTokenizer

        self.name, self.generation = name, generation
        self.remote = {"trust_remote_code": trust_remote_code}
        # A trained adapter carries its tokenizer (special tokens it may have added); a bare one does not.
        with_tokenizer = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file() else None
        self.tokenizer = AutoTokenizer.from_pretrained(str(with_tokenizer or model_dir), **self.remote)
        choice = template if isinstance(template, TemplateChoice) else TemplateChoice(name=template)
        self.template = choice.load(self.tokenizer)
        if self.template.jinja and not self.tokenizer.chat_template:
            raise RecipeError(f"key 'template': 'auto' needs a chat template in {model_dir}'s tokenizer; name one")
        self.stops = stop_token_ids(self.tokenizer, self.template)

    def prompt(self, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation up to the assistant's reply."""
        system, turns = conversation(messages)
        row = {"prompt": turns, "system": system or self.template.default_system,
               "tools": json.dumps(tools) if tools else ""}
        try:
            ids, _ = prompt_and_reply(row, {"role": "assistant", "content": ""}, self.tokenizer, self.template)
        except (DataError, RecipeError) as error:  # parallel calls a format writes one per turn; a chat_template's
            raise MessageError(str(error)) from None  # own refusal (template: auto)
        return ids

    def reply_budget(self, ids: list[int], max_tokens: int) -> int:
        """max_tokens, cut to what the model's context leaves after the prompt; a prompt that fills the context
        is refused (OpenAI's context_length_exceeded)."""
        if self.context is None:
            return max_tokens
        room = self.context - len(ids)
        if room <= 0:
            raise MessageError(f"the messages are {len(ids)} tokens; this model's context is {self.context} tokens, "
                               "which must hold the reply too")
        return min(max_tokens, room)

    def generate(self, messages: list[dict[str, Any]], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, n: int = 1,
                 tools: list[dict] | None = None, seed: int | None = None) -> list[Generated]:
        """n replies to the messages."""
        raise NotImplementedError

    def stream(self, messages: list[dict[str, Any]], max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> ReplyStream:
        """The reply, iterated as text pieces while it is generated; its Generated summary after."""
        raise NotImplementedError

    def finish(self, tokens: list[int], prompt_tokens: int, max_tokens: int, stop: list[str],
               tools: list[dict] | None) -> Generated:
        """A sampled reply cut at its stop, with its finish reason and any tool calls. A row of several (n > 1)
        that a stop string ended is padded to the others' length: its padding is not part of it."""
        kept, ended = [], False  # ended: a stop token closed the reply (it counts as generated)
        for token in tokens:
            if token in self.stops:
                ended = True
                break
            if token == self.pad_id:
                break
            kept.append(token)
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cut = min((text.index(word) for word in stop if word in text), default=None)
        if cut is not None:
            text = text[:cut]
        reason = "length" if not ended and cut is None and len(kept) >= max_tokens else "stop"
        calls = parse_tool_calls(text, self.template.tool_format, tool_names(tools)) if tools else None
        # After a stop string nothing more was generated: a stop token there is padding (pad being EOS).
        return Generated(text=text if not calls else "", prompt_tokens=prompt_tokens,
                         completion_tokens=len(kept) + (ended and cut is None),
                         finish_reason="tool_calls" if calls else reason, tool_calls=calls)


class HuggingFaceEngine(ChatEngine):
    """transformers' generate on a model plus an optional adapter, not merged."""

    def __init__(self, model_dir: Path, template: str | TemplateChoice | None, adapter_dir: Path | None = None,
                 name: str = "tunefactory", trust_remote_code: bool = False,
                 generation: Generation = SAMPLING_DEFAULTS):
        from transformers import AutoModelForCausalLM

        super().__init__(model_dir, template, adapter_dir, name, trust_remote_code, generation)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **self.remote)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = place_on_compute_device(model).eval()
        self.context = context_length(self.model.config)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        self.lock = threading.Lock()  # one generate at a time on this model

    def options(self, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                stop: list[str]) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        sampling = {"do_sample": temperature > 0, "repetition_penalty": self.generation.repetition_penalty}
        if temperature > 0:
            sampling |= {"temperature": temperature, "top_p": top_p, "top_k": self.generation.top_k or None}
        # Not generate's stop_strings: they match across the prompt's end, so a stop string that begins in the
        # prompt's last characters ended a reply that never held it.
        extra = {"stopping_criteria": StoppingCriteriaList([ReplyStopStrings(self.tokenizer, stop, len(ids))])
                 } if stop else {}
        return {"max_new_tokens": self.reply_budget(ids, max_tokens), "eos_token_id": self.stops,
                "pad_token_id": self.pad_id, **sampling, **extra}

    def generate(self, messages: list[dict[str, Any]], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, n: int = 1,
                 tools: list[dict] | None = None, seed: int | None = None) -> list[Generated]:
        """n replies to the messages."""
        import torch

        ids = self.prompt(messages, tools)
        options = self.options(ids, max_tokens, temperature, top_p, stop or [])
        prompts = torch.tensor([ids] * n, device=self.model.device)
        with self.lock, torch.no_grad():
            seeded(seed)
            output = self.model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **options)
        budget = options["max_new_tokens"]
        return [self.finish(row[len(ids):].tolist(), len(ids), budget, stop or [], tools) for row in output]

    def stream(self, messages: list[dict[str, Any]], max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> ReplyStream:
        """The reply, iterated as text pieces while it is generated; its Generated summary after."""
        ids = self.prompt(messages)
        options = self.options(ids, max_tokens, temperature, top_p, stop or [])
        return ReplyStream(self, ids, options, options["max_new_tokens"], stop or [], seed)


class Cancelled(StoppingCriteria):
    """Ends generation once the reader has gone (a closed stream)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def seeded(seed: int | None) -> None:
    """A request's seed, set under the engine's lock just before it samples: the same request, the same reply."""
    if seed is not None:
        import torch

        torch.manual_seed(seed)


class ReplyStopStrings(StoppingCriteria):
    """Ends each row once its reply (the tokens after the prompt) holds one of the stop strings."""

    def __init__(self, tokenizer, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        replies = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(word in reply for word in self.stops) for reply in replies], dtype=torch.bool,
                            device=input_ids.device)


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string: a stream keeps them
    until the next piece shows whether they are, so no part of a stop string is ever sent."""
    return max((k for word in stops for k in range(1, len(word)) if text.endswith(word[:k])), default=0)


class ReplyStream:
    """One reply generated on a worker thread: iterate for text pieces (cut at a stop string); `result` holds
    the whole reply's Generated once iteration ends. Closing the iterator early stops generation."""

    def __init__(self, engine: HuggingFaceEngine, ids: list[int], options: dict[str, Any], max_tokens: int,
                 stop: list[str], seed: int | None = None):
        self.engine, self.ids, self.options, self.max_tokens, self.stop = engine, ids, options, max_tokens, stop
        self.seed = seed
        self.result: Generated | None = None
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating (safe from any thread); iteration ends at the next token."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        engine, cancelled = self.engine, self.cancelled
        streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        output: list[list[int]] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with engine.lock, torch.no_grad():
                    seeded(self.seed)
                    prompt = torch.tensor([self.ids], device=engine.model.device)
                    options = dict(self.options)
                    criteria = StoppingCriteriaList([Cancelled(cancelled), *options.pop("stopping_criteria", [])])
                    sequences = engine.model.generate(
                        input_ids=prompt, attention_mask=torch.ones_like(prompt), streamer=streamer,
                        stopping_criteria=criteria, **options)
                output.append(sequences[0, len(self.ids):].tolist())
            except BaseException as exc:  # handed to the reader, which re-raises it
                failure.append(exc)
                streamer.end()  # unblock the reader

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        shown, sent = "", 0  # the text so far, and how much of it has been handed out
        try:
            for piece in streamer:
                shown += piece
                cut = next((shown.index(word) for word in self.stop if word in shown), None)
                if cut is not None:
                    yield shown[sent:cut]
                    break
                ready = len(shown) - held_back(shown, self.stop)
                if ready > sent:
                    yield shown[sent:ready]
                    sent = ready
            else:
                if len(shown) > sent:
                    yield shown[sent:]
        finally:
            cancelled.set()
            # An abandoned stream is closed by whichever thread's garbage collection finds it, which can be
            # the worker itself (a reply that hit the 429 test's concurrency limit did): it stops on its own.
            if worker is not threading.current_thread():
                worker.join()
        if failure:
            raise failure[0]
        if output:
            self.result = engine.finish(output[0], len(self.ids), self.max_tokens, self.stop, None)


def load_engine(backend: str, model_dir: Path, template: str | TemplateChoice | None, adapter_dir: Path | None,
                name: str, trust_remote_code: bool = False, generation: Generation = SAMPLING_DEFAULTS) -> ChatEngine:
    """The engine for a recipe's `infer_backend`; one whose package is missing is refused in one line."""
    check_backend(backend)
    if backend == "vllm":
        from tasks.inference_vllm import VllmEngine

        return VllmEngine(model_dir, template, adapter_dir, name, trust_remote_code, generation)
    return HuggingFaceEngine(model_dir, template, adapter_dir, name, trust_remote_code, generation)
