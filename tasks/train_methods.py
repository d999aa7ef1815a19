"""How the base model is loaded and made trainable: LoRA (DoRA, rsLoRA, QLoRA), full and freeze tuning.

The settings are typed parts of the train stage's config; `check_trainable` refuses, naming the recipe
key, options that would train nothing (a lora_target matching no module, too many frozen layers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.errors import RecipeError
from tasks.core.hardware import torch_dtype

LAYER_NUMBER = re.compile(r"\.layers\.(\d+)\.")


class LoraSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    rank: int
    alpha: int
    dropout: float
    target: str
    use_dora: bool
    use_rslora: bool


class FreezeSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    trainable_layers: int  # the last N layers (N > 0) or the first -N (N < 0)


class QuantSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    bits: int
    type: str | None  # 4-bit only
    double: bool | None  # 4-bit only


def quantization_config(quant: QuantSettings | None, precision: str):
    if quant is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double,
        bnb_4bit_compute_dtype=torch_dtype("bfloat16" if precision == "bf16" else "float32"),
    )


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
    if config.precision == "fp32":
        kwargs["dtype"] = torch_dtype("float32")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    # PEFT writes the base's name into adapter_config.json and the model card; here it is a store path, which
    # would make the adapter's bytes depend on where the store is. The copy in output_dir names the user's model.
    model.name_or_path = model.config._name_or_path = ""
    return model


def lora_targets(value: str) -> str | list[str]:
    """PEFT target_modules for the recipe's lora_target: every linear layer but the head, or names."""
    return "all-linear" if value.strip() == "all" else [name.strip() for name in value.split(",") if name.strip()]


def module_names(model) -> dict[str, str]:
    """Short name (last dotted part) -> class name of every module, for checking targets."""
    return {name.rsplit(".", 1)[-1]: type(module).__name__ for name, module in model.named_modules() if name}


def layer_count(model) -> int:
    """Number of numbered decoder layers (`.layers.N.` in parameter names)."""
    numbers = {int(m.group(1)) for name, _ in model.named_parameters() if (m := LAYER_NUMBER.search(name))}
    return max(numbers) + 1 if numbers else 0


def check_trainable(model, lora: LoraSettings | None, freeze: FreezeSettings | None) -> None:
    """Refuse options that match nothing in this model, naming the recipe key."""
    if lora is not None and lora.target.strip() != "all":
        names = module_names(model)
        linear = sorted(n for n, kind in names.items() if kind in ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D"))
        missing = [t for t in lora_targets(lora.target) if t not in names]
        if missing:
            raise RecipeError(f"key 'lora_target': no module named {', '.join(map(repr, missing))} in this model "
                              f"(linear modules: {', '.join(linear)}; or 'all')")
    if freeze is not None:
        layers = layer_count(model)
        if layers == 0:
            raise RecipeError("key 'finetuning_type': freeze tuning needs numbered decoder layers "
                              "('.layers.N.'), which this model does not have")
        if freeze.trainable_layers == 0 or abs(freeze.trainable_layers) > layers:
            raise RecipeError(f"key 'freeze_trainable_layers': {freeze.trainable_layers} leaves nothing sensible "
                              f"to train; the model has {layers} layers (use 1..{layers}, or -1..-{layers})")


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

    extra = {"modules_to_save": modules_to_save, "ensure_weight_tying": tied} if modules_to_save else {}
    return LoraConfig(task_type=task_type, r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora_targets(lora.target), use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                      **extra)


def attach_trainable(model, config, adapter: Path | None = None, task_type: str = "CAUSAL_LM",
                     train_embeddings: bool = False):
    """Wrap or unfreeze the model according to finetuning_type; returns the model to train. With a starting
    adapter (adapter_name_or_path), LoRA training continues that adapter instead of a new one. With
    train_embeddings (the vocabulary grew), the embedding and head are trained too: LoRA saves them whole
    (modules_to_save, as LlamaFactory's additional_target), freeze tuning unfreezes them."""
    import torch

    check_trainable(model, config.lora, config.freeze)
    upcast(model, getattr(config, "upcast", ()))
    if config.gradient_checkpointing and config.finetuning_type == "lora":
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    if config.finetuning_type == "lora":
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        if config.quantization:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        else:
            extra = embedding_modules(model) if train_embeddings else None
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            model = get_peft_model(model, lora_config(config.lora, task_type, extra, tied))
        for param in model.parameters():  # adapters train in fp32 even on a half-precision base
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
        return model
    if config.finetuning_type == "freeze":
        layers = layer_count(model)
        count = config.freeze.trainable_layers
        chosen = set(range(layers - count, layers) if count > 0 else range(-count))
        for name, param in model.named_parameters():
            match = LAYER_NUMBER.search(name)
            param.requires_grad = bool(match) and int(match.group(1)) in chosen
        if train_embeddings:
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None:
                    module.weight.requires_grad = True
    return model


def save_weights(model, tokenizer, config, out: Path) -> str:
    """Save the trained adapter (LoRA) or whole weights with the tokenizer; returns the part name."""
    weights = "adapter" if config.finetuning_type == "lora" else "model"
    model.save_pretrained(str(out / weights))
    tokenizer.save_pretrained(str(out / weights))  # beside an adapter too: AutoPeftModel then needs only the base
    return weights


def meta_model(folder: Path):
    """The model's module structure from its config.json, without weights (for plan-time checks)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
