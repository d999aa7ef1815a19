"""Shared fixtures: isolated Prefect/MLflow/store homes, a tiny random model, recipe writers."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import yaml

# Isolate Prefect's database and result records, and MLflow, before anything imports them.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="tunefactory-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["TUNEFACTORY_CACHE_DIR"] = str(_SESSION_DIR / "cache")  # source digests, transformers option names
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A suite started as a background job of a non-interactive shell (`make test &` in a script) inherits SIGINT
# ignored, and so does every command the tests start: Python then installs no KeyboardInterrupt handler, and the
# Ctrl-C tests (test_interrupt, test_deployments' serve) wait for commands that never see the signal. A handler
# here is reset to the default in each exec'd child, where Python installs its own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Prefect configures logging with dictConfig on its first import, and dictConfig closes every handler that exists
# then. absl's handler (rouge-score imports absl) closes its stream unless that stream is sys.stderr at that moment:
# under capsys it is pytest's own capture file, so a test that scored ROUGE before anything imported Prefect broke
# pytest's capture for the test that did (test_kto_trains, then test_ppo_chains_on_sft_and_rm_recipes). Prefect
# first, then, once the environment above is set.
import prefect.main  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
BUNDLED_DATA = REPO / "configs" / "data"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]


def tiny_llama_config(vocab_size: int, **overrides):
    """A 2-layer Llama config (hidden 32): big enough to train and pack, small enough for seconds."""
    from transformers import LlamaConfig

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "max_position_embeddings": 512}
    return LlamaConfig(vocab_size=vocab_size, **{**shape, **overrides})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a 600-token byte-level BPE tokenizer trained on the bundled data."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [
        json.loads(line)["input"] + "\n" + json.loads(line)["output"]
        for line in (BUNDLED_DATA / "pydoc_summaries_train.jsonl").read_text().splitlines()
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, special_tokens=CHAT_TOKENS, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def no_stop_request_from_an_earlier_test():
    """A flow that fails asks this process's running builds to stop, and the request stays until a new run
    clears it: a test calling execute() directly after such a test in the same worker must not inherit it."""
    from tasks.core.stage import clear_stop

    clear_stop()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh working directory with its own artifact store and MLflow database."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNEFACTORY_HOME", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def tiny_recipe_values(model_dir: Path, **overrides) -> dict:
    """A fast recipe on the tiny model and a slice of the bundled data."""
    values = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "finetuning_type": "lora",
        "lora_rank": 4,
        "dataset": "pydoc_summaries",
        "eval_dataset": "pydoc_summaries_test",
        "template": "chatml",
        "cutoff_len": 96,
        "max_samples": 24,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "num_train_epochs": 1.0,
        "logging_steps": 2,
        "save_steps": 3,
        "disable_gradient_checkpointing": True,
        "per_device_eval_batch_size": 8,
        "max_new_tokens": 8,
        "do_sample": False,
    }
    values.update(overrides)
    return values


@pytest.fixture
def write_recipe(workdir, tiny_model_dir):
    """Write a tiny-model recipe YAML (with overrides) into the working directory; return its path."""

    def write(name: str = "recipe.yaml", **overrides) -> Path:
        path = workdir / name
        path.write_text(yaml.safe_dump(tiny_recipe_values(tiny_model_dir, **overrides)))
        return path

    return write


def usable_checkpoints(staging: Path) -> list[int]:
    """Steps of the checkpoints under a train stage's staging folder that a resume may use, judged as the stage
    judges them: a kill can land mid-save (DeepSpeed writes its `latest` tag, and the weights, before the Trainer
    writes trainer_state.json), leaving a folder that looks complete by any one file."""
    from tasks.train_checkpoints import checkpoint_problem

    return sorted(int(p.name.split("-")[1]) for p in staging.glob("*/checkpoint-*")
                  if checkpoint_problem(p, save_only_model=False) is None)


def finished_task_runs(client, flow_run_id: str, expected: int, timeout: float = 30) -> list:
    """A flow run's task runs as Prefect's server records them, once all `expected` are in a final state.

    The server records task runs from events, asynchronously, and a flow run can be final before its task
    runs' last events are in. Until then a task run may read Pending, and under Prefect's default name
    ("evaluate-01e"): the rename to its task_run_name travels with the later events."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_task_runs(flow_run_filter=flow_filter)
        if len(runs) >= expected and all(run.state is not None and run.state.is_final() for run in runs):
            return runs
        assert time.monotonic() < deadline, f"Prefect did not record {expected} finished task runs of {flow_run_id}"
        time.sleep(0.2)


def servers_of(prefect_home: Path) -> list[int]:
    """Pids of `prefect server start` processes using this PREFECT_HOME."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in command and b"start" in command and f"PREFECT_HOME={prefect_home}".encode() in environ:
            found.append(int(proc.name))
    return found
