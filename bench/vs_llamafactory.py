"""TuneFactory against LlamaFactory 0.9.5 on the same LoRA SFT job, side by side on this machine.

Both tools get the same model folder (the bundled SmolLM2-135M-Instruct, imported once), the demo's data,
template text, cutoff, batch, epochs, LoRA settings and learning rate, each tool's own defaults otherwise,
and both predict the test split greedily (both default to sampling). LlamaFactory is installed once into
its own virtualenv (torch 2.13.0 CPU; torchvision/torchaudio removed: their wheels do not match that torch;
LlamaFactory 0.9.5 imports torchaudio at module level for audio inputs, so the venv gets an empty
`torchaudio` module in its place, which text-only training never calls).

Printed per tool: wall time of training and of evaluation, non-pad training tokens/s, peak RSS, the tuned
model's eval loss as the tool reports it ("own") and by one implementation for both ("same", see
`same_eval_loss`), its ROUGE-L (one metric implementation for both), and how many tuned predictions are
identical between the tools; the last line carries `ratio=<TuneFactory wall / LlamaFactory wall>`.

    python bench/vs_llamafactory.py [--rows 320] [--work ~/.cache/tunefactory-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "recipes" / "demo_sft_lora.yaml"
LLAMAFACTORY = ["llamafactory==0.9.5", "torch==2.13.0", "transformers==5.6.0", "peft==0.18.1",
                "jieba", "nltk", "rouge-chinese"]  # the last three: its predict_with_generate metrics
# TuneFactory's smollm2 default system prompt (LlamaFactory's ends with a full stop; the GGUF's template has none)
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def timed(command: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command under /usr/bin/time; (wall seconds, peak RSS in MiB). Its output goes to log."""
    with log.open("w") as handle:
        done = subprocess.run(["/usr/bin/time", "-f", "TIMED %e %M", *command], stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, cwd=log.parent)
    text = log.read_text()
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    wall, rss = re.findall(r"TIMED ([\d.]+) (\d+)", text)[-1]
    return float(wall), int(rss) / 1024


def setup_llamafactory(work: Path) -> Path:
    """LlamaFactory's own virtualenv, made once; returns its llamafactory-cli."""
    venv = work / "lf-venv"
    cli = venv / "bin" / "llamafactory-cli"
    stamp = venv / ".installed-0.9.5"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "install", "-q", *LLAMAFACTORY], check=True)
        subprocess.run([*pip, "uninstall", "-q", "-y", "torchvision", "torchaudio"], check=True)
        stamp.touch()
    site = next((venv / "lib").glob("python3*/site-packages"))
    if not (site / "torchaudio").exists():  # see the module docstring
        (site / "torchaudio").mkdir()
        (site / "torchaudio" / "__init__.py").write_text('"""Stand-in: no torchaudio build matches torch 2.13."""\n')
    return cli


def import_model(work: Path) -> Path:
    """The bundled GGUF as a plain transformers folder, made once: the one model both tools load."""
    folder = work / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").exists():
        from tasks.model import ModelConfig, load_source, resolve_source

        source = resolve_source(None, None, "main")
        config = ModelConfig(source=source["digest"], source_kind="gguf", dtype="float32", trust_remote_code=False)
        model, tokenizer, _patches = load_source(source, config)
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def job(rows: int) -> dict:
    """The demo's job, greedy: the keys both tools share."""
    demo = yaml.safe_load(DEMO.read_text())
    shared = ("stage", "do_train", "finetuning_type", "lora_rank", "lora_target", "dataset", "eval_dataset",
              "cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
              "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "seed", "per_device_eval_batch_size",
              "max_new_tokens", "logging_steps", "bf16")
    return {**{k: demo[k] for k in shared}, "max_samples": rows, "do_sample": False,
            "dataset_dir": str(REPO / "configs" / "data")}


