"""The vLLM engine for `infer_backend: vllm` (a CUDA machine with the vllm package). Prompts are written by the
same template code as training and the Hugging Face engine; vLLM samples, with the adapter (unmerged) as a
LoRA request.

vLLM's offline `LLM` returns whole replies, so a stream from this engine arrives as one piece."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.errors import RecipeError
from tasks.inference import SAMPLING_DEFAULTS, ChatEngine, Generated, Generation, parse_tool_calls, tool_names

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts (MaxLoRARanks)


def max_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank` (at least its default, 16): a rank of 24, or a
    PiSSA adapter converted to rank 2r, is no value of vLLM's own."""
    fitting = [r for r in VLLM_LORA_RANKS if r >= max(16, rank)]
    if not fitting:
        raise RecipeError(f"infer_backend vllm: the adapter's rank {rank} is above vLLM's largest, "
                          f"{VLLM_LORA_RANKS[-1]}; serve it with infer_backend: huggingface")
    return fitting[0]


class VllmEngine(ChatEngine):
    def __init__(self, model_dir: Path, template, adapter_dir: Path | None = None, name: str = "tunefactory",
                 trust_remote_code: bool = False, generation: Generation = SAMPLING_DEFAULTS):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        super().__init__(model_dir, template, adapter_dir, name, trust_remote_code, generation)
        options: dict[str, Any] = {}
        self.lora = None
        if adapter_dir is not None:
            rank = json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 16)
            options = {"enable_lora": True, "max_lora_rank": max_lora_rank(rank)}
            self.lora = LoRARequest("adapter", 1, str(adapter_dir))
        self.llm = LLM(model=str(model_dir), tokenizer=str(adapter_dir if adapter_dir else model_dir),
                       trust_remote_code=trust_remote_code, **options)
        self.context = self.llm.llm_engine.model_config.max_model_len
        self.lock = threading.Lock()  # the offline LLM is not thread-safe; the API generates on worker threads

    def generate(self, messages: list[dict[str, Any]], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, stop: list[str] | None = None, n: int = 1,
                 tools: list[dict] | None = None, seed: int | None = None) -> list[Generated]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self.prompt(messages, tools)
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, stop=stop or None,
                                max_tokens=self.reply_budget(ids, max_tokens), stop_token_ids=self.stops,
                                top_k=self.generation.top_k or -1,
                                repetition_penalty=self.generation.repetition_penalty, seed=seed,
                                skip_special_tokens=True)
        with self.lock:
            output = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=self.lora,
                                       use_tqdm=False)[0]
        replies = []
        for choice in output.outputs:
            calls = parse_tool_calls(choice.text, self.template.tool_format, tool_names(tools)) if tools else None
            replies.append(Generated(text="" if calls else choice.text, prompt_tokens=len(ids),
                                     completion_tokens=len(choice.token_ids),
                                     finish_reason="tool_calls" if calls else choice.finish_reason or "stop",
                                     tool_calls=calls))
        return replies

    def stream(self, messages: list[dict[str, Any]], max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> WholeReply:
        self.reply_budget(self.prompt(messages), max_tokens)  # bad messages fail now, before a stream opens
        return WholeReply(lambda: self.generate(messages, max_tokens, temperature, top_p, stop, seed=seed)[0])


class WholeReply:
    """A stream of one piece: the whole reply."""

    def __init__(self, produce):
        self.produce, self.result = produce, None

    def cancel(self) -> None:
        """Nothing to stop: the reply is generated in one call."""

    def __iter__(self) -> Iterator[str]:
        self.result = self.produce()
        yield self.result.text
