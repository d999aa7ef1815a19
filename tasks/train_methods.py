"""How the base model is loaded and made trainable: LoRA (DoRA, rsLoRA, QLoRA), full and freeze tuning.

The settings are typed parts of the train stage's config; `check_trainable` refuses, naming the recipe
key, options that would train nothing (a lora_target matching no module, too many frozen layers).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.errors import RecipeError
from tasks.core.hardware import quantized_placement, torch_dtype
from tasks.quantization import quantization_config


class LoraSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    rank: int
    alpha: int
    dropout: float
    target: str
    use_dora: bool
    use_rslora: bool
    additional_target: tuple[str, ...] = ()  # modules trained in full and saved with the adapter
    pissa_iter: int | None = None  # PiSSA initialisation: fast-SVD iterations, -1 exact SVD; None: plain LoRA
    create_new_adapter: bool = False  # a starting adapter is merged into the base and a new one trained


class FreezeSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    trainable_layers: int  # the last N layers (N > 0) or the first -N (N < 0)
    trainable_modules: tuple[str, ...] = ("all",)  # first name parts inside a layer (mlp, self_attn), or all
    extra_modules: tuple[str, ...] = ()  # modules outside the layers (embed_tokens, norm)


def load_base(model_dir: Path, config, trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": config.attn_implementation,
                              "trust_remote_code": trust_remote_code}
    shipped = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    if shipped and config.finetuning_type != "lora":  # a hub model found quantized only once imported
        raise RecipeError(f"key 'finetuning_type': the model is already quantized "
                          f"({shipped.get('quant_method', 'unknown')}); only finetuning_type: lora can train it")
    if not shipped and (quant := quantization_config(config.quantization, config.precision)):
        kwargs["quantization_config"] = quant  # a quantize artifact (or a GPTQ/AWQ model) is loaded as it is
    if shipped or quant:
        kwargs |= quantized_placement()
    if dtype := load_dtype(config):
        kwargs["dtype"] = torch_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    # PEFT writes the base's name into adapter_config.json and the model card; here it is a store path, which
    # would make the adapter's bytes depend on where the store is. The copy in output_dir names the user's model.
    model.name_or_path = model.config._name_or_path = ""
    return model


def load_dtype(config) -> str | None:
    """The dtype a training stage loads the base in, where it is not the checkpoint's own: fp32 to train in fp32;
    bf16 under pure_bf16, and for BAdam under bf16 mixed precision (BAdam keeps fp32 copies of the block it
    trains and expects the model in half precision, as LlamaFactory loads it for `bf16: true`)."""
    if config.precision == "fp32":
        return "float32"
    if config.precision == "pure_bf16" or (config.precision == "bf16" and uses_badam(config)):
        return "bfloat16"
    return None


def uses_badam(config) -> bool:
    optimizer = getattr(config, "optimizer", None)
    return optimizer is not None and optimizer.kind == "badam"


def cast_frozen_weights_for_autocast(model, config) -> None:
    """Under bf16 autocast, hold a LoRA run's frozen linear and embedding weights in bf16
    (`hold_frozen_weights_in_bf16`). Only plain LoRA qualifies: its base is never saved, DoRA would take its
    weight norms from the rounded weights, and DeepSpeed and FSDP place and cast weights themselves."""
    lora, sharded = config.lora, config.launch.deepspeed or config.launch.fsdp
    plain_lora = lora is not None and not lora.use_dora and config.quantization is None and not sharded
    if config.precision == "bf16" and plain_lora:
        hold_frozen_weights_in_bf16(model)


def hold_frozen_weights_in_bf16(model) -> None:
    """Cast the frozen linear weights (and biases) and the frozen input embeddings to bf16; norms and the
    adapter stay fp32, as autocast keeps them.

    Autocast computes every linear layer from a bf16 copy of its weight, made again each forward (and each
    recompute under gradient checkpointing) and kept until the backward: casting the frozen weights once
    gives the same numbers, without the copies, the per-step casts or the fp32 originals. That includes an
    output head tied to the embeddings. The embedding lookup itself is not autocast: it now reads bf16-rounded
    rows, handed on as fp32 (a forward hook) so the residual stream stays fp32 as before. That rounding is the
    one change in the numbers (LlamaFactory's `bf16: true` loads the whole model in bf16), for about 110 MB
    less at the train step's peak on SmolLM2-135M (the fp32 table and the head's per-step bf16 copy).
    Weights are copied off the checkpoint's mapping, each one's file pages handed back as it is replaced
    (tasks.core.mapped_weights), so the file is unmapped at the end without all its pages resident at once."""
    import torch

    from tasks.core.mapped_weights import FileViews

    views = FileViews()
    embedding = model.get_input_embeddings()
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        weight = module.weight
        if weight.dtype == torch.float32 and not weight.requires_grad and weight is not embedding.weight:
            views.replace(weight, weight.data.to(torch.bfloat16))
            if module.bias is not None and not module.bias.requires_grad:
                views.replace(module.bias, module.bias.data.to(torch.bfloat16))
    if embedding.weight.dtype == torch.float32 and not embedding.weight.requires_grad:
        views.replace(embedding.weight, embedding.weight.data.to(torch.bfloat16))
        embedding.register_forward_hook(embeddings_as_fp32)
    for parameter in model.parameters():
        if parameter.dtype == torch.float32:
            views.replace(parameter, parameter.data.clone())


def embeddings_as_fp32(module, inputs, output):
    """Forward hook: the bf16-held embeddings' rows as fp32, the dtype the residual stream has under autocast."""
    return output.float()


