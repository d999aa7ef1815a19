"""output_dir / export_dir: TuneFactory replaces only what it wrote there; a user's files are never touched."""

import json

import pytest

from flows.user_output import MARKER, check_target, write_into
from tasks.core.errors import RecipeError


def artifact(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_a_rerun_replaces_only_its_own_files(tmp_path):
    target = tmp_path / "export"
    write_into(artifact(tmp_path / "a", {"model.safetensors": "v1", "old.json": "x"}), target, "merge/a", "export_dir")
    (target / "NOTES.txt").write_text("my notes")  # the user adds a file after the first run
    check_target("export_dir", target, overwrite=False)  # a folder we wrote: the user's additions are kept
    write_into(artifact(tmp_path / "b", {"model.safetensors": "v2", "sub/new.json": "y"}), target, "merge/b",
               "export_dir")
    assert (target / "model.safetensors").read_text() == "v2" and (target / "sub" / "new.json").read_text() == "y"
    assert not (target / "old.json").exists()  # ours, no longer produced
    assert (target / "NOTES.txt").read_text() == "my notes"
    assert json.loads((target / MARKER).read_text()) == {"artifact": "merge/b", "complete": True,
                                                        "files": ["model.safetensors", "sub/new.json"]}


def test_a_folder_of_the_users_files_needs_overwrite_and_keeps_them(tmp_path):
    target = artifact(tmp_path / "saves", {"NOTES.txt": "mine"})
    with pytest.raises(RecipeError, match=r"holds files TuneFactory did not write \(NOTES.txt\)"):
        check_target("output_dir", target, overwrite=False)
    check_target("output_dir", target, overwrite=True)
    write_into(artifact(tmp_path / "a", {"adapter_config.json": "{}"}), target, "train/a", "output_dir")
    assert (target / "NOTES.txt").read_text() == "mine" and (target / "adapter_config.json").exists()


def test_a_users_file_named_like_our_record_is_theirs(tmp_path):
    target = artifact(tmp_path / "saves", {MARKER: "the user's own notes"})
    with pytest.raises(RecipeError, match=f"holds files TuneFactory did not write \\({MARKER}\\)"):
        check_target("output_dir", target, overwrite=False)
    with pytest.raises(RecipeError, match=f"already holds {MARKER}"):
        write_into(artifact(tmp_path / "a", {"adapter_config.json": "{}"}), target, "train/a", "output_dir")
    assert (target / MARKER).read_text() == "the user's own notes"


def test_a_users_file_with_one_of_our_names_is_never_replaced(tmp_path):
    target = artifact(tmp_path / "saves", {"adapter_config.json": "the user's"})
    with pytest.raises(RecipeError, match="already holds adapter_config.json, which TuneFactory did not write"):
        write_into(artifact(tmp_path / "a", {"adapter_config.json": "{}"}), target, "train/a", "output_dir")
    assert (target / "adapter_config.json").read_text() == "the user's"


def test_targets_that_are_not_folders_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeError, match="is a file, not a folder"):
        check_target("output_dir", tmp_path / "file", overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match="symlink to nothing"):
        check_target("export_dir", tmp_path / "link", overwrite=True)


def test_a_copy_cut_short_leaves_a_folder_the_next_run_can_write(tmp_path, monkeypatch):
    """Interrupted after two files, the folder held new files and the old record: the next run refused them as the
    user's, even with overwrite_output_dir, and old and new weights could be mixed."""
    import shutil

    target = tmp_path / "export"
    write_into(artifact(tmp_path / "a", {"model.safetensors": "v1", "config.json": "c1"}), target, "merge/a",
               "export_dir")
    new = artifact(tmp_path / "b", {"config.json": "c2", "pytorch_model.bin": "v2", "tokenizer.json": "t2"})
    copies = []
    real_copy = shutil.copyfile

    def copy_then_interrupt(source, destination):
        if len(copies) == 2:
            raise KeyboardInterrupt
        copies.append(destination)
        return real_copy(source, destination)

    monkeypatch.setattr(shutil, "copyfile", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_into(new, target, "merge/b", "export_dir")
    assert (target / "pytorch_model.bin").exists() and not json.loads((target / MARKER).read_text())["complete"]
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    check_target("export_dir", target, overwrite=False)  # ours, not the user's
    write_into(new, target, "merge/b", "export_dir")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "pytorch_model.bin", "tokenizer.json", MARKER]
