"""What an unchanged re-run costs when the model is big: planning a multi-GB model folder, and checking a
multi-GB artifact, with the file-status caches and with full verification.

Makes a model folder of --gb gigabytes (the bundled model's config and tokenizer, and a weights file of
that size: planning reads the folder's bytes, not its tensors), then times:
- planning the demo recipe on it (`plan_run`, as every run does first) reading every byte, then again
  with digests taken by file status; and the whole `tunefactory run --dry-run` command;
- a cache-hit check of an artifact holding the same weights (`ArtifactStore.lookup`: status) against
  `tunefactory verify` (every byte);
- with --demo-home STORE, a real no-op `tunefactory run` of the demo recipe on a store where it ran.

    python bench/noop_rerun.py [--gb 4] [--work ~/.cache/tunefactory-bench] [--demo-home artifacts]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLI = str(Path(sys.executable).with_name("tunefactory"))
DEMO = REPO / "configs" / "recipes" / "demo_sft_lora.yaml"


def big_model(work: Path, gigabytes: float) -> Path:
    """A model folder whose weights file has the given size (made once)."""
    from bench.vs_llamafactory import import_model

    small = import_model(work)
    folder = work / f"model-{gigabytes:g}gb"
    weights = folder / "model.safetensors"
    size = int(gigabytes * 2**30)
    if not weights.exists() or weights.stat().st_size != size:
        folder.mkdir(parents=True, exist_ok=True)
        for item in small.iterdir():
            if item.name != "model.safetensors":
                shutil.copy(item, folder / item.name)
        block = os.urandom(2**24)
        with weights.open("wb") as handle:
            for _ in range(size // len(block)):
                handle.write(block)
        old = time.time() - 3600  # an old file, as a downloaded model is
        os.utime(weights, (old, old))
    return folder


def seconds(command: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "tunefactory-bench")
    parser.add_argument("--demo-home", type=Path, help="a store where the demo recipe ran: time its no-op re-run")
    args = parser.parse_args()
    from tasks.core.stage import Built, RunContext, Stage, StageConfig, execute
    from tasks.core.store import ArtifactStore

    folder = big_model(args.work, args.gb)
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} python={platform.python_version()}  "
          f"date: {time.strftime('%Y-%m-%d')}  model folder: {args.gb:g} GB")
    scratch = Path(tempfile.mkdtemp(prefix="tunefactory-noop-"))
    env = {"TUNEFACTORY_CACHE_DIR": str(scratch / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'm.db'}"}
    os.environ.update(env)
    from flows.plan import plan_run
    from tasks.core.digest_cache import verifying
    from tasks.core.recipe import load_recipe

    recipe = load_recipe(DEMO, [f"model_name_or_path={folder}"])
    with verifying():
        start = time.monotonic()
        plan_run(recipe, ArtifactStore(scratch / "store"))
        cold = time.monotonic() - start
    start = time.monotonic()
    plan_run(recipe, ArtifactStore(scratch / "store"))
    warm = time.monotonic() - start
    dry = seconds([CLI, "run", "--dry-run", str(DEMO), "--home", str(scratch / "store"),
                   "--set", f"model_name_or_path={folder}"], env)
    print(f"planning, every byte read:          {cold:6.2f} s")
    print(f"planning, digests by file status:   {warm:6.2f} s")
    print(f"whole dry-run command:              {dry:6.1f} s   (interpreter, imports, planning)")

    class Copy(StageConfig):
        size: int

    def copy_weights(config, ctx, out):
        shutil.copy(folder / "model.safetensors", out / "model.safetensors")
        return Built("full_weights", {"model": "model.safetensors"})

    stage = Stage(name="weights", plan=None, build=copy_weights, code=("tasks.core.store",), libraries=())
    ref = execute(stage.step("weights", Copy(size=folder.stat().st_size)), {}, RunContext(home=str(scratch / "store")))
    store = ArtifactStore(scratch / "store")
    start = time.monotonic()
    assert store.lookup(ref.stage, ref.key) is not None
    hit = time.monotonic() - start
    full = seconds([CLI, "verify", "--home", str(scratch / "store")], env)
    print(f"cache hit of a {args.gb:g} GB artifact:     {hit:6.3f} s   (sizes and mtimes)")
    print(f"tunefactory verify of it:           {full:6.1f} s   (every byte; the command as a whole)")
    if args.demo_home:
        rerun = seconds([CLI, "run", str(DEMO), "--home", str(args.demo_home)], {})
        print(f"no-op re-run of the demo:           {rerun:6.1f} s")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