def sort_config_sets(model) -> None:
    """PEFT holds target_modules (all-linear's expansion included) as a set and saves it in the set's order, which
    changes with each process's string hashing: a rebuilt adapter's adapter_config.json then differed from the one
    it replaced, so everything made from it was rebuilt. Sorted lists save the same bytes every time."""
    for settings in getattr(model, "peft_config", {}).values():
        for name, value in vars(settings).items():
            if isinstance(value, set):
                setattr(settings, name, sorted(value))


def lora_targets(value: str) -> str | list[str]:
    """PEFT target_modules for the recipe's lora_target: every linear layer but the head, or names."""
    return "all-linear" if value.strip() == "all" else [name.strip() for name in value.split(",") if name.strip()]


def module_names(model) -> dict[str, str]:
    """Short name (last dotted part) -> class name of every module, for checking targets."""
    return {name.rsplit(".", 1)[-1]: type(module).__name__ for name, module in model.named_modules() if name}


def names_a_module(model, target: str) -> bool:
    """Whether a target names modules as PEFT matches them: a module's name, or its last dotted parts
    (`self_attn.q_proj`)."""
    return any(name == target or name.endswith("." + target) for name, _ in model.named_modules())


def split_names(value: str | None) -> tuple[str, ...]:
    """A comma-separated recipe value as a tuple of names."""
    return tuple(name.strip() for name in (value or "").split(",") if name.strip())


def decoder_layers(model) -> tuple[str, int]:
    """The decoder's stack of layers, found by structure rather than by name: the longest ModuleList whose
    members are all one class (preferring one as long as config.num_hidden_layers). Returns its dotted name and
    length, or ("", 0)."""
    from torch import nn

    wanted = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [(name, len(module)) for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1]
    if not stacks:
        return "", 0
    return max(stacks, key=lambda s: (s[1] == wanted, s[1]))


def layer_count(model) -> int:
    """Number of decoder layers (see `decoder_layers`)."""
    return decoder_layers(model)[1]


