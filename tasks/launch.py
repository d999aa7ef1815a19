"""Training on more than one rank (or under DeepSpeed/FSDP): the train task launches `torchrun` and collects the
artifact.

The stage's own build function runs in every rank, unchanged: the parent pickles what the build needs (its
config, input artifacts, store root, MLflow run) into the staging folder, `torchrun` starts
`python -m tasks.launch <request>` per rank, and each rank rebuilds the build context and calls the build.
Local rank 0 of each node writes the artifact into the folder its parent publishes (every node's store gets
the same weights); only global rank 0 reports to MLflow. The parent forwards the ranks' output to its log,
stops them when the run is interrupted, and resumes as a one-process run does: checkpoints go to the same
staging folder.

Several machines: run the same recipe on each (one Prefect worker per node), with the same `nnodes`,
`master_addr` and `master_port` and each its own `node_rank`.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from tasks.core.errors import TuneFactoryError
from tasks.core.ports import free_port
from tasks.core.stage import BuildContext, Built, RunContext, Step, check_stop, seed_everything
from tasks.core.store import ArtifactStore

IN_RANK = "TUNEFACTORY_IN_RANK"  # set in the ranks' environment: their build trains in-process
REQUEST, RESULT = "launch-request.pkl", "launch-built.pkl"
ERROR_LINE = re.compile(r"^(\[rank ?(\d+)\]:? )?(\w+\.)*\w*(Error|Exception)\b")
ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")  # in torchrun's "Root Cause (first observed failure)"


def needs_ranks(config) -> bool:
    """Whether a training config runs under torchrun: several ranks, or DeepSpeed/FSDP (which need a process group)."""
    launch = config.launch
    return launch.world_size > 1 or launch.deepspeed is not None or launch.fsdp is not None


def in_rank() -> bool:
    return os.environ.get(IN_RANK) == "1"


def torchrun_command(config, request: Path) -> list[str]:
    """The launcher's command line for this node."""
    port = config.master_port or free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={config.nproc_per_node}",
            f"--nnodes={config.nnodes}", f"--node_rank={config.node_rank}", f"--master_addr={config.master_addr}",
            f"--master_port={port}", "-m", "tasks.launch", str(request)]


