"""The optimizers a recipe can choose besides transformers' `optim` names: GaLore, APOLLO, BAdam, Adam-mini,
Muon and LoRA+ (LlamaFactory's keys and meanings).

GaLore and APOLLO are transformers' own optimizers (`optim: galore_adamw`, `apollo_adamw`, with
`optim_target_modules` and `optim_args`), so they become TrainingArguments values. The others are built by
`OptimizerFactory`, which the Trainer calls through its supported `optimizer_cls_and_kwargs` hook when it
creates its optimizer (also under DeepSpeed, whose config then holds no optimizer).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe

if TYPE_CHECKING:
    import torch

OPTIMIZER_LIBRARIES = {"galore": "galore-torch", "apollo": "apollo-torch", "badam": "badam", "adam_mini": "adam-mini"}
GALORE_OPTIM = {"adamw_torch": "galore_adamw", "adamw_8bit": "galore_adamw_8bit", "adamw_bnb_8bit": "galore_adamw_8bit",
                "paged_adamw_8bit": "galore_adamw_8bit", "adafactor": "galore_adafactor"}
APOLLO_OPTIM = {"adamw_torch": "apollo_adamw"}


class OptimizerSettings(BaseModel):
    """One of the optimizers chosen by a `use_*` key (or loraplus_lr_ratio), with only its own options."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["galore", "apollo", "badam", "adam_mini", "muon", "loraplus"]
    options: dict[str, Any] = {}


def optimizer_libraries(config) -> tuple[str, ...]:
    """The library of a training config's use_* optimizer, if one is chosen: its version shapes the result (so
    it is keyed), and installing or upgrading one nobody chose rebuilds nothing."""
    kind = config.optimizer.kind if config.optimizer else None
    return (OPTIMIZER_LIBRARIES[kind],) if kind in OPTIMIZER_LIBRARIES else ()


def optimizer_settings(recipe: Recipe) -> OptimizerSettings | None:
    """The recipe's optimizer choice and its options (None: transformers' `optim` as named)."""
    f = recipe.finetuning
    for kind, known in (("galore", GALORE_OPTIM), ("apollo", APOLLO_OPTIM)):
        if getattr(f, f"use_{kind}") and recipe.training.optim not in known:
            raise RecipeError(f"key 'optim': use_{kind} works with {', '.join(known)}, not {recipe.training.optim!r}")
    if f.use_galore:
        names = ("target", "rank", "update_interval", "scale", "proj_type", "layerwise")
        return OptimizerSettings(kind="galore", options={n: getattr(f, f"galore_{n}") for n in names})
    if f.use_apollo:
        names = ("target", "rank", "update_interval", "scale", "proj", "proj_type", "scale_type", "layerwise")
        return OptimizerSettings(kind="apollo", options={n: getattr(f, f"apollo_{n}") for n in names})
    if f.use_badam:
        names = ("start_block", "switch_mode", "switch_interval") if f.badam_mode == "layer" else (
            "update_ratio", "mask_mode")
        return OptimizerSettings(kind="badam", options={"mode": f.badam_mode} | {n: getattr(f, f"badam_{n}")
                                                                                   for n in names})
    if f.use_adam_mini:
        return OptimizerSettings(kind="adam_mini")
    if f.use_muon:
        return OptimizerSettings(kind="muon")
    if f.loraplus_lr_ratio is not None:
        return OptimizerSettings(kind="loraplus", options={"lr_ratio": f.loraplus_lr_ratio,
                                                           "lr_embedding": f.loraplus_lr_embedding})
    return None


def low_rank_arguments(settings: OptimizerSettings | None, optim: str) -> dict[str, Any]:
    """TrainingArguments values for GaLore or APOLLO (transformers' optimizers), else nothing."""
    if settings is None or settings.kind not in ("galore", "apollo"):
        return {}
    o, kind = settings.options, settings.kind
    names = GALORE_OPTIM if kind == "galore" else APOLLO_OPTIM
    args = {"rank": o["rank"], "update_proj_gap": o["update_interval"], "scale": o["scale"],
            "proj_type": o["proj_type"]}
    if kind == "apollo":
        args |= {"proj": o["proj"], "scale_type": o["scale_type"]}
    return {
        "optim": names[optim] + ("_layerwise" if o["layerwise"] else ""),
        "optim_args": ",".join(f"{k}={v}" for k, v in args.items()),
        "optim_target_modules": low_rank_targets(o["target"]),
    }


