"""Training on several ranks: the train task launches torchrun (2 CPU ranks over gloo, DeepSpeed's CPU accelerator)
and collects the artifact; the loss curve matches a one-rank run with the same global batch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tasks.core.ports import free_port
from tasks.core.stage import run_in_process
from tasks.core.store import ArtifactStore
from tasks.launch import torchrun_command
from tests.conftest import REPO, tiny_recipe_values, usable_checkpoints
from tests.test_methods import plan_train

TOLERANCE = 1e-3  # per logged step, absolute, on losses near 6.4: the ranks only reorder float sums
DEEPSPEED = REPO / "configs" / "deepspeed"


def run(store, model_dir, **overrides):
    values = tiny_recipe_values(model_dir, **{"max_steps": 6, "logging_steps": 1, "save_steps": 100,
                                             "learning_rate": 5e-3, "finetuning_type": "full", **overrides})
    refs = run_in_process(plan_train(values), store)
    artifact = ArtifactStore(store).open(refs["train"])
    history = json.loads(artifact.part("log_history").read_text())
    return artifact, [e["loss"] for e in history if "loss" in e]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model_dir):
    store = tmp_path_factory.mktemp("one-rank")
    return store, run(store, tiny_model_dir, per_device_train_batch_size=4)


@pytest.mark.parametrize("sharding", ["ds_z2_config.json", "ds_z3_config.json", "ddp"])
def test_two_ranks_match_one(one_rank, tiny_model_dir, sharding):
    """ZeRO-2, ZeRO-3, and plain data parallel (nproc_per_node alone)."""
    store, (single, single_losses) = one_rank
    keys = {} if sharding == "ddp" else {"deepspeed": str(DEEPSPEED / sharding)}
    artifact, losses = run(store, tiny_model_dir, per_device_train_batch_size=2, nproc_per_node=2, **keys)
    assert len(losses) == len(single_losses) == 6
    gap = max(abs(a - b) for a, b in zip(losses, single_losses, strict=True))
    print(f"{sharding}: 2 ranks {[round(x, 5) for x in losses]}, 1 rank {[round(x, 5) for x in single_losses]}, "
          f"largest gap {gap:.2e}")
    assert gap < TOLERANCE, (losses, single_losses)
    results = json.loads(artifact.part("results").read_text())
    assert results["global_step"] == 6 and results["optimizer"] == "torch.optim.adamw.AdamW"
    assert results["world_size"] == 2 and results["distributed"] == ("MULTI_CPU" if sharding == "ddp" else "DEEPSPEED")
    expected = json.loads(single.part("results").read_text())["trainable_parameters"]
    assert results["trainable_parameters"] == expected
    ours = load_file(str(artifact.part("model") / "model.safetensors"))
    theirs = load_file(str(single.part("model") / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-3  # the same weights, gathered


def trained_on(store, model_dir, label: str, **overrides):
    """(artifact, logged losses) of the training stage `label` (reward, preference) of a tiny recipe."""
    from flows.plan import plan_run
    from tasks.core.recipe import Recipe

    values = tiny_recipe_values(model_dir, **{"max_steps": 4, "logging_steps": 1, "save_steps": 100,
                                             "learning_rate": 5e-3, "dataset": "pydoc_preferences",
                                             "eval_dataset": "pydoc_preferences_test", "max_samples": 16,
                                             **overrides})
    steps = [s for s in plan_run(Recipe.from_flat(values)).steps if s.stage.name not in ("merge", "evaluate")]
    refs = run_in_process(steps, store)
    artifact = ArtifactStore(store).open(refs[next(s.label for s in steps if s.stage.name == label)])
    history = json.loads(artifact.part("log_history").read_text())
    return artifact, [e["loss"] for e in history if "loss" in e]


FEEDBACK = {"dataset": "pydoc_feedback", "eval_dataset": "pydoc_feedback_test"}


@pytest.mark.parametrize("stage,label,sharding,data", [("rm", "reward", "ds_z2_config.json", {}),
                                                       ("rm", "reward", "ds_z3_config.json", {}),
                                                       ("dpo", "preference", "ddp", {}),
                                                       ("dpo", "preference", "ds_z3_config.json", "ref_model"),
                                                       ("kto", "preference", "ds_z2_config.json", FEEDBACK)])
def test_reward_and_preference_stages_on_two_ranks_match_one(tmp_path, tiny_model_dir, stage, label, sharding, data):
    """rm under ZeRO-2 (unpadded pairs) and ZeRO-3 (TRL's padded ones; its score head gathered from the ranks'
    slices when saved), LoRA DPO under plain data parallel (its reference: the policy's own base with the
    adapter off, through DDP's wrapper) and KTO (its KL estimate averaged over the ranks, as TRL does): 2
    ranks of 2 rows train as 1 rank of 4 does."""
    keys = {} if sharding == "ddp" else {"deepspeed": str(DEEPSPEED / sharding)}
    if data == "ref_model":  # a separate reference model, partitioned like the policy
        data = {"ref_model": str(tiny_model_dir)}
    single, single_losses = trained_on(tmp_path / "one", tiny_model_dir, label, stage=stage,
                                       per_device_train_batch_size=4, **data)
    double, losses = trained_on(tmp_path / "two", tiny_model_dir, label, stage=stage, per_device_train_batch_size=2,
                                nproc_per_node=2, **keys, **data)
    assert len(losses) == len(single_losses) == 4
    gap = max(abs(a - b) for a, b in zip(losses, single_losses, strict=True))
    assert gap < 1e-4, (losses, single_losses)  # KTO's KL estimate of one rank alone moved them 7e-4
    assert json.loads(double.part("results").read_text())["world_size"] == 2
    ours = load_file(str(double.part("adapter") / "adapter_model.safetensors"))
    theirs = load_file(str(single.part("adapter") / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-3
    if label == "preference":  # the reward figures are over every rank's rows, not rank 0's alone
        names = ["rewards/chosen", "rewards/rejected"] + (["rewards/accuracies"] if stage == "dpo" else [])
        ours, theirs = ([e.get(name, math.nan) for e in json.loads(a.part("log_history").read_text()) if "loss" in e
                         for name in names] for a in (double, single))  # a KTO batch may lack undesirable rows
        assert ours == pytest.approx(theirs, abs=1e-4, nan_ok=True) and not all(map(math.isnan, ours))
    if stage == "rm":
        head, expected = (load_file(str(a.part("value_head")))["weight"] for a in (double, single))
        assert head.shape == expected.shape and torch.allclose(head, expected, atol=1e-3)


def test_ppo_refuses_several_ranks(tiny_model_dir):
    from tasks.core.errors import RecipeError
    from tasks.core.recipe import Recipe

    with pytest.raises(RecipeError, match="stage ppo .* trains in one process"):
        Recipe.from_flat(tiny_recipe_values(tiny_model_dir, stage="ppo", reward_model=str(tiny_model_dir),
                                            nproc_per_node=2))


def test_a_quantized_reference_cannot_be_partitioned(tiny_model_dir):
    from tasks.core.errors import RecipeError
    from tasks.core.recipe import Recipe

    with pytest.raises(RecipeError, match="'ref_model_quantization_bit' cannot be combined"):
        Recipe.from_flat(tiny_recipe_values(tiny_model_dir, stage="dpo", ref_model=str(tiny_model_dir),
                                            ref_model_quantization_bit=4,
                                            deepspeed=str(DEEPSPEED / "ds_z3_config.json")))


def test_fsdp_needs_a_gpu(tiny_model_dir):
    from flows.plan import plan_run
    from tasks.core.errors import RecipeError
    from tasks.core.hardware import has_cuda
    from tasks.core.recipe import Recipe

    if has_cuda():
        pytest.skip("a GPU machine runs FSDP")
    with pytest.raises(RecipeError, match="key 'fsdp': accelerate shards with FSDP on GPUs only"):
        plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, fsdp="full_shard auto_wrap")))


def test_launcher_command(tiny_model_dir):
    from tasks.core.recipe import Recipe
    from tasks.train import plan

    class Step:
        label, locators = "upstream", {"sources": {}}

    recipe = Recipe.from_flat(tiny_recipe_values(tiny_model_dir, nproc_per_node=4, nnodes=2, node_rank=1,
                                                 master_addr="10.0.0.1", master_port=29400))
    config = plan(recipe, Step(), Step()).config
    command = torchrun_command(config, REPO / "request.pkl")
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
            "--master_port=29400"} <= set(command)
    assert config.launch.world_size == 8
    assert torch.distributed.is_available()


CHILD = """
import json, sys
from tasks.core.stage import run_in_process
from tests.test_methods import plan_train
run_in_process(plan_train(json.loads(sys.argv[1])), sys.argv[2])
"""


def test_killed_deepspeed_run_resumes_and_reports(tiny_model_dir, workdir, tmp_path):
    """A 2-rank ZeRO-2 run killed mid-way (worker SIGKILLed: torchrun and its ranks go with it) resumes from the
    newest checkpoint; the resumed ranks report loss per step to the stage's MLflow run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tasks.core import tracking
    from tasks.core.stage import RunContext, execute

    store = workdir / "artifacts"
    values = tiny_recipe_values(tiny_model_dir, max_steps=40, save_steps=4, logging_steps=1, finetuning_type="full",
                                per_device_train_batch_size=2, nproc_per_node=2, deepspeed=str(DEEPSPEED /
                                                                                               "ds_z2_config.json"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(values), str(store)], cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    staging = store / ".staging" / "train"
    deadline = time.monotonic() + 240
    try:
        while len(usable_checkpoints(staging)) < 2:
            assert child.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    time.sleep(3)
    saved = usable_checkpoints(staging)
    assert saved[-1] < 40 and usable_checkpoints(staging) == saved  # the ranks are gone: nothing more is written

    parent = tracking.start_parent("resume", {}, {}, "tests")
    run_id = tracking.start_stage(parent, "train", {})
    refs = {}
    for step in plan_train(values):
        run = RunContext(home=str(store), mlflow_run_id=run_id if step.stage.name == "train" else None)
        refs[step.label] = execute(step, {n: refs[label] for n, label in step.inputs.items()}, run)
    artifact = ArtifactStore(store).open(refs["train"])
    results = json.loads(artifact.part("results").read_text())
    assert results["resumed_from_step"] == saved[-1] and results["global_step"] == 40
    logged = {m.step for m in tracking.client().get_metric_history(run_id, "loss")}
    assert logged == set(range(saved[-1] + 1, 41))  # each step after the resume, from rank 0 only, once
    reported = [m.value for m in tracking.client().get_metric_history(run_id, "train_loss")]
    assert results["train_loss"] in reported  # the whole run's figure, beside the Trainer's own for this part
    print(f"killed after checkpoint {saved[-1]}, resumed to step 40: train_loss {results['train_loss']:.4f}")


def test_deepspeed_checkpoint_checks(tmp_path):
    from tasks.train_checkpoints import checkpoint_problem

    folder = tmp_path / "checkpoint-4"
    (folder / "global_step4").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    torch.save({"w": 1}, folder / "scheduler.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "latest").write_text("global_step4")
    assert checkpoint_problem(folder, False).startswith("DeepSpeed state global_step4 is missing")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"x": 1}, folder / "global_step4" / name)
    assert checkpoint_problem(folder, False) is None
    (folder / "model.safetensors").unlink()  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the
    assert checkpoint_problem(folder, False) is None  # model is in the shards only (it was deleted as unusable)
    assert checkpoint_problem(folder, True) == "no model or adapter weights"
    (folder / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"torn")
    assert "optim_states.pt is missing or torn" in checkpoint_problem(folder, False)


def test_a_failing_rank_fails_the_task_in_one_line():
    import logging
    import sys

    from tasks.core.errors import TuneFactoryError
    from tasks.launch import run_forwarding

    script = "import sys; print('[rank1]: ValueError: the cause'); print('...ChildFailedError:'); sys.exit(1)"
    with pytest.raises(TuneFactoryError, match=r"torchrun exit 1\): \[rank1\]: ValueError: the cause$"):
        run_forwarding([sys.executable, "-c", script], {}, logging.getLogger("test"))


def test_the_failing_rank_is_named_not_the_ranks_that_failed_after_it():
    """Rank 1 dies; rank 0 then fails on the closed connection and prints last. torchrun names rank 1 the root
    cause: its exception is the task's error (it was rank 0's side effect)."""
    import logging
    import sys

    from tasks.core.errors import TuneFactoryError
    from tasks.launch import run_forwarding

    output = ["[rank1]: Traceback (most recent call last):", "[rank1]: ValueError: the real cause on rank 1",
              "[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer",
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "Failures:", "[1]:",
              "  rank      : 0 (local_rank: 0)", "Root Cause (first observed failure):", "[0]:",
              "  rank      : 1 (local_rank: 1)", "  exitcode  : 1 (pid: 19483)"]
    script = f"import sys; print({chr(10).join(output)!r}); sys.exit(1)"
    with pytest.raises(TuneFactoryError, match=r"exit 1\): \[rank1\]: ValueError: the real cause on rank 1$"):
        run_forwarding([sys.executable, "-c", script], {}, logging.getLogger("test"))
    unnamed = f"import sys; print({chr(10).join(output[:3])!r}); sys.exit(1)"  # no summary: the first one printed
    with pytest.raises(TuneFactoryError, match=r"exit 1\): \[rank1\]: ValueError: the real cause on rank 1$"):
        run_forwarding([sys.executable, "-c", unnamed], {}, logging.getLogger("test"))
    # Rank 1 failed before its process group started: its lines carry no [rank1] prefix.
    early = ["[rank0]: NotImplementedError: no fused kernel here, falling back", "ValueError: rank 1 could not start",
             *output[2:]]
    script = f"import sys; print({chr(10).join(early)!r}); sys.exit(1)"
    with pytest.raises(TuneFactoryError, match=r"exit 1\): ValueError: rank 1 could not start$"):
        run_forwarding([sys.executable, "-c", script], {}, logging.getLogger("test"))


def test_a_stop_reaches_quiet_ranks_within_a_second():
    """The stop request was checked only when the launcher printed a line: quiet ranks (a long step, a hung
    collective) kept running until their next line."""
    import logging
    import sys
    import threading
    import time

    from tasks.core.stage import BuildInterrupted, clear_stop, request_stop
    from tasks.launch import run_forwarding

    script = "import time; print('[rank0]: step 1', flush=True); time.sleep(60)"
    threading.Timer(2, request_stop).start()
    started = time.monotonic()
    try:
        with pytest.raises(BuildInterrupted):
            run_forwarding([sys.executable, "-c", script], {}, logging.getLogger("test"))
    finally:
        clear_stop()
    assert time.monotonic() - started < 5


def test_free_ports_come_from_below_the_ephemeral_range():
    """A port from bind(0) is ephemeral: another process's outgoing connection could take it in the seconds before
    torchrun (or a Prefect server) binds it, as two test workers' connections can."""
    from tasks.core.ports import EPHEMERAL_RANGE, binds

    low = int(EPHEMERAL_RANGE.read_text().split()[0])
    ports = [free_port() for _ in range(5)]
    assert all(20000 <= port < low and binds(port) for port in ports), (ports, low)


def run_nodes(commands: list[list[str]], logs: list, env: dict, deadline_s: float) -> None:
    """Start every node's process, wait for all; the first failure (or the deadline) stops the others, and the
    assertion shows each node's log tail (a node that fails early leaves the other waiting at the rendezvous)."""
    import subprocess
    import time

    children = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as sink:
            children.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sink, cwd=log.parent))
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and any(c.poll() is None for c in children):
        if any(c.returncode not in (None, 0) for c in children):
            break
        time.sleep(0.5)
    for child in children:
        if child.poll() is None:
            child.kill()  # its torchrun and ranks follow it (die_with_parent)
        child.wait()
    report = "\n".join(f"--- node {n} (exit {c.returncode}) ---\n{log.read_text()[-3000:]}"
                       for n, (c, log) in enumerate(zip(children, logs, strict=True)))
    assert all(c.returncode == 0 for c in children), report