def freeze_selection(model, freeze: FreezeSettings) -> set[str]:
    """Names of the parameters freeze tuning trains: the chosen layers' (chosen modules'), and the extra modules'.
    Refuses module names that are in no layer, or outside them, naming the recipe key."""
    prefix, layers = decoder_layers(model)
    count = freeze.trainable_layers
    chosen = range(layers - count, layers) if count > 0 else range(-count)
    inside: dict[str, tuple[int, str]] = {}  # parameter name -> (layer index, first name part inside the layer)
    outside: set[str] = set()
    for name, _ in model.named_parameters():
        head, _, rest = name.partition(prefix + ".") if prefix else ("", "", "")
        index, _, part = rest.partition(".")
        if prefix and not head and index.isdigit():
            inside[name] = (int(index), part.split(".")[0])
        else:
            outside.add(name)
    parts = {part for _, part in inside.values()}
    modules = set(freeze.trainable_modules)
    if "all" not in modules and (missing := sorted(modules - parts)):
        raise RecipeError(f"key 'freeze_trainable_modules': no {', '.join(map(repr, missing))} inside the decoder "
                          f"layers (choose from {', '.join(sorted(parts))}, or 'all')")
    extra_names = {n.rsplit(".", 2)[-2] for n in outside if "." in n}
    if missing := sorted(set(freeze.extra_modules) - extra_names):
        raise RecipeError(f"key 'freeze_extra_modules': no {', '.join(map(repr, missing))} outside the decoder layers "
                          f"(choose from {', '.join(sorted(extra_names))})")
    picked = {n for n, (i, part) in inside.items() if i in chosen and ("all" in modules or part in modules)}
    return picked | {n for n in outside if "." in n and n.rsplit(".", 2)[-2] in freeze.extra_modules}


def check_trainable(structure: Callable[[], Any], lora: LoraSettings | None, freeze: FreezeSettings | None) -> None:
    """Refuse options that match nothing in the model, naming the recipe key. `structure` returns the model
    (or its weightless structure), or None where it cannot be had (then nothing is checked); it is called at
    most once, and only by a check that needs the module names: making a structure imports the model's
    modeling code, which costs seconds at planning."""
    model = functools.cache(structure)
    if lora is not None and lora.additional_target and model() is not None:
        if missing := [t for t in lora.additional_target if not names_a_module(model(), t)]:
            raise RecipeError(f"key 'additional_target': no module named {', '.join(map(repr, missing))} in this "
                              "model")
    if lora is not None and lora.target.strip() != "all" and model() is not None:
        names = module_names(model())
        linear = sorted(n for n, kind in names.items() if kind in ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D"))
        missing = [t for t in lora_targets(lora.target) if not names_a_module(model(), t)]
        if missing:
            raise RecipeError(f"key 'lora_target': no module named {', '.join(map(repr, missing))} in this model "
                              f"(linear modules: {', '.join(linear)}; or 'all')")
    if freeze is not None and model() is not None:
        layers = layer_count(model())
        if layers == 0:
            raise RecipeError("key 'finetuning_type': freeze tuning needs a stack of decoder layers (a ModuleList), "
                              "which this model does not have")
        # 0 trains the freeze_extra_modules alone (the embeddings, say), as LlamaFactory allows
        if (freeze.trainable_layers == 0 and not freeze.extra_modules) or abs(freeze.trainable_layers) > layers:
            raise RecipeError(f"key 'freeze_trainable_layers': {freeze.trainable_layers} leaves nothing sensible "
                              f"to train; the model has {layers} layers (use 1..{layers}, or -1..-{layers}; 0 "
                              "with freeze_extra_modules trains those alone)")
        freeze_selection(model(), freeze)  # refuses module names the model does not have


def starting_adapter(ctx) -> Path | None:
    """The adapter a run starts from (adapter_name_or_path), if the plan gave one."""
    adapter = ctx.inputs.get("adapter")
    return adapter.part("adapter") if adapter is not None else None


def upcast(model, which: tuple[str, ...]) -> None:
    """LlamaFactory's upcast_layernorm (1-d norm weights in float32) and upcast_lmhead_output (the head's
    output cast to float32 by a forward hook)."""
    import torch

    if "layernorm" in which:
        for name, param in model.named_parameters():
            if param.ndim == 1 and any(part in name for part in ("norm", "ln")):
                param.data = param.data.to(torch.float32)
    head = model.get_output_embeddings()
    if "lmhead_output" in which and isinstance(head, torch.nn.Linear) and head.weight.dtype != torch.float32:
        head.register_forward_hook(lambda module, args, output: output.to(torch.float32))


def grown_vocabulary(ctx) -> bool:
    """Whether the model artifact added tokens (tasks.vocab): their embedding rows must then be trained."""
    return bool(ctx.inputs["model"].info.get("added_token_ids"))


def embedding_modules(model) -> list[str]:
    """Short names of the input embedding and output head modules (LlamaFactory's additional_target)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and any(module is target for target in wanted)})


def lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None,
                tied: bool = False):
    from peft import LoraConfig

    init = True if lora.pissa_iter is None else "pissa" if lora.pissa_iter == -1 else f"pissa_niter_{lora.pissa_iter}"
    saved = [*lora.additional_target, *(modules_to_save or [])]
    extra = {"modules_to_save": saved, "ensure_weight_tying": tied} if saved else {}
    return LoraConfig(task_type=task_type, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora_targets(lora.target), use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                      init_lora_weights=init, **extra)


def keeps_half_precision(config) -> bool:
    """Trainable weights stay in the model's dtype under pure_bf16 and BAdam (it keeps its own fp32 copies) and
    under ZeRO-3 (DeepSpeed holds fp32 masters); otherwise they train in fp32, also under mixed precision."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return (config.precision == "pure_bf16" or uses_badam(config)
            or (is_deepspeed_zero3_enabled() and not config.quantization))