def low_rank_targets(target: str) -> str:
    """A regex over module names for galore_target/apollo_target: every linear layer but the output head for 'all',
    else the modules whose names contain one of the comma-separated names (LlamaFactory's substring match)."""
    names = [n.strip() for n in target.split(",") if n.strip()]
    if names == ["all"]:
        return r"^(?!(.*\.)?lm_head$).+$"
    return r".*(" + "|".join(map(re.escape, names)) + r").*"




def trainer_optimizer(settings: OptimizerSettings | None, arguments, verbose: int = 0) -> dict[str, Any]:
    """The Trainer keyword that builds a `use_*` optimizer when the Trainer creates its optimizer (or nothing)."""
    if settings is None or settings.kind in ("galore", "apollo"):
        return {}
    kwargs = {"settings": settings, "arguments": arguments, "verbose": verbose}
    return {"optimizer_cls_and_kwargs": (OptimizerFactory, kwargs)}


def decay_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups, weight decay on all but norms and biases (as the Trainer does)."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]


def loraplus_groups(model, lr: float, weight_decay: float, lr_ratio: float,
                    lr_embedding: float) -> list[dict[str, Any]]:
    """LoRA+ parameter groups as LlamaFactory's `_create_loraplus_optimizer` makes them: B matrices (and 1-D
    weights) learn `lr_ratio` times faster; only an embedding's B matrix takes `lr_embedding`. PEFT's
    `create_loraplus_optimizer` gives the embedding rate to the A matrix too, which learns at `lr` here."""
    decayed = {id(param) for param in decay_groups(model, weight_decay)[0]["params"]}
    groups = {"a": [], "b": [], "b_nodecay": [], "embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_B" in name:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["b" if id(param) in decayed else "b_nodecay"].append(param)
        else:
            groups["a"].append(param)
    return [{"params": groups["a"], "lr": lr, "weight_decay": weight_decay},
            {"params": groups["b"], "lr": lr * lr_ratio, "weight_decay": weight_decay},
            {"params": groups["b_nodecay"], "lr": lr * lr_ratio, "weight_decay": 0.0},
            {"params": groups["embedding"], "lr": lr_embedding, "weight_decay": weight_decay}]


class OptimizerFactory:
    """The Trainer calls `OptimizerFactory()(model, settings=..., arguments=...)` (transformers' factory hook)."""

    def __call__(self, model, settings: OptimizerSettings, arguments, verbose: int = 0):
        from transformers import Trainer

        base_cls, base_kwargs = Trainer.get_optimizer_cls_and_kwargs(arguments, model)
        o = settings.options
        if settings.kind == "loraplus":
            return base_cls(loraplus_groups(model, arguments.learning_rate, arguments.weight_decay, **o),
                            **base_kwargs)
        adam = {"lr": arguments.learning_rate, "betas": (arguments.adam_beta1, arguments.adam_beta2),
                "eps": arguments.adam_epsilon}
        if settings.kind == "adam_mini":
            from adam_mini import Adam_mini

            config = model.config
            # unsharded: check_launch refuses DeepSpeed and FSDP with it (Adam-mini 1.1.1's model_sharding path
            # raised IndexError on ZeRO-3's flat partitions, as on ZeRO-2's)
            return Adam_mini(named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
                             weight_decay=arguments.weight_decay, model_sharding=False, dim=config.hidden_size,
                             n_heads=config.num_attention_heads,
                             n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False, **adam)
        if settings.kind == "muon":
            from tasks.muon import MuonAdamW

            return MuonAdamW.for_model(model, weight_decay=arguments.weight_decay, **adam)
        return badam_optimizer(model, o, base_cls, base_kwargs, arguments.weight_decay, adam, verbose)


def badam_optimizer(model, o: dict[str, Any], base_cls, base_kwargs: dict[str, Any], weight_decay: float,
                    adam: dict[str, Any], verbose: int = 0):
    """BAdam: Adam on one block of layers at a time (layer mode), or on a share of every parameter (ratio mode)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    groups = decay_groups(model, weight_decay)
    if o["mode"] == "layer":
        from badam import BlockOptimizer

        return BlockOptimizer(base_optimizer=base_cls(groups, **base_kwargs),
                              named_parameters_list=list(model.named_parameters()), block_prefix_list=None,
                              switch_block_every=o["switch_interval"], start_block=o["start_block"],
                              switch_mode=o["switch_mode"], verbose=verbose,
                              ds_zero3_enabled=is_deepspeed_zero3_enabled())
    from badam import BlockOptimizerRatio

    named = list(model.named_parameters())
    tied_head = not any("lm_head" in name for name, _ in named)  # BAdam would freeze a head that is not there
    # its gradient hook leaves sparse gradients, which the Trainer measures through SparseGradClipping below
    return BlockOptimizerRatio(param_groups=groups, named_parameters_list=named, update_ratio=o["update_ratio"],
                               mask_mode=o["mask_mode"], verbose=verbose, include_embedding=False,
                               include_lm_head=tied_head, **adam)


def has_sparse_grads(model) -> bool:
    return any(p.grad is not None and p.grad.is_sparse for p in model.parameters())


def clip_sparse_grads(parameters, max_norm: float) -> torch.Tensor:
    """The gradients' total 2-norm, and each gradient scaled in place so the total is at most max_norm (inf: only
    measured); sparse gradients count by their stored values (torch 1.13's clip_grad_norm_, as BAdam's own
    `clip_grad_norm_old_version`)."""
    import torch

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = [torch.linalg.vector_norm((g.coalesce()._values() if g.is_sparse else g).detach().float()) for g in grads]
    total = torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))
    if max_norm != float("inf"):
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        with torch.no_grad():
            for g in grads:  # a sparse tensor's mul_ would not reach its stored values in place; _values() does
                (g._values() if g.is_sparse else g).mul_(scale.to(g.device, g.dtype))
    return total


def with_weight_decay(optimizer, decayed: set[int], weight_decay: float) -> None:
    """Each parameter group split by decay: weight_decay on the parameters whose ids are in `decayed`, none on the
    rest (the group's other options, such as GaLore's rank, kept). A layer-wise optimizer's per-parameter
    optimizers each get theirs. Before the first step only: the optimizer state is keyed by parameter."""
    inner = getattr(optimizer, "optimizer_dict", None)
    for each in inner.values() if inner else [optimizer]:
        each.param_groups = [{**group, "params": params, "weight_decay": weight_decay if decays else 0.0}
                             for group in each.param_groups for decays in (True, False)
                             if (params := [p for p in group["params"] if (id(p) in decayed) == decays])]


class LowRankWeightDecay:
    """Trainer mixin: transformers builds GaLore's and APOLLO's parameter groups itself and gives them no weight
    decay (they replace the Trainer's decay groups); LlamaFactory decays all but norms and biases there too, as
    the Trainer does for every other optimizer. This puts the recipe's weight_decay back on them."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.args.optim.startswith(("galore", "apollo")) and self.args.weight_decay:
            opt_model = self.model if model is None else model
            names = set(self.get_decay_parameter_names(opt_model))
            decayed = {id(p) for n, p in opt_model.named_parameters() if n in names}
            with_weight_decay(self.optimizer, decayed, self.args.weight_decay)
        return optimizer


class SparseGradClipping:
    """Trainer mixin for BAdam ratio mode: its gradient hook masks each gradient into a sparse tensor, and the
    Trainer's clipping and grad_norm logging (accelerate's, then torch's clip_grad_norm_, every step: max_grad_norm
    is always > 0 here, and the norm is taken for logging even without it) cannot read sparse tensors
    (`linalg_vector_norm` has no sparse kernel). These overrides of the Trainer's own clipping methods measure and
    clip them instead; dense gradients, and every other optimizer, go the Trainer's way. (LlamaFactory replaces
    `accelerator.clip_grad_norm_` with BAdam's old-torch version; making the gradients dense before clipping would
    instead give up the memory the sparse gradients save.) Ratio mode runs in one plain process only (no DeepSpeed,
    FSDP or several ranks, which own the clipping), so unscaling (fp16) is all accelerate's clipping would add."""

    def _clip_grad_norm(self, model):
        if not has_sparse_grads(model):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_sparse_grads(model.parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and has_sparse_grads(model):
            grad_norm = clip_sparse_grads(model.parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)
