"""Bad input: one line naming the key / file / row / field, exit 1, no traceback.

Mistakes that can be known from the recipe, the registry or the model's config fail at plan time and
publish nothing; the rest fail when the stage that can see them runs, and publish nothing of theirs.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flows.cli import main
from flows.finetune import default_parallelism
from tasks.core.errors import TuneFactoryError
from tests.conftest import BUNDLED_DATA, REPO


@dataclass
class Case:
    id: str
    message: str  # what the one line must contain
    recipe: dict = field(default_factory=dict)  # recipe keys over the tiny-model recipe
    setup: Callable[["Places"], dict] | None = None  # -> more recipe keys
    argv: list[str] = field(default_factory=list)  # more command-line arguments
    failing: str | None = None  # the stage that fails at build time (None: at plan time, nothing published)
    raw_recipe: bytes | None = None  # the recipe file's bytes, instead of YAML from `recipe`
    recipe_path: str | None = None  # run this path instead of the written recipe


@dataclass
class Places:
    work: Path  # the working directory (store in work/artifacts)
    data: Path  # a dataset_dir holding mine.jsonl
    model: Path  # the tiny model


def registry(data: Path, entries: dict) -> dict:
    (data / "dataset_info.json").write_text(json.dumps(entries))
    return {"dataset": next(iter(entries)), "dataset_dir": str(data)}


def rows_file(data: Path, rows: list[dict], name: str = "rows.jsonl", **entry) -> dict:
    (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return registry(data, {"rows": {"file_name": name, **entry}})


def edit_mine(data: Path, edit: Callable[[list[dict]], None]) -> dict:
    rows = [json.loads(line) for line in (data / "mine.jsonl").read_text().splitlines()]
    edit(rows)
    (data / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dataset": "mine", "dataset_dir": str(data)}


def undesirable_eval_rows(p: Places) -> dict:
    """KTO evaluation data whose rows are all labelled undesirable: nothing to score replies against."""
    rows = [json.loads(line) for line in (BUNDLED_DATA / "pydoc_feedback_test.jsonl").read_text().splitlines()]
    (p.data / "bad.jsonl").write_text("".join(json.dumps({**r, "label": False}) + "\n" for r in rows))
    registry(p.data, {"bad": {"file_name": "bad.jsonl", "columns": {"prompt": "instruction", "query": "input",
                                                                    "response": "output", "kto_tag": "label"}}})
    return {"stage": "kto", "do_train": False, "dataset": None, "eval_dataset": "bad", "dataset_dir": str(p.data)}


def model_copy(p: Places, damage: Callable[[Path], None]) -> dict:
    copy = p.work / "model-copy"
    shutil.copytree(p.model, copy)
    damage(copy)
    return {"model_name_or_path": str(copy)}


def write(path: Path, content: str | bytes, keys: dict) -> dict:
    """Write a file (and its folder), then return recipe keys (for one-line setups)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return keys


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def dangling(work: Path) -> dict:
    (work / "gone").symlink_to(work / "nowhere")
    return {"output_dir": str(work / "gone")}


def users_folder(work: Path) -> dict:
    (work / "saves").mkdir()
    (work / "saves" / "NOTES.txt").write_text("mine")
    return {"output_dir": str(work / "saves")}


def outside(data: Path) -> dict:
    shutil.copy(BUNDLED_DATA / "pydoc_summaries_test.jsonl", data.parent / "elsewhere.jsonl")
    return registry(data, {"far": {"file_name": "../elsewhere.jsonl"}})


def symlinked_outside(data: Path) -> dict:
    (data / "link.jsonl").symlink_to("/etc/hostname")
    return registry(data, {"linked": {"file_name": "link.jsonl"}})


