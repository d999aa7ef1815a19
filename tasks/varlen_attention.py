"""Causal attention sample by sample over a flattened row (the "sdpa_varlen" attention implementation).

A flattened training row holds a batch's samples end to end; each sample may attend only to itself. One
masked SDPA over the row would cost the square of the row's length (on the CPU a boolean mask skips
nothing); sample by sample it costs the sum of the squares. Without sample boundaries (generation,
evaluation) this is transformers' own SDPA, unchanged.

How the samples reach SDPA, and why:
- Samples are grouped by length rounded up to ATTENTION_BUCKET, and each group is ONE batched SDPA call.
  Causal attention lets a sample be padded at its end without changing its real positions (they never
  attend forward). The CPU's kernels are built and cached once per shape (a bf16 SDPA backward several MB
  each), so a few bucket shapes instead of one per sample length keep the process from growing every step.
- A group is gathered from the row with one `index_select` per tensor and the outputs put back with one
  more (`BucketPlan`, made once per row and reused by every layer). Slicing and padding each sample cost
  an op per sample in the forward and, in the backward, a zero-filled row-sized gradient per slice: that
  was more time than the attention itself.
- On the CPU in bf16/fp16, the backward is computed from dense matmuls (`dense_backward_attention`), not
  by the fused kernel. For these sizes (heads of 64, samples of a few hundred tokens) the CPU flash
  kernel's half-precision backward is 2-3x slower than the same gradients as four matmuls: 2.3 against
  0.8 ms for a 160-token sample of SmolLM2-135M. In fp32, and on GPUs, the fused kernel is the faster one
  and is kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

VARLEN_ATTENTION = "sdpa_varlen"
ATTENTION_BUCKET = 32  # tokens


@dataclass(frozen=True)
class BucketPlan:
    """Where each length group's padded samples come from in the row, and where their outputs go."""

    groups: tuple[tuple[int, int, Any], ...]  # (samples, padded length, row positions: samples x length)
    order: Any  # for each row position, its row among all groups' outputs laid end to end


def length_buckets(spans: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """(start, end) spans of the samples grouped by their length rounded up to ATTENTION_BUCKET."""
    buckets: dict[int, list[tuple[int, int]]] = {}
    for start, end in spans:
        buckets.setdefault(-(-(end - start) // ATTENTION_BUCKET) * ATTENTION_BUCKET, []).append((start, end))
    return buckets


@functools.lru_cache(maxsize=4)  # one row's plan serves all its layers, forward, recompute and backward
def bucket_plan(edges: tuple[int, ...], device: Any) -> BucketPlan:
    """The gather plan of a row whose samples start at `edges[:-1]` and end at `edges[1:]`. Padding slots
    repeat the sample's last token: any finite value works, since no real position attends to them."""
    import torch

    spans = [(start, end) for start, end in zip(edges[:-1], edges[1:], strict=True) if end > start]
    order = [0] * edges[-1]
    groups, offset = [], 0
    for length, members in length_buckets(spans).items():
        gather: list[int] = []
        for slot, (start, end) in enumerate(members):
            gather += [*range(start, end), *[end - 1] * (length - end + start)]
            base = offset + slot * length - start
            order[start:end] = range(base + start, base + end)
        groups.append((len(members), length, torch.tensor(gather, device=device)))
        offset += len(members) * length
    return BucketPlan(tuple(groups), torch.tensor(order, device=device))


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs: Any):
    """Causal SDPA per sample of a flattened row (see the module docstring); transformers' SDPA otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    unsupported = kwargs.get("softcap") is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
    if bounds is None or unsupported or (window and int(kwargs.get("max_length_q") or 0) > window):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    plan = bucket_plan(tuple(bounds.tolist()), query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    outputs = []
    for samples, length, positions in plan.groups:
        # (1, heads, row, dim) -> (samples, heads, length, dim)
        q, k, v = (t.index_select(2, positions).unflatten(2, (samples, length)).squeeze(0).transpose(0, 1)
                   for t in (query, key, value))
        result = causal_attention(q, k, v, scale, dropout)
        outputs.append(result.transpose(1, 2).flatten(0, 1))  # (samples * length, heads, dim)
    return torch.cat(outputs).index_select(0, plan.order).unsqueeze(0), None


def causal_attention(query, key, value, scale: float, dropout: float = 0.0):
    """Causal SDPA of (batch, heads, length, dim) tensors, with grouped key/value heads; the dense backward
    where it is the faster one (see the module docstring)."""
    import torch

    device = query.device.type
    # Under autocast SDPA runs in the autocast dtype, whatever the inputs' (rotary embeddings leave them fp32).
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    dense = (device == "cpu" and dtype in (torch.bfloat16, torch.float16) and not dropout
             and torch.is_grad_enabled() and query.shape[1] % key.shape[1] == 0)
    if dense:
        return dense_backward_attention().apply(query.to(dtype), key.to(dtype), value.to(dtype), scale)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1])


@functools.cache  # made on first use, so importing this module does not import torch
def dense_backward_attention():
    """The autograd Function `causal_attention` uses for half precision on the CPU."""
    import torch

    class DenseBackwardAttention(torch.autograd.Function):
        """SDPA's forward; a backward of four matmuls on the recomputed probabilities (softmax in fp32).
        Query heads are folded onto their key/value head, so grouped heads need no repeated keys."""

        @staticmethod
        def forward(ctx, query, key, value, scale):
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
            ctx.save_for_backward(query, key, value, out)
            ctx.scale = scale
            return out

        @staticmethod
        def backward(ctx, grad_out):
            query, key, value, out = ctx.saved_tensors
            batch, heads, length, dim = query.shape
            groups = heads // key.shape[1]
            exact = torch.promote_types(query.dtype, torch.float32)  # softmax and its gradient in >= fp32
            folded = (batch, key.shape[1], groups * length, dim)  # each kv head's query heads, stacked
            query_f, out_f, grad_f = query.reshape(folded), out.reshape(folded), grad_out.reshape(folded)
            scores = torch.matmul(query_f, key.transpose(-1, -2)).to(exact) * ctx.scale
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril().repeat(groups, 1)
            probs = torch.softmax(scores.masked_fill_(~causal, float("-inf")), dim=-1)
            grad_value = torch.matmul(probs.to(query.dtype).transpose(-1, -2), grad_f)
            grad_probs = torch.matmul(grad_f, value.transpose(-1, -2)).to(exact)
            row_dot = (grad_f.to(exact) * out_f.to(exact)).sum(-1, keepdim=True)
            grad_scores = (probs * (grad_probs - row_dot) * ctx.scale).to(query.dtype)
            grad_query = torch.matmul(grad_scores, key).reshape(query.shape)
            grad_key = torch.matmul(grad_scores.transpose(-1, -2), query_f)
            return grad_query, grad_key, grad_value, None

    return DenseBackwardAttention


def register_varlen_attention() -> None:
    """Make "sdpa_varlen" a valid attn_implementation (its masks are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if VARLEN_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
        AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
