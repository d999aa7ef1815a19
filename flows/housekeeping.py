"""Store housekeeping: list recent runs with each stage's outcome, and collect artifacts nothing needs.

`gc` keeps every artifact reachable from the last N runs in MLflow of each flow that uses the store
(finetune, export, data preview) or from any registered
model version (and, through manifests, everything each was made from), deletes the rest, and never
touches an artifact whose key a running build holds the lock on. What to keep comes from the tracking
store and what to delete from the artifact store, two places set apart (MLFLOW_TRACKING_URI or the working
directory's mlflow.db; --home or TUNEFACTORY_HOME): when the runs it reads used none of the store's
artifacts, the two do not belong together and gc deletes nothing unless forced.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from filelock import Timeout

from tasks.core import model_registry, tracking
from tasks.core.errors import TuneFactoryError
from tasks.core.store import STAGING, TEMP_PREFIX, TRASH_PREFIX, ArtifactStore, read_manifest


def recent_runs(last: int) -> str:
    """A listing of recent runs of the flows that use the store: when, flow, name, status, and each stage's
    outcome and key."""
    if (missing := tracking.missing_database()) is not None:
        return f"no runs: no MLflow store at {missing} (run it where mlflow.db is, or set MLFLOW_TRACKING_URI)"
    client = tracking.client()
    lines = []
    for run in tracking.newest_runs(last, tracking.STORE_FLOWS):
        started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
        experiment = client.get_experiment(run.info.experiment_id).name
        lines.append(f"{started}  {run.data.tags['tunefactory.flow']}  {run.info.run_name}  "
                     f"{run.info.status.lower()}  experiment '{experiment}'  run {run.info.run_id}")
        for stage in tracking.stage_runs(run):
            tags = stage.data.tags
            status = stage.info.status.lower()  # a build that started (cache: miss) may have failed
            outcome = status if status != "finished" else {"hit": "cached", "miss": "built"}.get(tags.get("cache"),
                                                                                                  status)
            lines.append(f"    {stage.info.run_name:<28} {outcome:<9} {tags.get('artifact_key', '-')[:12]}")
    return "\n".join(lines) if lines else f"no runs in {tracking.tracking_uri()}"


def roots(store: ArtifactStore, keep_last: int, dry_run: bool = False) -> set[str]:
    """Artifact ids ("stage/key") that runs, builds running now and registered models point at directly."""
    ids = store.read_by_builds(prune=not dry_run)  # inputs of builds running now (a run tags them once done)
    # Each flow's runs on this store back to its N-th finished one (a row of previews must not push the last
    # fine-tune's artifacts out; failed runs and runs on another store sharing the tracking store do not count, but
    # what failed runs since built is kept for their re-run), and every run still going, however many ran since.
    runs = [run for flow in tracking.STORE_FLOWS for run in tracking.runs_back_to_finished(keep_last, flow,
                                                                                           str(store.root))]
    for run in runs + tracking.running_runs(tracking.STORE_FLOWS):
        for stage in tracking.stage_runs(run):
            key = stage.data.tags.get("artifact_key")
            if key:
                ids.add(f"{stage.data.tags.get('stage', stage.info.run_name.split('[')[0])}/{key}")
    for version in model_registry.all_versions():
        ids |= {f"{name.removeprefix('artifact.')}/{key}" for name, key in version.tags.items()
                if name.startswith("artifact.")}
        source = Path(version.source.removeprefix("file://"))
        if source.parent.parent.parent == store.root:  # <root>/<stage>/<key>/model
            ids.add(f"{source.parent.parent.name}/{source.parent.name}")
    return ids


def reachable(store: ArtifactStore, ids: set[str]) -> set[str]:
    """ids and everything they were made from, following each manifest's inputs."""
    seen, pending = set(), list(ids)
    while pending:
        artifact_id = pending.pop()
        if artifact_id in seen:
            continue
        seen.add(artifact_id)
        manifest = read_manifest(store.root / artifact_id)
        pending += [entry["id"] for entry in (manifest or {}).get("inputs", {}).values()]
    return seen


