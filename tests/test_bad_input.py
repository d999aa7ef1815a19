"""Bad input: one line naming the key / file / row / field, exit 1, no traceback, nothing published."""

import json
import shutil
import subprocess
import sys

import pytest

from flows.cli import main
from tests.conftest import BUNDLED_DATA


@pytest.fixture
def dataset_dir(workdir):
    """A user dataset_dir holding a copy of the bundled training file under the name `mine`."""
    folder = workdir / "data"
    folder.mkdir()
    shutil.copy(BUNDLED_DATA / "pydoc_summaries_train.jsonl", folder / "mine.jsonl")
    (folder / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))
    return folder


def run_cli(capsys, recipe) -> tuple[int, str]:
    code = main(["run", str(recipe)])
    return code, capsys.readouterr().err.strip()


def assert_nothing_published(workdir):
    store = workdir / "artifacts"
    # <stage>/<key> folders; the store's own dot-folders (.locks, .staging) and temp dirs are not artifacts
    published = [p for p in store.glob("*/*") if not any(part.startswith(".") for part in p.relative_to(store).parts)]
    assert published == []


def test_unknown_recipe_key(capsys, write_recipe, workdir):
    code, err = run_cli(capsys, write_recipe(lora_rnk=4))
    assert code == 1 and err == (
        f"tunefactory: error: {workdir / 'recipe.yaml'}: unknown key 'lora_rnk'; did you mean 'lora_rank'?"
    )
    assert_nothing_published(workdir)


def test_wrong_type(capsys, write_recipe, workdir):
    code, err = run_cli(capsys, write_recipe(cutoff_len="long"))
    assert code == 1 and "key 'cutoff_len'" in err and "integer" in err and "\n" not in err


def test_missing_dataset_file(capsys, write_recipe, dataset_dir, workdir):
    (dataset_dir / "mine.jsonl").unlink()
    code, err = run_cli(capsys, write_recipe(dataset="mine", dataset_dir=str(dataset_dir)))
    assert code == 1 and err == f"tunefactory: error: dataset 'mine': file not found: {dataset_dir / 'mine.jsonl'}"
    assert_nothing_published(workdir)


def test_unknown_dataset_name(capsys, write_recipe, dataset_dir):
    code, err = run_cli(capsys, write_recipe(dataset="mne", dataset_dir=str(dataset_dir)))
    assert code == 1 and "key 'dataset': dataset 'mne' is not in" in err and "mine" in err


def test_malformed_json_row(capsys, write_recipe, dataset_dir, workdir):
    path = dataset_dir / "mine.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:-1]  # drop the closing brace of the 7th row
    path.write_text("\n".join(lines) + "\n")
    code, err = run_cli(capsys, write_recipe(dataset="mine", dataset_dir=str(dataset_dir)))
    assert code == 1 and err.startswith(f"tunefactory: error: {path}, line 7: malformed JSON row")
    assert_nothing_published(workdir)


def test_missing_column(capsys, write_recipe, dataset_dir, workdir):
    (dataset_dir / "dataset_info.json").write_text(
        json.dumps({"mine": {"file_name": "mine.jsonl", "columns": {"prompt": "instruction", "response": "answer"}}})
    )
    code, err = run_cli(capsys, write_recipe(dataset="mine", dataset_dir=str(dataset_dir)))
    assert code == 1 and "column 'answer' (the 'response' field) not found" in err and "mine.jsonl" in err
    assert list((workdir / "artifacts").glob("align/*")) == []  # fetch may be published; align is not


def test_empty_field_names_row(capsys, write_recipe, dataset_dir):
    path = dataset_dir / "mine.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[4]["output"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = run_cli(capsys, write_recipe(dataset="mine", dataset_dir=str(dataset_dir)))
    assert code == 1 and err.endswith("row 4: field 'output' (response) is empty") and "mine.jsonl" in err


def test_cli_prints_no_traceback(write_recipe, workdir):
    recipe = write_recipe(lora_rnk=4)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(recipe)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and done.stderr.strip().endswith("did you mean 'lora_rank'?")