GOOD = {"instruction": "Say hi.", "output": "hi"}
CASES = [
    # --- the recipe file and its values -------------------------------------------------------------------------
    Case("unknown-key", "unknown key 'lora_rnk'; did you mean 'lora_rank'?", {"lora_rnk": 4}),
    Case("wrong-type", "key 'cutoff_len': Input should be a valid integer", {"cutoff_len": "long"}),
    Case("infinite-epochs", "key 'num_train_epochs'", {"num_train_epochs": float("inf")}),
    Case("negative-seed", "key 'seed': Input should be greater than or equal to 0", {"seed": -1}),
    Case("negative-alpha", "key 'lora_alpha': Input should be greater than 0", {"lora_alpha": -16}),
    Case("dropout-over-1", "key 'lora_dropout'", {"lora_dropout": 1.5}),
    Case("top-p-over-1", "key 'top_p'", {"top_p": 2}),
    Case("zero-max-samples", "key 'max_samples'", {"max_samples": 0}),
    Case("zero-max-steps", "key 'max_steps' must be a positive step count", {"max_steps": 0}),
    Case("scheduler-typo", "key 'lr_scheduler_type': unknown value 'cosin'; did you mean 'cosine'?",
         {"lr_scheduler_type": "cosin"}),
    Case("unknown-optim", "key 'optim': unknown value 'adamw_fast'", {"optim": "adamw_fast"}),
    Case("report-to-missing", "key 'report_to': 'comet_ml' is not an installed logger", {"report_to": "comet_ml"}),
    Case("probs-not-numbers", "key 'interleave_probs': expected comma-separated numbers",
         {"dataset": "pydoc_summaries,pydoc_summaries_test", "mix_strategy": "interleave_under",
          "interleave_probs": "a,b"}),
    Case("probs-wrong-count", "gives 3 probabilities for 2 datasets",
         {"dataset": "pydoc_summaries,pydoc_summaries_test", "mix_strategy": "interleave_under",
          "interleave_probs": "0.2,0.3,0.5"}),
    Case("probs-not-summing", "must be probabilities summing to 1",
         {"dataset": "pydoc_summaries,pydoc_summaries_test", "mix_strategy": "interleave_under",
          "interleave_probs": "0.5,0.6"}),
    Case("probs-with-concat", "needs mix_strategy interleave_under or interleave_over",
         {"dataset": "pydoc_summaries,pydoc_summaries_test", "interleave_probs": "0.5,0.5"}),
    Case("bf16-and-fp16", "keys 'bf16' and 'fp16' are both true", {"bf16": True, "fp16": True}),
    Case("quantized-full", "key 'quantization_bit' needs finetuning_type: lora", {"quantization_bit": 4,
                                                                                 "finetuning_type": "full"}),
    Case("streaming-no-steps", "key 'streaming' needs 'max_steps' > 0", {"streaming": True}),
    Case("streaming-packing", "'streaming' and 'packing'", {"streaming": True, "max_steps": 2, "packing": True}),
    Case("history-and-prompt", "'mask_history' and 'train_on_prompt' cannot both be true",
         {"mask_history": True, "train_on_prompt": True}),
    Case("train-without-data", "key 'dataset' is required", {"dataset": None}),
    Case("nothing-to-do", "nothing to do", {"do_train": False, "dataset": None, "eval_dataset": None}),
    Case("predict-without-eval", "nothing to do: do_eval is false, so the evaluation rows are not scored",
         {"do_train": False, "dataset": None, "do_eval": False, "do_predict": True}),
    Case("unknown-template", "key 'template': unknown template 'chatm'; did you mean 'chatml'?", {"template": "chatm"}),
    Case("lora-target-bundled-model", "key 'lora_target': no module named 'q_projj' in this model",
         {"model_name_or_path": None, "lora_target": "q_projj"}),  # read from the GGUF file's metadata
    Case("fa2-on-cpu", "key 'flash_attn': fa2 needs a CUDA GPU", {"flash_attn": "fa2"}),
    Case("missing-checkpoint", "key 'resume_from_checkpoint'", {"resume_from_checkpoint": "/no/such/checkpoint"}),
    Case("duplicate-key", "key 'lora_rank' is given twice", raw_recipe=b"dataset: pydoc_summaries\nlora_rank: 4\n"
         b"lora_rank: 8\n"),
    Case("not-utf8-recipe", "the recipe is not UTF-8 text (byte 15 is b'\\xff')",
         raw_recipe=b"dataset: pydoc_\xffsummaries\n"),
    Case("not-yaml", "not valid YAML", raw_recipe=b"dataset: [unclosed\n"),
    Case("key-not-a-name", "line 2: key 'on' is not a name to YAML but a value; quote it (\"on\")",
         raw_recipe=b"dataset: pydoc_summaries\non: true\n"),
    Case("key-a-list", "line 2: a key is a name, not a list or mapping",
         raw_recipe=b"dataset: pydoc_summaries\n[a]: 1\n"),
    Case("set-unknown-key", "error: --set: unknown key 'lora_rnk'; did you mean 'lora_rank'?",
         argv=["--set", "lora_rnk=4"]),
    Case("set-wrong-type", "error: --set: key 'cutoff_len': Input should be a valid integer",
         argv=["--set", "cutoff_len=long"]),
    Case("set-unknown-value", "error: --set: key 'lr_scheduler_type': unknown value 'cosin'; did you mean 'cosine'?",
         argv=["--set", "lr_scheduler_type=cosin"]),
    Case("set-combination", "error: --set: keys 'bf16' and 'fp16' are both true", recipe={"bf16": True},
         argv=["--set", "fp16=true"]),
    Case("chained-recipe-mistake", "up.yaml (named by key 'adapter_name_or_path'): key 'template': unknown template",
         setup=lambda p: write(p.work / "up.yaml", f"model_name_or_path: {p.model}\ndataset: pydoc_summaries\n"
                               "template: chatm\n", {"adapter_name_or_path": str(p.work / "up.yaml")})),
    Case("recipe-a-list", "a recipe is a mapping of keys to values", raw_recipe=b"- dataset\n"),
    Case("set-not-yaml", "--set 'lora_rank=[4': the value is not valid YAML", argv=["--set", "lora_rank=[4"]),
    Case("set-no-equals", "--set 'lora_rank': expected key=value", argv=["--set", "lora_rank"]),
    Case("recipe-missing", "recipe file not found: /no/such/recipe.yaml", recipe_path="/no/such/recipe.yaml"),
    Case("parallel-zero", "--parallel 0: give at least 1", argv=["--parallel", "0"]),
    # --- the model ----------------------------------------------------------------------------------------------
    Case("lora-target-typo", "key 'lora_target': no module named 'q_prj'", {"lora_target": "q_prj,v_proj"}),
    Case("freeze-too-many", "key 'freeze_trainable_layers': 5 leaves nothing sensible to train; the model has 2",
         {"finetuning_type": "freeze", "freeze_trainable_layers": 5}),
    Case("freeze-zero", "key 'freeze_trainable_layers': 0", {"finetuning_type": "freeze",
                                                             "freeze_trainable_layers": 0}),
    Case("model-missing", "key 'model_name_or_path': /no/such/model does not exist",
         {"model_name_or_path": "/no/such/model"}),
    Case("model-no-config", "has no config.json",
         setup=lambda p: model_copy(p, lambda m: (m / "config.json").unlink())),
    Case("model-config-corrupt", "config.json: not valid JSON",
         setup=lambda p: model_copy(p, lambda m: truncate(m / "config.json"))),
    Case("model-weights-corrupt", "cannot load the model at", failing="model",
         setup=lambda p: model_copy(p, lambda m: truncate(m / "model.safetensors"))),
    Case("gguf-file-missing", "key 'gguf_file'", setup=lambda p: {"model_name_or_path": str(p.data),
                                                                     "gguf_file": "model.gguf"}),
    # --- where results go ---------------------------------------------------------------------------------------
    Case("home-a-file", "is a file, not a folder; choose another --home",
         setup=lambda p: write(p.work / "store-file", "x", {}), argv=["--home", "store-file"]),
    Case("output-dir-a-file", "key 'output_dir': ",
         setup=lambda p: write(p.work / "out.txt", "x", {"output_dir": str(p.work / "out.txt")})),
    Case("output-dir-dangling", "is a symlink to nothing", setup=lambda p: dangling(p.work)),
    Case("output-dir-users-files", "holds files TuneFactory did not write (NOTES.txt)",
         setup=lambda p: users_folder(p.work)),
    # --- the dataset registry and the data ----------------------------------------------------------------------
    Case("unknown-dataset", "key 'dataset': dataset 'mne' is not in", setup=lambda p: {"dataset": "mne",
                                                                                         "dataset_dir": str(p.data)}),
    Case("dataset-typo", "or the bundled registry; did you mean 'pydoc_summaries_test'?",
         {"eval_dataset": "pydoc_sumaries_test"}),
    Case("registry-not-json", "dataset_info.json: not valid JSON",
         setup=lambda p: write(p.data / "dataset_info.json", "{oops", {"dataset_dir": str(p.data)})),
    Case("registry-not-utf8", "the dataset registry is not UTF-8 text",
         setup=lambda p: write(p.data / "dataset_info.json", b'{"mine": {"file_name": "\xff"}}',
                               {"dataset_dir": str(p.data)})),
    Case("registry-field-typo", "field 'file_nme': Extra inputs are not permitted; did you mean 'file_name'?",
         setup=lambda p: registry(p.data, {"mine": {"file_nme": "mine.jsonl"}})),
    Case("registry-column-typo", "field 'columns.respons': not a alpaca column; did you mean 'response'?",
         setup=lambda p: registry(p.data, {"mine": {"file_name": "mine.jsonl", "columns": {"respons": "output"}}})),
    Case("registry-unsupported-source", "field 'ms_hub_url': this source is not supported",
         setup=lambda p: registry(p.data, {"ms": {"ms_hub_url": "x/y"}})),
    Case("path-outside-dataset-dir", "field 'file_name': ../elsewhere.jsonl resolves to",
         setup=lambda p: outside(p.data)),
    Case("symlink-outside-dataset-dir", "field 'file_name': link.jsonl resolves to /etc/",
         setup=lambda p: symlinked_outside(p.data)),
    Case("data-file-missing", "dataset 'mine': file not found",
         setup=lambda p: (p.data / "mine.jsonl").unlink() or {"dataset": "mine", "dataset_dir": str(p.data)}),
    Case("malformed-json-row", "mine.jsonl, line 7: malformed JSON row",
         setup=lambda p: write(p.data / "mine.jsonl", "".join(
             line[:-1] + "\n" if number == 6 else line + "\n"
             for number, line in enumerate((p.data / "mine.jsonl").read_text().splitlines())),
             {"dataset": "mine", "dataset_dir": str(p.data)})),
    Case("data-not-utf8", "mine.jsonl: a dataset file is not UTF-8 text",
         setup=lambda p: write(p.data / "mine.jsonl", b'{"instruction": "\xff", "output": "x"}\n',
                               {"dataset": "mine", "dataset_dir": str(p.data)})),
    Case("missing-column", "column 'answer' (the 'response' field) not found", failing="align[rows]",
         setup=lambda p: rows_file(p.data, [GOOD], columns={"prompt": "instruction", "response": "answer"})),
    Case("empty-field", "row 4: field 'output' (response) is empty", failing="align[mine]",
         setup=lambda p: edit_mine(p.data, lambda rows: rows[4].update(output=""))),
    Case("all-rows-invalid", "all 2 rows are invalid", {"on_invalid_row": "drop"}, failing="align[rows]",
         setup=lambda p: rows_file(p.data, [{"instruction": "a", "output": ""}, {"instruction": "b", "output": " "}])),
    Case("preference-data-for-sft", "dataset 'rows' holds preference (ranking) data, which stage sft cannot train on",
         setup=lambda p: rows_file(p.data, [{"instruction": "q", "chosen": "a", "rejected": "b"}], ranking=True)),
    Case("kto-data-for-sft", "holds KTO data",
         setup=lambda p: rows_file(p.data, [{**GOOD, "label": True}],
                                   columns={"prompt": "instruction", "response": "output", "kto_tag": "label"})),
    Case("text-data-for-sft", "dataset 'rows' holds pretraining text (no replies), which stage sft cannot train on",
         setup=lambda p: rows_file(p.data, [{"text": "a document"}], columns={"prompt": "text"})),
    Case("multimodal-columns", "column 'images' (images) is multimodal input",
         setup=lambda p: rows_file(p.data, [{"messages": []}], formatting="sharegpt",
                                      columns={"messages": "messages", "images": "images"})),
    # --- preference and RLHF stages ----------------------------------------------------------------------------
    Case("sft-data-for-dpo", "dataset 'pydoc_summaries' holds conversations with single replies, which stage dpo "
         "cannot train on", {"stage": "dpo"}),
    Case("kto-data-for-dpo", "holds KTO data, which stage dpo", {"stage": "dpo", "dataset": "pydoc_feedback"}),
    Case("ppo-without-reward", "stage ppo needs 'reward_model'", {"stage": "ppo"}),
    Case("ppo-full-tuning", "stage ppo trains a LoRA policy", {"stage": "ppo", "reward_model": "x",
                                                               "finetuning_type": "full", "reward_model_type": "full"}),
    Case("unknown-pref-loss", "key 'pref_loss': Input should be 'sigmoid'", {"stage": "dpo", "pref_loss": "dpop"}),
    Case("smoothing-with-hinge", "key 'dpo_label_smoothing' applies to pref_loss: sigmoid only",
         {"stage": "dpo", "pref_loss": "hinge", "dpo_label_smoothing": 0.1}),
    Case("reward-model-recipe-not-rm", "trains stage sft, not a reward model (stage: rm)",
         setup=lambda p: {"stage": "ppo", "reward_model": str(write(p.work / "sft.yaml", "dataset: pydoc_summaries\n",
                                                                     {}) or p.work / "sft.yaml")}),
    Case("reward-model-folder-without-head", "is not a reward model (no value_head.safetensors)",
         setup=lambda p: {"stage": "ppo", "reward_model": str(write(p.work / "ad" / "adapter_config.json", "{}", {})
                                                               or p.work / "ad")}),
    Case("reward-model-artifact-missing", "artifact reward/" + "0" * 64 + " is not in the store",
         {"stage": "ppo", "reward_model": "reward/" + "0" * 64}),
    Case("adapter-path-missing", "key 'adapter_name_or_path': /no/such/adapter is not a folder",
         {"adapter_name_or_path": "/no/such/adapter"}),
    Case("api-reward-model", "'api' (an HTTP reward service) is not supported",
         {"stage": "ppo", "reward_model": "http://x", "reward_model_type": "api"}),
    Case("val-size-and-eval-dataset", "keys 'val_size' and 'eval_dataset' both choose the evaluation rows",
         {"val_size": 4}),
    Case("val-size-over-data", "key 'val_size': 30 validation rows asked for, but the training data has only 24",
         {"eval_dataset": None, "val_size": 30}, failing="tokenize"),
    Case("export-quantization", "key 'export_quantization_bit': quantizing an export (GPTQ) is not supported",
         {"export_quantization_bit": 4, "export_dir": "exported"}),
    Case("rm-export-dir", "key 'export_dir': stage rm trains a reward model",
         {"stage": "rm", "dataset": "pydoc_preferences", "eval_dataset": None, "export_dir": "exported"}),
    Case("output-dir-is-export-dir", "keys 'output_dir' and 'export_dir': saves and saves/merged overlap",
         {"output_dir": "saves", "export_dir": "saves/merged"}),
    Case("kto-eval-all-undesirable", "dataset 'bad': no desirable rows (kto_tag true)",
         setup=undesirable_eval_rows, failing="evaluate[base]"),
    Case("cutoff-below-template", "key 'cutoff_len': 4 tokens leave no room for a conversation",
         {"cutoff_len": 4}, failing="tokenize"),
]