def rank_environment() -> dict[str, str]:
    """The ranks' environment: this one, with the worktree importable, DeepSpeed on CPU where there is no GPU."""
    from tasks.core.hardware import has_cuda

    env = {**os.environ, IN_RANK: "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def launch_ranks(config, ctx: BuildContext, out: Path) -> Built | None:
    """Run this build over torchrun's ranks if the config asks for them; None means: train in this process."""
    if in_rank() or not needs_ranks(config):
        return None
    from tasks.train_common import resume_point

    resume_point(config, ctx)  # drops torn checkpoints here, once, before the ranks look for the newest one
    folder = Path(tempfile.mkdtemp(prefix="launch-", dir=ctx.staging))
    request = folder / REQUEST
    payload = {"module": ctx.step.stage.build.__module__, "label": ctx.step.label, "config": config,
               "inputs": ctx.inputs, "input_labels": ctx.step.inputs, "locators": ctx.locators, "key": ctx.key,
               "home": str(ctx.store.root), "run": ctx.run, "out": str(out), "result": str(folder / RESULT)}
    request.write_bytes(pickle.dumps(payload))
    command = torchrun_command(config, request)
    ctx.log.info("launching %d rank(s) on this node of %d: %s", config.nproc_per_node, config.nnodes,
                 " ".join(command[1:]))
    try:
        run_forwarding(command, rank_environment(), ctx.log)
        if not (folder / RESULT).is_file():
            raise TuneFactoryError(f"training on {config.launch.world_size} ranks ended without an artifact; "
                                   "see the log above")
        return pickle.loads((folder / RESULT).read_bytes())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def die_with_parent(signal_number: int) -> None:
    """Ask Linux to send this process a signal when its parent dies (a killed worker takes its ranks along)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal_number)  # PR_SET_PDEATHSIG


def run_forwarding(command: list[str], env: dict[str, str], log) -> None:
    """Run the launcher, its output line by line into the stage's log; stop it if the run is interrupted."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    errors = RankErrors()
    lines: queue.Queue[str | None] = queue.Queue()  # read on a thread: a stop is seen within a second even while
    threading.Thread(target=pump, args=(child.stdout, lines), daemon=True).start()  # the ranks print nothing
    try:
        while True:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                check_stop()
                continue
            if line is None:
                break
            if line := line.rstrip():
                log.info("%s", line)
                errors.read(line)
            check_stop()
        code = child.wait()
    except BaseException:
        child.terminate()  # torchrun passes SIGTERM on to its ranks
        child.wait()
        raise
    if code != 0:
        raise TuneFactoryError(f"training ranks failed (torchrun exit {code}): {errors.cause() or 'see the log'}")


def pump(stream, lines: queue.Queue) -> None:
    """Every line of the stream into the queue, then None."""
    for line in stream:
        lines.put(line)
    lines.put(None)


class RankErrors:
    """The one-line cause of a failed launch, read from its output: the exception the failing rank printed. When
    one rank dies the others fail after it (a closed connection), so the rank torchrun names as the root cause
    is believed, else the first exception printed."""

    def __init__(self):
        self.last_by_rank: dict[str | None, str] = {}  # each rank's last exception line (its traceback's end)
        self.first, self.root_rank, self.in_root_cause = "", None, False

    def read(self, line: str) -> None:
        error = ERROR_LINE.search(line)
        if error and "ChildFailedError" not in line:
            self.last_by_rank[error.group(2)] = line
            self.first = self.first or line
        if line.startswith("Root Cause"):
            self.in_root_cause = True
        elif self.in_root_cause and self.root_rank is None and (rank := ROOT_CAUSE_RANK.match(line)):
            self.root_rank = rank.group(1)

    def cause(self) -> str:
        """The root-cause rank's exception; a rank that failed before the process group started prints without
        its [rankN] prefix, so then the last unprefixed one; else the first printed."""
        if self.root_rank is not None:
            return self.last_by_rank.get(self.root_rank) or self.last_by_rank.get(None) or self.first
        return self.first


def zero3_loading(config, ctx: BuildContext):
    """Under ZeRO-3, the Trainer's arguments made (and the process group started) before the model loads:
    transformers then loads each weight straight into its partition (deepspeed.zero.Init) rather than a whole
    copy per rank. Returns what must stay referenced meanwhile (transformers holds its DeepSpeed config weakly)."""
    deepspeed = config.launch.deepspeed
    if not deepspeed or int(deepspeed.get("zero_optimization", {}).get("stage", 0)) != 3:
        return None
    from transformers import TrainingArguments

    from tasks.train_common import arguments_values

    arguments = TrainingArguments(**arguments_values(config, ctx.staging))
    arguments.device  # noqa: B018 (starts the process group)
    import deepspeed

    deepspeed.init_distributed()  # DeepSpeed's own view of it, which zero.Init counts the ranks with
    return arguments


def rank_main(request: Path) -> None:
    """One rank: rebuild the build's context from the request and run the stage's build in this process."""
    import importlib

    die_with_parent(signal.SIGKILL)  # torchrun starts ranks in their own sessions: go when it goes
    payload: dict[str, Any] = pickle.loads(request.read_bytes())
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    stage = importlib.import_module(payload["module"]).STAGE
    step = Step(stage, payload["label"], payload["config"], payload["input_labels"], payload["locators"])
    run: RunContext = payload["run"]
    if rank != 0:
        run = RunContext(home=run.home, mlflow_run_id=None)  # one rank reports
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(message)s")
    ctx = BuildContext(step, payload["key"], ArtifactStore(payload["home"]), payload["inputs"], run,
                       logging.getLogger("tunefactory"))
    writer = local_rank == 0
    out = Path(payload["out"]) if writer else Path(tempfile.mkdtemp(prefix=f"rank{rank}-"))
    seed_everything(step.config.rng_seed)
    zero3 = zero3_loading(step.config, ctx)  # alive while the build loads the model: it loads partitioned
    try:
        built = stage.build(step.config, ctx, out)
        if writer:
            Path(payload["result"]).write_bytes(pickle.dumps(built))
    finally:
        del zero3
        if not writer:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