@dataclass
class Collected:
    removed: list[str] = field(default_factory=list)
    kept: int = 0
    in_use: list[str] = field(default_factory=list)  # locked by a running build
    bytes_freed: int = 0
    staged_kept: list[str] = field(default_factory=list)  # interrupted builds' checkpoints, kept to resume from
    staged_bytes: int = 0

    def summary(self, dry_run: bool) -> str:
        verb = "would free" if dry_run else "freed"
        line = (f"{verb} {self.bytes_freed / 2**20:.1f} MiB in {plural(len(self.removed), 'folder')}; "
                f"kept {plural(self.kept, 'artifact')}"
                + (f"; {len(self.in_use)} in use by a running build" if self.in_use else ""))
        if self.staged_kept:
            line += (f"; kept {self.staged_bytes / 2**20:.1f} MiB of checkpoints of "
                     f"{plural(len(self.staged_kept), 'interrupted build')} for a re-run to resume from (--staging "
                     "deletes them)")
        return line


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def collect_staging(store: ArtifactStore, result: Collected, dry_run: bool, every: bool) -> None:
    """Staged checkpoints (.staging/<stage>/<key>) of builds not running now: deleted when their artifact was
    published since (leftovers) or, with `every`, all of them; otherwise counted as kept for a resume."""
    staging_root = store.root / STAGING
    for folder in sorted(staging_root.glob("*/*")) if staging_root.is_dir() else []:
        if not folder.is_dir():
            continue
        stage, key = folder.parent.name, folder.name
        try:
            with store.lock(stage, key).acquire(timeout=0):
                size = size_of(folder)
                if every or store.lookup(stage, key) is not None:
                    result.removed.append(f"{STAGING}/{stage}/{key}")
                    result.bytes_freed += size
                    if not dry_run:
                        shutil.rmtree(folder, ignore_errors=True)
                else:
                    result.staged_kept.append(f"{stage}/{key}")
                    result.staged_bytes += size
        except Timeout:
            result.in_use.append(f"{STAGING}/{stage}/{key}")


def collect_garbage(store: ArtifactStore, keep_last: int, dry_run: bool, force: bool = False,
                    staging: bool = False) -> Collected:
    """Delete artifacts (and leftover temporaries) not reachable from the last runs or registered models, and
    staged checkpoints whose build finished (`staging`: every staged checkpoint not in use)."""
    if not store.root.is_dir():
        raise TuneFactoryError(f"tunefactory gc: no artifact store at {store.root} (--home or TUNEFACTORY_HOME)")
    uri = tracking.tracking_uri()
    if (database := tracking.missing_database()) is not None and not force:
        raise TuneFactoryError(f"tunefactory gc: no MLflow store at {database}, so no run says what to keep; run it "
                               "where the runs' mlflow.db is, or set MLFLOW_TRACKING_URI (--force deletes all)")
    artifacts = list(store.artifacts())
    keep = reachable(store, roots(store, keep_last, dry_run))
    if artifacts and not force and not keep & {a.ref.id for a in artifacts}:
        readers = "registered models (--keep-last 0 reads no runs)" if keep_last == 0 else "runs or models"
        raise TuneFactoryError(f"tunefactory gc: none of the {readers} in {uri} used an artifact of "
                               f"{store.root}, so it would delete all {len(artifacts)}; is that the tracking "
                               "store these runs logged to? (--force deletes them)")
    result = Collected()
    for artifact in artifacts:
        artifact_id = artifact.ref.id
        if artifact_id in keep:
            result.kept += 1
            continue
        try:
            with store.lock(artifact.ref.stage, artifact.ref.key).acquire(timeout=0):
                result.removed.append(artifact_id)
                result.bytes_freed += size_of(artifact.path)
                if not dry_run:  # out of the way atomically, then deleted
                    trash = artifact.path.with_name(f"{TRASH_PREFIX}{artifact.ref.key[:16]}-{uuid.uuid4().hex[:8]}")
                    artifact.path.rename(trash)
                    shutil.rmtree(trash, ignore_errors=True)
        except Timeout:
            result.in_use.append(artifact_id)
    for folder in store.unpublished():  # damaged (verify set its manifest aside) or torn: a run rebuilds it anyway
        try:
            with store.lock(folder.parent.name, folder.name).acquire(timeout=0):
                if read_manifest(folder) is not None:  # a build of the key published it since it was listed
                    continue
                result.removed.append(f"{folder.parent.name}/{folder.name} (damaged)")
                result.bytes_freed += size_of(folder)
                if not dry_run:
                    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name[:16]}-{uuid.uuid4().hex[:8]}")
                    folder.rename(trash)
                    shutil.rmtree(trash, ignore_errors=True)
        except Timeout:
            result.in_use.append(f"{folder.parent.name}/{folder.name}")
    if not dry_run:
        for stage_dir in [p for p in store.root.iterdir() if p.is_dir() and not p.name.startswith(".")]:
            for leftover in stage_dir.glob(f"{TEMP_PREFIX}*"):
                key = leftover.name.removeprefix(TEMP_PREFIX).rsplit("-", 1)[0]
                try:
                    with store.lock(stage_dir.name, key).acquire(timeout=0):
                        shutil.rmtree(leftover, ignore_errors=True)
                except Timeout:
                    pass
    collect_staging(store, result, dry_run, staging)
    return result