def run_tunefactory(work: Path, model: Path, rows: int) -> dict:
    folder = work / "tunefactory"
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {**job(rows), "model_name_or_path": str(model), "template": "smollm2", "save_steps": 1000}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    store = folder / f"store-{int(time.time())}"  # fresh: every stage is built
    wall, rss = timed([str(Path(sys.executable).with_name("tunefactory")), "run", "recipe.yaml", "--home", str(store)],
                      folder / "run.log", {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"})
    seconds = {m[0]: float(m[1]) for m in re.findall(r"^(\S+)\s+built\s+\w+\s+([\d.]+)$",
                                                        (folder / "run.log").read_text(), re.M)}
    train = json.loads(next((store / "train").glob("*/train_results.json")).read_text())
    tuned = artifact(store, "evaluate[tuned]")
    predictions = [json.loads(line)["predict"] for line in (tuned / "generated_predictions.jsonl").open()]
    result = {"train_s": seconds["train"], "eval_s": seconds["evaluate[base]"] + seconds["evaluate[tuned]"],
              "wall_s": wall, "rss_mib": rss, "tokens": train["tokens_trained"],
              "eval_loss": json.loads((tuned / "metrics.json").read_text())["eval_loss"], "predictions": predictions,
              "adapter": str(next((store / "train").glob("*/adapter"))),
              "eval_rows": str(artifact(store, "tokenize") / "eval")}
    (folder / "results.json").write_text(json.dumps(result))
    return result


def artifact(store: Path, label: str) -> Path:
    """The folder of the artifact a plan step of this label built."""
    for manifest in store.glob("*/*/manifest.json"):
        if json.loads(manifest.read_text()).get("label") == label:
            return manifest.parent
    raise SystemExit(f"no {label} artifact in {store}")


def run_llamafactory(work: Path, cli: Path, model: Path, rows: int, bf16: bool | None) -> dict:
    folder = work / "llamafactory"
    folder.mkdir(parents=True, exist_ok=True)
    common = {**job(rows), "model_name_or_path": str(model), "template": "smollm2", "default_system": SMOLLM_SYSTEM,
              "report_to": "none", "overwrite_cache": True, "preprocessing_num_workers": 1,
              "use_cpu": True}  # transformers refuses bf16 on a CPU unless told it is one
    if bf16 is not None:
        common["bf16"] = bf16
    train = {**common, "do_eval": True, "output_dir": str(folder / "adapter"), "overwrite_output_dir": True,
             "save_strategy": "no", "include_num_input_tokens_seen": True}
    predict = {k: v for k, v in common.items() if k not in ("do_train", "dataset")}
    predict |= {"do_predict": True, "predict_with_generate": True}
    (folder / "train.yaml").write_text(yaml.safe_dump(train))
    (folder / "predict_base.yaml").write_text(yaml.safe_dump({**predict, "output_dir": str(folder / "base")}))
    (folder / "predict_tuned.yaml").write_text(yaml.safe_dump({**predict, "output_dir": str(folder / "tuned"),
                                                                "adapter_name_or_path": str(folder / "adapter")}))
    env = {"CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "1"}
    train_wall, train_rss = timed([str(cli), "train", "train.yaml"], folder / "train.log", env)
    base_wall, base_rss = timed([str(cli), "train", "predict_base.yaml"], folder / "predict_base.log", env)
    tuned_wall, tuned_rss = timed([str(cli), "train", "predict_tuned.yaml"], folder / "predict_tuned.log", env)
    results = json.loads((folder / "adapter" / "all_results.json").read_text())
    predictions = [json.loads(line)["predict"] for line in (folder / "tuned" / "generated_predictions.jsonl").open()]
    labels = [json.loads(line)["label"] for line in (folder / "tuned" / "generated_predictions.jsonl").open()]
    return {"train_s": train_wall, "eval_s": base_wall + tuned_wall, "wall_s": train_wall + base_wall + tuned_wall,
            "rss_mib": max(train_rss, base_rss, tuned_rss), "train_runtime": results.get("train_runtime"),
            "eval_loss": results.get("eval_loss"), "predictions": predictions, "labels": labels}


def same_eval_loss(model: Path, adapter: Path, eval_rows: Path) -> float:
    """The tuned model's eval loss by one implementation for both tools: each tool reports its own, and they
    differ (TuneFactory's is the token mean over the split, in the evaluation's bf16; transformers' Trainer,
    which LlamaFactory's is, averages per-batch token means weighted by samples). Here: the base model in
    fp32 with the tool's adapter, TuneFactory's tokenized test rows (both tools' templates give the same
    text), TuneFactory's token-mean loss."""
    import torch
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.eval_passes import perplexity

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), adapter)
    pad_id = AutoTokenizer.from_pretrained(model).pad_token_id
    return perplexity(tuned.eval(), load_from_disk(str(eval_rows)), pad_id, batch_size=16, progress=False)["eval_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=320, help="training rows (the demo's max_samples: 320)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "tunefactory-bench")
    parser.add_argument("--llamafactory-bf16", choices=("same", "true", "false"), default="same",
                        help="LlamaFactory's bf16 (default: the demo's, as TuneFactory gets it)")
    parser.add_argument("--reuse-tunefactory", action="store_true",
                        help="take TuneFactory's figures from the last run in --work instead of running it again")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from tasks.metrics import load

    cli = setup_llamafactory(args.work)
    model = import_model(args.work)
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} python={platform.python_version()}")
    print(f"date: {time.strftime('%Y-%m-%d')}  job: the demo's LoRA SFT, {args.rows} rows, greedy prediction; "
          f"bf16: TuneFactory {job(args.rows).get('bf16', False)}, LlamaFactory {args.llamafactory_bf16}")
    saved = args.work / "tunefactory" / "results.json"
    tf = json.loads(saved.read_text()) if args.reuse_tunefactory else run_tunefactory(args.work, model, args.rows)
    lf_bf16 = None if args.llamafactory_bf16 == "same" else args.llamafactory_bf16 == "true"
    lf = run_llamafactory(args.work, cli, model, args.rows, lf_bf16)
    tf["same_eval_loss"] = same_eval_loss(model, tf["adapter"], tf["eval_rows"])
    lf["same_eval_loss"] = same_eval_loss(model, args.work / "llamafactory" / "adapter", tf["eval_rows"])
    rouge = load("rouge")
    for tool in (tf, lf):
        tool["rougeL"] = 100 * rouge.compute(predictions=tool["predictions"], references=lf["labels"])["rougeL"]
        tool["tokens_per_s"] = tf["tokens"] / tool["train_s"]  # the same rows and template for both tools
    same = sum(a.strip() == b.strip() for a, b in zip(tf["predictions"], lf["predictions"], strict=True))
    print(f"{'':14}{'TuneFactory':>14}{'LlamaFactory':>14}{'ratio':>8}")
    for key, label in (("train_s", "train s"), ("eval_s", "evaluate s"), ("wall_s", "whole wall s"),
                       ("tokens_per_s", "tokens/s"), ("rss_mib", "peak RSS MiB"), ("eval_loss", "eval loss own"),
                       ("same_eval_loss", "eval loss same"),
                       ("rougeL", "ROUGE-L")):
        digits = 4 if "loss" in key else 3
        print(f"{label:14}{tf[key]:>14.{digits}f}{lf[key]:>14.{digits}f}{tf[key] / lf[key]:>8.3f}")
    print(f"identical tuned predictions: {same} of {len(lf['predictions'])}")
    print(f"ratio={tf['wall_s'] / lf['wall_s']:.3f}")


if __name__ == "__main__":
    main()
