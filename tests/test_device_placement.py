"""The stages that run their own forward passes (evaluate, exam, ppo, chat and the API) put the model on the GPU
where there is one, and every tensor they feed it on the model's device.

No GPU is needed to check the second half: the model goes to torch's `meta` device (shapes, no data) and a
tensor left on the CPU either fails the computation there or shows in what reached the model. Passes that need
real values (a loss's `.item()`, generation's stopping) are cut at the model's input."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tasks import ppo, ppo_loop
from tasks.core import hardware
from tests.conftest import tiny_llama_config

META = torch.device("meta")
GENERATION = {"pad_token_id": 0, "stop_token_ids": [2]}


class Reached(Exception):
    """Raised where the model is reached: what follows needs real values, which a meta model has not."""


def tensor_devices(args, kwargs) -> set[torch.device]:
    return {value.device for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor)}


def inputs_of_first_forward(model) -> set[torch.device]:
    """The devices of the tensors the model's first forward is called with (filled in when it is called)."""
    devices: set[torch.device] = set()

    def stop(module, args, kwargs):
        devices.update(tensor_devices(args, kwargs))
        raise Reached

    model.register_forward_pre_hook(stop, with_kwargs=True)
    return devices


def inputs_of_generate(model) -> set[torch.device]:
    devices: set[torch.device] = set()

    def generate(*args, **kwargs):
        devices.update(tensor_devices(args, kwargs))
        raise Reached

    model.generate = generate
    return devices


def meta_model(**config):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(64, **config)).to(META).eval()


def test_compute_device_is_the_ranks_cuda_device_where_torch_sees_one(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(hardware, "has_cuda", lambda: False)
    assert hardware.compute_device() == "cpu"
    assert hardware.quantized_placement() == {"device_map": {"": "cpu"}}
    monkeypatch.setattr(hardware, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert hardware.compute_device() == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "3")  # a rank under torchrun, before the Trainer sets its current device
    assert hardware.quantized_placement() == {"device_map": {"": "cuda:3"}}


def test_a_plain_model_moves_and_a_quantized_or_device_mapped_one_stays(monkeypatch):
    monkeypatch.setattr(hardware, "compute_device", lambda: "meta")
    plain = LlamaForCausalLM(tiny_llama_config(64))
    assert hardware.place_on_compute_device(plain) is plain and plain.device == META
    quantized, mapped = LlamaForCausalLM(tiny_llama_config(64)), LlamaForCausalLM(tiny_llama_config(64))
    quantized.is_quantized, mapped.hf_device_map = True, {"": "cpu"}  # bitsandbytes placed it when loading
    hardware.place_on_compute_device(quantized)
    hardware.place_on_compute_device(mapped)
    assert quantized.device == mapped.device == torch.device("cpu")


def test_evaluation_feeds_the_model_on_its_device(monkeypatch):
    import tasks.eval_passes as passes
    from tasks.evaluate import pair_preference

    config = SimpleNamespace(sampling=None, batch_size=2, max_new_tokens=3, repetition_penalty=None, progress=False)
    rows = {"prompt_ids": [[5, 6], [7, 8, 9]], "input_ids": [[5, 6, 30, 2], [7, 8, 9, 31, 2]],
            "labels": [[-100, -100, 30, 2], [-100, -100, -100, 31, 2]]}
    model = meta_model()
    seen = inputs_of_first_forward(model)
    with pytest.raises(Reached):
        passes.score_and_generate(model, None, rows, config, GENERATION)  # one forward for loss and cache
    assert seen == {META}
    seen = inputs_of_generate(model := meta_model())
    with pytest.raises(Reached):
        passes.generate(model, None, rows["prompt_ids"], config, GENERATION)
    assert seen == {META}
    monkeypatch.setattr(passes, "flat_batches_supported", lambda model: False)  # padded batches: no data-dependent
    seen = inputs_of_first_forward(model := meta_model())                        # sample bounds before the forward
    with pytest.raises(Reached):
        passes.perplexity(model, rows, 0, 2, progress=False)
    assert seen == {META}
    pairs = {"chosen_ids": [[5, 6, 30]], "chosen_labels": [[-100, -100, 30]], "rejected_ids": [[5, 6, 31]],
             "rejected_labels": [[-100, -100, 31]]}
    monkeypatch.setattr("tasks.lean_training.flat_batches_supported", lambda model: False)
    seen = inputs_of_first_forward(model := meta_model())
    with pytest.raises(Reached):
        pair_preference(model, pairs, 0, 2, progress=False)
    assert seen == {META}


def test_exam_questions_reach_the_model_on_its_device(tiny_model_dir):
    from transformers import AutoTokenizer

    from tasks.exam import predict

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(META).eval()
    seen = inputs_of_first_forward(model)
    with pytest.raises(Reached):
        predict(model, tokenizer, [tokenizer.encode("Question: which?")], batch_size=2, progress=False)
    assert seen == {META}


def test_chat_prompts_and_its_stop_check_are_on_the_model_device(tiny_model_dir):
    from tasks.inference import Cancelled, HuggingFaceEngine

    engine = HuggingFaceEngine(tiny_model_dir, "chatml", name="tiny")
    engine.model.to(META)
    seen = inputs_of_generate(engine.model)
    question = [{"role": "user", "content": "What does os.path.join do?"}]
    with pytest.raises(Reached):
        engine.generate(question, n=2)
    assert seen == {META}
    with pytest.raises(Reached):
        list(engine.stream(question))  # generated on a worker thread, its failure re-raised here
    assert seen == {META}
    assert Cancelled(threading.Event())(torch.zeros(2, 3, device=META), None).device == META  # ORed with
    # generation's own stop flags, which are on the model's device


def test_ppo_experience_is_computed_on_the_model_device(tiny_model_dir, monkeypatch):
    """Scoring, policy, reference and critic passes and KL-shaped rewards of a rollout batch, with
    the shared model on another device than the CPU: the heads join it there and every tensor made on the way
    is made there (eager attention: SDPA's mask check reads values; a boolean mask's selection is taken to
    keep every element, the shape meta tensors give it)."""
    import torch.fx.experimental._config as fx_config
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)

    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager"),
                            LoraConfig(r=4, target_modules="all-linear"))
    policy.add_adapter(ppo_loop.REWARD, LoraConfig(r=4, target_modules="all-linear"))
    policy.set_adapter(ppo_loop.POLICY)
    policy.to(META)
    critic = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
    reward_head = ppo_loop.linear_head(critic.weight.detach(), trainable=False)
    shared = ppo_loop.SharedModel(policy, critic, reward_head)
    assert shared.critic.weight.device == shared.reward_head.weight.device == META
    seen = set()

    def advantages_and_returns(values, rewards, mask, *args):  # it whitens by the count of reply tokens: a value
        seen.update(tensor_devices((values, rewards, mask), {}))
        return values, values

    monkeypatch.setattr(ppo_loop, "advantages_and_returns", advantages_and_returns)
    settings = ppo.PPOSettings(buffer_size=1, epochs=1, score_norm=False, target_kl=0.1, whiten_rewards=False)
    batch = ppo_loop.experience(shared, [[5, 17, 42], [7, 3]], [[8, 9, 2], [11, 2]], 0, 0.2, settings, None)
    assert seen == {value.device for value in batch.values()} == {META}
    assert batch["logprobs"].shape == batch["response"].shape == (2, 5)