def upcast_trainable(model) -> None:
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def attach_trainable(model, config, adapter: Path | None = None, task_type: str = "CAUSAL_LM",
                     train_embeddings: bool = False):
    """Wrap or unfreeze the model according to finetuning_type; returns the model to train. With a starting
    adapter (adapter_name_or_path), LoRA training continues that adapter instead of a new one. With
    train_embeddings (the vocabulary grew), the embedding and head are trained too: LoRA saves them whole
    (modules_to_save, as LlamaFactory's additional_target), freeze tuning unfreezes them."""

    check_trainable(lambda: model, config.lora, config.freeze)
    upcast(model, getattr(config, "upcast", ()))
    if config.gradient_checkpointing and config.finetuning_type == "lora":
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    if config.finetuning_type == "lora":
        from peft import get_peft_model

        # No prepare_model_for_kbit_training on a quantized base (LlamaFactory calls none): it casts every
        # unquantized weight (embeddings, head, norms) to fp32; norms are upcast only by upcast_layernorm, above.
        if adapter is not None and config.lora.create_new_adapter:  # the old adapter becomes part of the base
            model = starting_adapter_on(model, adapter, task_type, trainable=False).merge_and_unload()
            adapter = None
        if adapter is not None:
            model = starting_adapter_on(model, adapter, task_type, trainable=True)
        else:
            extra = embedding_modules(model) if train_embeddings else None
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            model = get_peft_model(model, lora_config(config.lora, task_type, extra, tied))
            if config.lora.pissa_iter is not None:
                keep_pissa_start(model)
        if not keeps_half_precision(config):  # adapters train in fp32 even on a half-precision base
            upcast_trainable(model)
        sort_config_sets(model)
        return model
    if config.finetuning_type == "freeze":
        trained = freeze_selection(model, config.freeze)
        if task_type == "SEQ_CLS":  # a reward model's score head starts random: it trains, as LlamaFactory's v_head
            trained |= {name for name, _ in model.named_parameters() if name.split(".")[0] == "score"}
        for name, param in model.named_parameters():
            param.requires_grad = name in trained
        if train_embeddings:
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None:
                    module.weight.requires_grad = True
    if not keeps_half_precision(config):
        upcast_trainable(model)
    return model


