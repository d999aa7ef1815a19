"""Weights loaded as views of their safetensors file: cast off it as transformers would, pages handed back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tasks.core.mapped_weights import FileViews, cast_weights, load_causal_lm, safetensors_mappings
from tests.conftest import tiny_llama_config

WIDE = {"hidden_size": 256, "intermediate_size": 1024}  # 1 MiB fp32 MLP weights: 256 pages each


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp32-llama")
    LlamaForCausalLM(tiny_llama_config(600, tie_word_embeddings=True, **WIDE)).save_pretrained(path)
    return path


def mapped_file_kib(folder: Path) -> int:
    """Resident KiB of this process's mappings of the folder's safetensors files (/proc/self/smaps)."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) == 6 and fields[5].startswith(str(folder)) and fields[5].endswith(".safetensors")
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1])
    return resident


def test_load_casts_as_from_pretrained_does(fp32_checkpoint):
    ours, theirs = load_causal_lm(fp32_checkpoint, torch.bfloat16), \
        AutoModelForCausalLM.from_pretrained(str(fp32_checkpoint), dtype=torch.bfloat16)
    assert ours.config.dtype == theirs.config.dtype == torch.bfloat16
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    for name, tensor in reference.items():
        assert mine[name].dtype == tensor.dtype and torch.equal(mine[name], tensor), name
    # RoPE's inverse frequencies are computed, not loaded: fp32 in both
    assert {n: b.dtype for n, b in ours.named_buffers()} == {n: b.dtype for n, b in theirs.named_buffers()}
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # the tie survives the cast
    ids = torch.tensor([[5, 17, 42, 99]])
    assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_load_keeps_the_modules_the_class_keeps_in_fp32(fp32_checkpoint, monkeypatch):
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["down_proj"])
    ours = load_causal_lm(fp32_checkpoint, torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(str(fp32_checkpoint), dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in ours.named_parameters()}
    assert dtypes == {name: p.dtype for name, p in theirs.named_parameters()}
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.float32
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.bfloat16


def test_auto_loads_views_of_the_file_without_a_copy(fp32_checkpoint):
    model = load_causal_lm(fp32_checkpoint, "auto")
    assert model.dtype == torch.float32
    address = model.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert any(low <= address < high for low, high in safetensors_mappings())


def test_a_replaced_view_hands_its_file_pages_back(fp32_checkpoint):
    model = load_causal_lm(fp32_checkpoint, "auto")
    weights = [p for p in model.parameters()]
    assert sum(float(p.detach().double().sum()) for p in weights) != 0  # every page read through the views
    before = mapped_file_kib(fp32_checkpoint)
    up = model.model.layers[0].mlp.up_proj.weight
    expected_down = model.model.layers[0].mlp.down_proj.weight.clone()
    FileViews().replace(up, up.data.to(torch.bfloat16))
    released = before - mapped_file_kib(fp32_checkpoint)
    assert 1024 - 8 <= released <= 1024  # the 1 MiB weight's pages, less at most its two shared edge pages
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, expected_down)  # the neighbour reads the same


def test_a_storage_still_viewed_keeps_its_pages(fp32_checkpoint):
    model = load_causal_lm(fp32_checkpoint, "auto")
    up = model.model.layers[1].mlp.up_proj.weight
    row = up.data[3]  # another view of the same storage
    expected = row.clone()
    before = mapped_file_kib(fp32_checkpoint)
    FileViews().replace(up, up.data.to(torch.bfloat16))
    assert mapped_file_kib(fp32_checkpoint) >= before - 8
    assert torch.equal(row, expected)


def test_cast_weights_moves_the_whole_model_off_the_file(fp32_checkpoint):
    model = load_causal_lm(fp32_checkpoint, "auto")
    cast_weights(model, torch.bfloat16, keep=lambda name: name.endswith("norm.weight"))
    file_kib = (fp32_checkpoint / "model.safetensors").stat().st_size // 1024
    # what stays resident: the kept norms' pages and the edge pages replaced tensors shared with a neighbour
    assert mapped_file_kib(fp32_checkpoint) < file_kib / 50
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
