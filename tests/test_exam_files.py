"""Exam files as MMLU, C-Eval and CMMLU release them, checked in full before a model loads: a bad file is named with
its row and field, and what cannot be scored (blank answers, no questions) is refused rather than scored as 0%."""

import csv
import json
import shutil

import pytest

from tasks.core.errors import DataError
from tasks.core.recipe import Recipe
from tasks.exam import BUNDLED, artifact_key, score
from tasks.exam_files import hub_exam, read_local_exam, support_questions
from tests.conftest import tiny_recipe_values

ROW = ["What is 2 + 2?", "3", "4", "5", "22", "B"]


def write_csv(path, rows, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding=encoding) as handle:
        csv.writer(handle).writerows(rows)


def test_mmlu_ceval_and_cmmlu_layouts_read_as_released(tmp_path):
    mmlu = tmp_path / "mmlu"  # headerless rows under data/, as MMLU's archive unpacks
    for split in ("dev", "test"):
        write_csv(mmlu / "data" / split / f"algebra_{split}.csv", [ROW, ["Line one\nline two?", *ROW[1:5], " C "]])
    exam = read_local_exam(mmlu, "test")
    assert exam.mapping == {"algebra": {"name": "algebra", "category": None}}  # no mapping.json: the files
    assert [q["answer"] for q in exam.scored["algebra"]] == ["B", "C"]
    assert exam.scored["algebra"][1]["question"] == "Line one\nline two?"

    ceval = tmp_path / "ceval"  # a header with id (and explanation on dev); test withholds its answers
    write_csv(ceval / "dev" / "law_dev.csv", [["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                                              ["0", *ROW, "because"]])
    write_csv(ceval / "val" / "law_val.csv", [["id", "question", "A", "B", "C", "D", "answer"], ["0", *ROW]])
    write_csv(ceval / "test" / "law_test.csv", [["id", "question", "A", "B", "C", "D"], ["0", *ROW[:5]]])
    assert read_local_exam(ceval, "val").scored["law"] == [dict(zip(("question", "A", "B", "C", "D", "answer"), ROW,
                                                                    strict=True))]
    with pytest.raises(DataError, match=r"law_test.csv: every answer is blank.*ceval_validation"):
        read_local_exam(ceval, "test")

    cmmlu = tmp_path / "cmmlu"  # an index column, Question/Answer capitalised, files named by subject alone
    for split in ("dev", "test"):
        write_csv(cmmlu / split / "anatomy.csv", [["", "Question", "A", "B", "C", "D", "Answer"], ["0", *ROW]])
    (cmmlu / "mapping.json").write_text(json.dumps({"anatomy": {"name": "解剖学", "category": "医学"}}),
                                        encoding="utf-8")
    exam = read_local_exam(cmmlu, "test")
    assert exam.mapping["anatomy"]["category"] == "医学" and exam.scored["anatomy"][0]["answer"] == "B"


@pytest.mark.parametrize(("answer", "message"), [
    ("", r"question 2 has a blank answer \(1 in all\)"),
    ("AB", r"row 2, field 'answer': 'AB' is not one of A, B, C, D"),
    ("E", r"row 2, field 'answer': 'E' is not one of A, B, C, D"),
])
def test_an_answer_that_is_not_one_letter_is_refused(tmp_path, answer, message):
    """A substring test let "" and "AB" through: no prediction could ever match them."""
    write_csv(tmp_path / "x" / "test" / "s_test.csv", [ROW, [*ROW[:5], answer]])
    write_csv(tmp_path / "x" / "dev" / "s_dev.csv", [ROW])
    with pytest.raises(DataError, match=r"s_test.csv" + (", " if answer else ": ") + message):
        read_local_exam(tmp_path / "x", "test")


def test_malformed_files_are_named_with_their_subject_and_field(tmp_path):
    exam = tmp_path / "pystdlib"
    shutil.copytree(BUNDLED / "pystdlib", exam)
    mapping = json.loads((exam / "mapping.json").read_text())
    del mapping["numeric"]["category"]
    (exam / "mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(DataError, match=r"mapping.json, subject 'numeric', field 'category': expected a non-empty"):
        read_local_exam(exam, "test")
    (exam / "mapping.json").write_text('{"numeric": {name: 1}}')
    with pytest.raises(DataError, match=r"mapping.json: not JSON \(Expecting property name .* line 1, column 14\)"):
        read_local_exam(exam, "test")
    mapping["numeric"]["category"] = "Average"
    (exam / "mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(DataError, match=r"category': 'Average' is the name of the exam's own total"):
        read_local_exam(exam, "test")
    mapping["numeric"]["category"] = "Numbers"
    (exam / "mapping.json").write_text(json.dumps(mapping))
    write_csv(exam / "test" / "numeric_test.csv", [["Qu'est-ce que é?", *ROW[1:]]], encoding="latin-1")
    with pytest.raises(DataError, match=r"numeric_test.csv: not UTF-8 text \(byte 14 is 0xe9\)"):
        read_local_exam(exam, "test")
    write_csv(exam / "test" / "numeric_test.csv", [])
    with pytest.raises(DataError, match=r"numeric_test.csv: no questions to score"):
        read_local_exam(exam, "test")


def test_a_bad_exam_file_fails_the_plan_before_any_stage_runs(tiny_model_dir, tmp_path):
    from flows.plan import plan_run

    shutil.copytree(BUNDLED / "pystdlib", tmp_path / "pystdlib")
    write_csv(tmp_path / "pystdlib" / "test" / "text_processing_test.csv", [ROW, [*ROW[:5], "b?"]])
    recipe = Recipe.from_flat(tiny_recipe_values(tiny_model_dir, task="pystdlib_test", task_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"text_processing_test.csv, row 2, field 'answer': 'b\?'"):
        plan_run(recipe)


def test_scoring_the_dev_split_never_shows_a_question_its_own_answer():
    dev = [{"question": f"q{i}"} for i in range(5)]
    assert support_questions(dev, 0, 5, scoring_dev=True) == dev[1:]
    assert support_questions(dev, 3, 2, scoring_dev=True) == dev[:2]
    assert support_questions(dev, 1, 2, scoring_dev=True) == [dev[0], dev[2]]
    assert support_questions(dev, 0, 2, scoring_dev=False) == dev[:2]


def test_subjects_without_a_category_count_in_the_average_alone():
    mapping = {"a": {"name": "a", "category": "X"}, "b": {"name": "b", "category": None}}
    scores = score(mapping, {"a": ["A", "B"], "b": ["C"]}, {"a": ["A", "A"], "b": ["C"]})
    assert scores == {"subjects": {"a": 50.0, "b": 100.0}, "categories": {"X": 50.0}, "average": 66.67,
                      "questions": 3}


def test_artifact_keys_are_what_prefect_accepts():
    from prefect.artifacts import MarkdownArtifact

    assert artifact_key("PyStd.Lib", "base") == "exam-pystd-lib-base"
    MarkdownArtifact(key=artifact_key("C-Eval_2 (zh)", "tuned"), markdown="x")  # validates the key


def hub_repo(path, train_answers, test_answers):
    """A local folder laid out as a hub exam repo: one subject `s`, its dev split as `train`."""
    import datasets

    path.mkdir()
    questions = {"question": ["q1", "q2"], "A": ["1", "2"], "B": ["3", "4"], "C": ["5", "6"], "D": ["7", "8"]}
    datasets.Dataset.from_dict({**questions, "answer": train_answers}).to_parquet(path / "s-train.parquet")
    datasets.Dataset.from_dict({**questions, "answer": test_answers}).to_parquet(path / "s-test.parquet")
    (path / "README.md").write_text("---\nconfigs:\n- config_name: s\n  data_files:\n"
                                    "  - {split: train, path: s-train.parquet}\n"
                                    "  - {split: test, path: s-test.parquet}\n---\n")
    (path / "mapping.json").write_text(json.dumps({"s": {"name": "s", "category": "S"}}))
    return f"hub:{path}@0123abc"


def test_a_hub_exam_is_checked_as_a_local_one(tmp_path, monkeypatch):
    """Integer answers (the index of the right choice) read as letters; withheld (blank) test answers are refused."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: f"{repo}/{name}")
    exam = hub_exam(hub_repo(tmp_path / "ints", [0, 3], [1, 2]), "test")
    assert [q["answer"] for q in exam.dev["s"]] == ["A", "D"] and [q["answer"] for q in exam.scored["s"]] == ["B", "C"]
    with pytest.raises(DataError, match=r"subject 's', split 'test': every answer is blank"):
        hub_exam(hub_repo(tmp_path / "blank", ["A", "B"], ["", ""]), "test")
    with pytest.raises(DataError, match=r"subject 's', split 'train', row 2, field 'answer': '7' is not one of"):
        hub_exam(hub_repo(tmp_path / "seven", [0, 7], [0, 1]), "test")


def test_csv_text_is_read_as_written(tmp_path):
    """A quoted field's CRLF is kept (LlamaFactory's pandas reader keeps it); blank lines are skipped, as there."""
    from tasks.exam_files import is_local_exam

    folder = tmp_path / "x"
    (folder / "test").mkdir(parents=True)
    (folder / "test" / "s_test.csv").write_bytes(b'"Line one\r\nline two?",1,2,3,4,A\r\n\r\nq2,1,2,3,4,B\r\n\r\n')
    assert is_local_exam(folder)  # no mapping.json and no dev/: still a local exam, not a hub name
    with pytest.raises(DataError, match=r"dev/s_dev.csv: missing \(the test split has questions of subject 's', "
                                        r"and the dev split gives the solved examples\)"):
        read_local_exam(folder, "test")
    write_csv(folder / "dev" / "s_dev.csv", [ROW])
    questions = read_local_exam(folder, "test").scored["s"]
    assert [q["question"] for q in questions] == ["Line one\r\nline two?", "q2"]
