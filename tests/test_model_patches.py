"""Model patches: RoPE scaling written into the imported checkpoint (factor from cutoff_len, as
LlamaFactory computes it), random weights for train_from_scratch, float32 upcasts while training."""

from __future__ import annotations

import json

import pytest

from tasks.core.errors import ModelError
from tasks.model import ModelConfig, load_source, scaled_rope


def tiny_source(tiny_model_dir) -> dict[str, str]:
    return {"kind": "local", "path": str(tiny_model_dir), "gguf_file": ""}


def model_config(**changes) -> ModelConfig:
    return ModelConfig(source="x", source_kind="local", dtype="float32", trust_remote_code=False, **changes)


def test_rope_factor_follows_cutoff_len_over_the_context(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)  # max_position_embeddings 512
    assert scaled_rope(config, "linear", 512) is None  # fits: no scaling, as LlamaFactory
    assert scaled_rope(config, "linear", 1500) == {**config.rope_parameters, "rope_type": "linear", "factor": 3.0}
    assert scaled_rope(config, "dynamic", 1024)["original_max_position_embeddings"] == 512
    llama3 = scaled_rope(config, "llama3", 2048)
    assert (llama3["factor"], llama3["low_freq_factor"], llama3["high_freq_factor"]) == (4.0, 1.0, 4.0)
    assert scaled_rope(config, "yarn", 600)["factor"] == 2.0
    config.rope_parameters = None
    with pytest.raises(ModelError, match="'rope_scaling'"):
        scaled_rope(config, "linear", 1024)


def test_the_imported_checkpoint_carries_the_rope_patch(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, patches = load_source(tiny_source(tiny_model_dir),
                                            model_config(rope_scaling="linear", rope_cutoff_len=2048))
    assert patches["rope_scaling"]["factor"] == 4.0
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_position_embeddings"] == 2048 and saved["rope_parameters"]["rope_type"] == "linear"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # any later stage loads it scaled
    assert reloaded.model.rotary_emb.rope_type == "linear"


def test_train_from_scratch_starts_from_seeded_random_weights(tiny_model_dir):
    import torch

    pretrained, _, _ = load_source(tiny_source(tiny_model_dir), model_config())
    torch.manual_seed(3)
    scratch, _, patches = load_source(tiny_source(tiny_model_dir), model_config(train_from_scratch=True, seed=3))
    torch.manual_seed(3)
    again, _, _ = load_source(tiny_source(tiny_model_dir), model_config(train_from_scratch=True, seed=3))
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert patches == {"train_from_scratch": True}
    assert not torch.equal(scratch.state_dict()[weight], pretrained.state_dict()[weight])
    assert torch.equal(scratch.state_dict()[weight], again.state_dict()[weight])


def test_upcasts_put_norms_and_head_output_in_float32(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.train_methods import upcast

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16  # without the patch
    upcast(model, ("layernorm", "lmhead_output"))
    norms = {n: p.dtype for n, p in model.named_parameters() if "norm" in n}
    assert norms and set(norms.values()) == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # the rest stays
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer runs bf16 mixed precision
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.float32


def test_loaders_pass_trust_remote_code_as_the_artifact_records_it():
    from types import SimpleNamespace

    from tasks.core.loading import remote_code

    assert remote_code(SimpleNamespace(info={"trust_remote_code": True})) == {"trust_remote_code": True}
    assert remote_code(SimpleNamespace(info={})) == {"trust_remote_code": False}


def test_rope_scaling_stretches_the_full_attention_layers_of_per_layer_type_rope():
    """Gemma 3 keeps RoPE parameters per layer type: the scaling went beside them, where no layer reads it."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tasks.model import patch_config

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              layer_types=["sliding_attention", "full_attention"], num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=16)
    before = dict(Gemma3ForCausalLM(config).model.rotary_emb.named_buffers())
    patches = patch_config(config, model_config(rope_scaling="linear", rope_cutoff_len=300))
    assert patches["rope_scaling"]["full_attention"]["factor"] == 3.0 and config.max_position_embeddings == 384
    after = dict(Gemma3ForCausalLM(config).model.rotary_emb.named_buffers())
    assert torch.allclose(before["full_attention_inv_freq"] / after["full_attention_inv_freq"], torch.tensor(3.0))
    assert torch.equal(before["sliding_attention_inv_freq"], after["sliding_attention_inv_freq"])


def test_flash_attn_auto_lets_transformers_choose(write_recipe, workdir, tiny_model_dir):
    """auto forced SDPA, which Gemma 2 (and GraniteSWA) refuse to load with; LlamaFactory leaves it to
    transformers, which picks eager for them."""
    import shutil

    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from flows.finetune import finetune
    from tasks.core.recipe import load_recipe

    folder = workdir / "gemma2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=512, sliding_window=64,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   bos_token_id=tokenizer.bos_token_id)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    summary = finetune(load_recipe(write_recipe(model_name_or_path=str(folder), max_samples=8, max_steps=2)))
    assert {"train", "merge", "evaluate[tuned]"} <= {s.label for s in summary.stages}
    assert "eval_loss" in summary.metrics["tuned"]


def test_rope_already_scaled_is_extended_not_shrunk():
    """Gemma 3's full-attention layers ship scaled (linear, factor 8, to 128K) without naming the context before
    it: a longer cutoff replaced the 8 by 2; a cutoff within the 128K scaled it down."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              max_position_embeddings=131072,
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1e6},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert scaled_rope(config, "linear", 100000) is None  # the shipped context holds it
    assert scaled_rope(config, "linear", 262144)["full_attention"]["factor"] == 16.0  # 16K x 16