@pytest.fixture
def data_dir(workdir):
    """A user dataset_dir holding a copy of the bundled training file under the name `mine`."""
    folder = workdir / "data"
    folder.mkdir()
    shutil.copy(BUNDLED_DATA / "pydoc_summaries_train.jsonl", folder / "mine.jsonl")
    (folder / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))
    return folder


def test_there_are_at_least_fifty_cases():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line(case, capsys, write_recipe, workdir, data_dir, tiny_model_dir):
    places = Places(workdir, data_dir, tiny_model_dir)
    values = {**case.recipe, **(case.setup(places) if case.setup else {})}
    recipe = write_recipe(**values)
    if case.raw_recipe is not None:
        recipe.write_bytes(case.raw_recipe)
    code = main(["run", case.recipe_path or str(recipe), *case.argv])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("tunefactory: error: ") and "\n" not in err and "Traceback" not in err, err
    assert case.message in err
    store = workdir / "artifacts"
    published = {json.loads(m.read_text())["label"] for m in store.glob("*/*/manifest.json")}
    if case.failing is None:
        assert published == set()  # a plan-time error publishes nothing
    else:
        assert case.failing not in published


def test_cli_prints_no_traceback(write_recipe, workdir):
    recipe = write_recipe(lora_rnk=4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "flows", "run", str(recipe)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and done.stderr.strip().endswith("did you mean 'lora_rank'?")


def test_debug_after_any_command_shows_the_traceback(tmp_path, capsys):
    missing = ["gc", "--home", str(tmp_path / "nostore")]
    assert main(missing) == 1 and capsys.readouterr().err.startswith("tunefactory: error: tunefactory gc: no")
    for argv in ([*missing, "--debug"], ["--debug", *missing], ["data", "preview", "nope.yaml", "--debug"]):
        with pytest.raises(TuneFactoryError):
            main(argv)


def test_a_template_shown_with_a_folder_that_holds_no_tokenizer(tmp_path, capsys):
    assert main(["templates", "show", "chatml", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tunefactory: error: --model {tmp_path}: no tokenizer loads from it") and "\n" not in err


def test_a_parallelism_setting_that_is_not_a_number_is_ignored(monkeypatch):
    monkeypatch.setenv("TUNEFACTORY_PARALLEL_STAGES", "3")
    assert default_parallelism() == 3
    monkeypatch.setenv("TUNEFACTORY_PARALLEL_STAGES", "two")  # read at import: an error there would name nothing
    assert default_parallelism() == (1 if (os.cpu_count() or 1) <= 2 else 2)