def test_two_nodes_on_one_machine(one_rank, tiny_model_dir, tmp_path):
    """nnodes: 2 with one rank each, as two Prefect workers would run it (each its own store and node_rank):
    torchrun gets --nnodes/--node_rank/--master_addr/--master_port, and each node publishes the same weights."""
    import os
    import sys

    _, (single, single_losses) = one_rank
    port = free_port()  # below the ephemeral range: nothing takes it before node 0 listens on it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logged = "import logging; logging.basicConfig(level=logging.INFO)" + CHILD  # the ranks' output, forwarded
    commands, stores = [], []
    for node in (0, 1):
        values = tiny_recipe_values(tiny_model_dir, max_steps=6, logging_steps=1, save_steps=100, learning_rate=5e-3,
                                    finetuning_type="full", per_device_train_batch_size=2, nproc_per_node=1,
                                    nnodes=2, node_rank=node, master_addr="127.0.0.1", master_port=port)
        stores.append(tmp_path / f"node{node}")
        commands.append([sys.executable, "-c", logged, json.dumps(values), str(stores[-1])])
    run_nodes(commands, [tmp_path / "node0.log", tmp_path / "node1.log"], env, deadline_s=300)
    theirs = load_file(str(single.part("model") / "model.safetensors"))
    for store in stores:
        (folder,) = [p for p in (store / "train").iterdir() if not p.name.startswith(".")]
        history = json.loads((folder / "log_history.json").read_text())
        losses = [e["loss"] for e in history if "loss" in e]
        assert max(abs(a - b) for a, b in zip(losses, single_losses, strict=True)) < TOLERANCE
        ours = load_file(str(folder / "model" / "model.safetensors"))
        assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-3
        assert json.loads((folder / "train_results.json").read_text())["world_size"] == 2