def starting_adapter_on(model, adapter: Path, task_type: str, trainable: bool):
    """The model with the adapter a run starts from (adapter_name_or_path). A policy's (causal LM) adapter on a
    reward model's classifier goes on as a classifier's, its new score head trained with it (LlamaFactory
    continues an SFT adapter under its value head); an adapter made for another model is refused by key."""
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    settings = PeftConfig.from_pretrained(str(adapter))
    try:
        if task_type != "SEQ_CLS" or settings.task_type == "SEQ_CLS":
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
        # PEFT loads a classifier's adapter only with its score head's weights: the head starts as initialised.
        head = {"base_model.model.score.weight": model.score.weight.detach().clone()}
        settings.task_type, settings.inference_mode = "SEQ_CLS", not trainable
        wrapped = get_peft_model(model, settings)
        set_peft_model_state_dict(wrapped, {**load_file(str(adapter / "adapter_model.safetensors")), **head})
        return wrapped
    except (RuntimeError, ValueError) as exc:  # weight shapes or module names that do not match
        detail = " ".join(str(exc).split())[:200]
        raise RecipeError(f"key 'adapter_name_or_path': {adapter} does not fit this model ({detail})") from None


def keep_pissa_start(model) -> None:
    """Save the PiSSA adapter as initialised: converting the trained one into a plain LoRA on the original base
    (pissa_convert) needs it. It goes to a temporary folder whose path the model carries to `save_weights`."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="pissa-init-"))
    model.save_pretrained(str(folder))
    model.pissa_start = folder


def save_weights(model, tokenizer, config, out: Path) -> str:
    """Save the trained adapter (LoRA) or whole weights with the tokenizer; returns the part name."""
    weights = "adapter" if config.finetuning_type == "lora" else "model"
    gathered = gathered_state(model, keep=int(os.environ.get("LOCAL_RANK", "0")) == 0)  # all ranks take part
    if not node_writer():
        return weights  # another rank of this machine writes the artifact
    start = getattr(model, "pissa_start", None)
    if start is not None:  # a plain LoRA of rank 2r on the original base (PEFT's conversion)
        model.save_pretrained(str(out / weights), path_initial_model_for_weight_conversion=str(start))
        shutil.rmtree(start, ignore_errors=True)
        keep_whole_modules(model, out / weights)
    else:
        model.save_pretrained(str(out / weights), **gathered)
    tokenizer.save_pretrained(str(out / weights))  # beside an adapter too: AutoPeftModel then needs only the base
    return weights


def keep_whole_modules(model, folder: Path) -> None:
    """PEFT's PiSSA conversion writes the LoRA weights only, while the adapter's config still lists its
    modules_to_save (additional_target, a grown vocabulary's embedding and head): the trained copies go back in,
    or the adapter would not load."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    whole = {name: tensor for name, tensor in get_peft_model_state_dict(model).items() if "lora_" not in name}
    if whole:
        path = folder / "adapter_model.safetensors"
        converted = load_file(str(path))
        save_file({**converted, **{n: t.detach().contiguous() for n, t in whole.items()}}, str(path),
                  metadata={"format": "pt"})


def node_writer() -> bool:
    """Whether this process writes the artifact: always in one process; of several ranks, each machine's local
    rank 0. transformers saves only on global rank 0 while the process group lives, so another node's writer
    leaves the group first (training is over; every collective is done)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return True
    dist.barrier()  # no rank is still in a collective (the Trainer's last ones) when another node's writer leaves
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return False
    if dist.get_rank() != 0:
        dist.destroy_process_group()
    return True


def gathered_state(model, keep: bool = True) -> dict[str, Any]:
    """Under DeepSpeed ZeRO-3 each rank holds a slice of every weight: gather them (every rank takes part) into
    the state dict save_pretrained writes (copied only where `keep`: the writing rank). Elsewhere nothing."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return {}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if not keep:
            return {}
        state, seen = {}, set()
        for name, value in model.state_dict().items():
            if value.data_ptr() not in seen:  # tied weights (embeddings and head) once, as save_pretrained does
                seen.add(value.data_ptr())
                state[name] = value.detach().cpu().clone()
        return {"state_dict": state}


def meta_model(source: Path | str, **where: str):
    """The model's module structure from its config, without weights (for plan-time checks): a folder's
    config.json, or with `gguf_file` a GGUF file's metadata, or with `revision` a hub model's config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source), **where))
