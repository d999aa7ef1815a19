"""GGUF import: the tokenizer, config and weights of a GGUF file come from one parse of it (tasks.gguf_parse),
to the same model and tokenizer as transformers' own three parses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.gguf_parse import one_gguf_parse
from tasks.model import ModelConfig, load_source


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q and k (transformers undoes it on load)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    """The tiny Llama written as an F32 GGUF file, as llama.cpp's converter names and orders its tensors."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = model.config
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token, _ in vocab])
    writer.add_token_merges([" ".join(pair) for pair in
                             json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weights = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                weights = llama_cpp_permute(weights, config.num_attention_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weights)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, state


def gguf_source(path) -> dict[str, str]:
    return {"kind": "gguf", "path": str(path.parent), "gguf_file": path.name, "digest": "x"}


def model_config() -> ModelConfig:
    return ModelConfig(source="x", source_kind="gguf", dtype="float32", trust_remote_code=False)


def test_one_parse_gives_the_weights_and_tokenizer_of_three(tiny_gguf, tiny_model_dir, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, state = tiny_gguf
    parses = []
    build_reader = gguf.GGUFReader

    def counted_reader(*args, **kwargs):
        parses.append(args[0])
        return build_reader(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counted_reader)
    model, tokenizer, _ = load_source(gguf_source(path), model_config())
    assert len(parses) == 1  # transformers alone parses it three times: tokenizer, config, weights
    assert gguf.GGUFReader is counted_reader  # put back after the import

    plain = {"gguf_file": path.name}
    three_parse_model = AutoModelForCausalLM.from_pretrained(path.parent, **plain)
    assert len(parses) == 1 + 2  # config and weights, each its own parse
    loaded = model.state_dict()
    assert loaded.keys() == three_parse_model.state_dict().keys()
    for name, tensor in three_parse_model.state_dict().items():
        assert np.array_equal(loaded[name].numpy(), tensor.numpy()), name
        if name in state:  # lm_head is tied to the embeddings
            assert np.array_equal(loaded[name].numpy(), state[name]), name  # and those are the tiny model's
    text = "def read(path):\n    return open(path).read()"
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert len(tokenizer) == len(original)


def test_the_shared_parse_ends_with_the_block_even_when_the_import_fails(tmp_path):
    import gguf

    build_reader, build_map = gguf.GGUFReader, gguf.get_tensor_name_map
    torn = tmp_path / "torn.gguf"
    torn.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ValueError), one_gguf_parse():
        assert gguf.GGUFReader is not build_reader
        gguf.GGUFReader(torn)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (build_reader, build_map)


def test_readers_and_name_maps_are_shared_within_the_block_only(tiny_gguf):
    import gguf

    path, _ = tiny_gguf
    with one_gguf_parse():
        reader = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is reader
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader(path) is not reader
