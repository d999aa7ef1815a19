"""Per-sample causal attention over a flattened row equals SDPA with a block-diagonal causal mask, in its
outputs and its gradients; the dense backward equals SDPA's own."""

from __future__ import annotations

import pytest
import torch

from tasks.varlen_attention import ATTENTION_BUCKET, bucket_plan, dense_backward_attention, varlen_sdpa_attention

BOUNDS = [0, 3, 7, 10, 10 + ATTENTION_BUCKET + 5, 2 * ATTENTION_BUCKET + 20]  # three short, two long samples


def block_diagonal_reference(query, key, value):
    """SDPA over the whole row with a mask that keeps each position to its own sample's past."""
    sample = torch.repeat_interleave(torch.arange(len(BOUNDS) - 1), torch.tensor(BOUNDS).diff())
    allowed = (sample[:, None] == sample[None, :]) & torch.ones(len(sample), len(sample), dtype=torch.bool).tril()
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), attn_mask=allowed)
    return out.transpose(1, 2)


def row_tensors(dtype):
    torch.manual_seed(1)
    length = BOUNDS[-1]
    return [torch.randn(1, heads, length, 8, dtype=dtype, requires_grad=True) for heads in (4, 2, 2)]


def test_the_plan_gathers_each_sample_once_and_puts_every_output_back():
    plan = bucket_plan(tuple(BOUNDS), torch.device("cpu"))
    shapes = [(samples, length) for samples, length, _ in plan.groups]
    assert shapes == [(3, ATTENTION_BUCKET), (2, 2 * ATTENTION_BUCKET)]
    laid_out = torch.cat([positions for _, _, positions in plan.groups])
    assert laid_out[plan.order].tolist() == list(range(BOUNDS[-1]))  # every row position comes back to itself
    assert plan.groups[0][2][:ATTENTION_BUCKET].tolist() == [0, 1, 2] + [2] * (ATTENTION_BUCKET - 3)  # pads repeat


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16", "fp32-under-bf16-autocast"])
def test_varlen_attention_equals_a_block_diagonal_causal_mask_with_gradients(dtype, autocast):
    tensors = row_tensors(dtype)
    reference = [t.detach().float().requires_grad_() for t in tensors]
    bounds = torch.tensor(BOUNDS, dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = varlen_sdpa_attention(torch.nn.Module(), *tensors, None, cu_seq_lens_q=bounds, max_length_q=40)
    expected = block_diagonal_reference(*reference)
    grad = torch.randn_like(expected)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    half = dtype == torch.bfloat16 or autocast
    tolerance = 3e-2 if half else 1e-5  # bf16 keeps 8 bits of mantissa
    assert out.shape == (1, BOUNDS[-1], 4, 8) and out.dtype == (torch.bfloat16 if half else torch.float32)
    assert torch.allclose(out.float(), expected, atol=tolerance)
    for mine, theirs in zip(tensors, reference, strict=True):
        assert mine.grad.dtype == dtype and torch.allclose(mine.grad.float(), theirs.grad, atol=tolerance)


def test_the_dense_backward_equals_sdpas_own_gradients():
    torch.manual_seed(2)
    query, key, value = (torch.randn(3, heads, 20, 8, dtype=torch.float64, requires_grad=True) for heads in (6, 2, 2))
    grad = torch.randn(3, 6, 20, 8, dtype=torch.float64)
    dense_backward_attention().apply(query, key, value, 0.3).backward(grad)
    mine = [t.grad for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.3,
                                                     enable_gqa=True).backward(grad)
    for ours, theirs in zip(mine, (query.grad, key.grad, value.grad), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-10)
