"""tasks.lora_linear: the fused LoRA layer gives peft's numbers and gradients, falls back to peft's forward
where its fast path does not hold, and saves, loads, merges and copies as peft's own layer does."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tasks.lora_linear import FusedLoraLinear, use_fused_lora_linears
from tasks.train_methods import LoraSettings, attach_trainable, hold_frozen_linears_in_bf16


def wrapped(model_dir, fused: bool, checkpointing: bool = False, **lora):
    """The tiny Llama with LoRA on every linear layer; B starts non-zero so the adapter changes the output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora)
    if fused:
        use_fused_lora_linears(config)
    torch.manual_seed(0)  # the same random factors in both models
    return get_peft_model(model, config)


def step(model, bf16: bool = False):
    """Loss, logits and the adapter's gradients of one forward and backward on fixed tokens."""
    model.train()
    model.zero_grad()
    ids = torch.arange(2, 26).reshape(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach().float(), grads


def lora_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, FusedLoraLinear)]


def took_fast_path(layer, x) -> bool:
    layer.train()
    return type(layer(x).grad_fn).__name__ == "LoraMatmulsBackward"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_layers_give_peft_numbers_and_gradients_in_fp32(tiny_model_dir, checkpointing):
    peft_model, fused_model = (wrapped(tiny_model_dir, fused, checkpointing) for fused in (False, True))
    assert lora_layers(peft_model) == [] and len(lora_layers(fused_model)) == 2 * 7  # 2 layers x 7 linears
    (loss, logits, grads), (fused_loss, fused_logits, fused_grads) = step(peft_model), step(fused_model)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == grads.keys() and len(grads) == 2 * 2 * 7  # A and B of every layer
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    layer = lora_layers(fused_model)[0]
    assert took_fast_path(layer, torch.randn(3, layer.in_features, requires_grad=True))


def test_fused_layers_under_bf16_autocast_are_as_close_to_fp32_as_peft_is(tiny_model_dir):
    _, exact_logits, exact_grads = step(wrapped(tiny_model_dir, fused=False))
    models = [wrapped(tiny_model_dir, fused) for fused in (False, True)]
    for model in models:
        hold_frozen_linears_in_bf16(model)  # as the train stage does under bf16
    (_, logits, grads), (_, fused_logits, fused_grads) = (step(m, bf16=True) for m in models)

    def error(value, exact):
        return ((value - exact).norm() / exact.norm()).item()

    assert error(fused_logits, exact_logits) < 1.25 * error(logits, exact_logits) < 0.05
    assert all(fused_grads[name].dtype == torch.float32 for name in exact_grads)  # reach the fp32 factors
    peft_errors = [error(grads[name], exact) for name, exact in exact_grads.items()]
    fused_errors = [error(fused_grads[name], exact) for name, exact in exact_grads.items()]
    assert sum(fused_errors) < 1.25 * sum(peft_errors) and max(fused_errors) < 0.1  # bf16's rounding, no more
    layer = lora_layers(models[1])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert took_fast_path(layer, torch.randn(3, layer.in_features, requires_grad=True))


def test_peft_forward_runs_where_the_fast_path_does_not_hold(tiny_model_dir):
    model = wrapped(tiny_model_dir, fused=True, lora_dropout=0.1)
    layer = lora_layers(model)[0]
    x = torch.randn(3, layer.in_features, requires_grad=True)
    assert not took_fast_path(layer, x)  # dropout
    model = wrapped(tiny_model_dir, fused=True)
    layer = lora_layers(model)[0]
    assert took_fast_path(layer, x)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.base_layer.bfloat16()
    assert not took_fast_path(layer, x.bfloat16())  # a bf16 base, fp32 factors, no autocast: peft's casts
    layer.base_layer.float()
    model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    assert not took_fast_path(layer, x)
    hook = layer.base_layer.register_forward_pre_hook(lambda module, args: None)  # as ZeRO-3 gathers weights
    model.base_model.set_adapter("default")
    assert not took_fast_path(layer, x)
    hook.remove()
    assert took_fast_path(layer, x)


def test_fused_adapter_saves_loads_merges_and_copies_as_peft_does(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = wrapped(tiny_model_dir, fused=True)
    model.eval()
    ids = torch.arange(2, 14).reshape(1, 12)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(copy.deepcopy(model)(input_ids=ids).logits, expected)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert "_custom_modules" not in (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # plain peft reads it
    assert lora_layers(loaded) == []
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        assert lora_layers(merged) == []
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def train_config(**overrides):
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0, target="all", use_dora=overrides.pop("use_dora", False),
                        use_rslora=False)
    values = {"finetuning_type": "lora", "lora": lora, "quantization": None, "precision": "fp32", "optimizer": None,
              "gradient_checkpointing": False, "freeze": None, "launch": SimpleNamespace(deepspeed=None, fsdp=None)}
    return SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize(("overrides", "fused"), [
    ({}, True), ({"use_dora": True}, False),
    ({"launch": SimpleNamespace(deepspeed="ds_z2_config.json", fsdp=None)}, False)])
def test_train_stage_fuses_plain_lora_only(tiny_model_dir, tmp_path, overrides, fused):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = attach_trainable(base, train_config(**overrides))
    assert bool(lora_layers(model)) is fused
    if fused:  # continuing a saved adapter (adapter_name_or_path) gets the fused layers too
        model.save_pretrained(str(tmp_path / "adapter"))
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        again = attach_trainable(base, train_config(), adapter=tmp_path / "adapter")
        assert len(lora_layers(again)) == 14
        assert any(p.requires_grad for n, p in again.named_parameters() if "lora_A" in n)
