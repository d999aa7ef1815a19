"""Multiple-choice exams: the k-shot prompt, a rigged model's exact score, the bundled exam through the DAG."""

import csv
import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

from flows.finetune import run_finetune
from tasks.core.errors import DataError, RecipeError
from tasks.core.recipe import Recipe
from tasks.exam import BUNDLED, exam_messages, hub_source
from tasks.exam_files import hub_split, read_csv_questions
from tasks.templates import format_pairs, get_template
from tests.conftest import tiny_recipe_values

QUESTION = {"question": "What is 2 + 2?", "A": "3", "B": "4", "C": "5", "D": "22", "answer": "B"}
SOLVED = {"question": "What is 1 + 1?", "A": "2", "B": "11", "C": "0", "D": "3", "answer": "A"}


def test_k_shot_prompt_text():
    messages = exam_messages(QUESTION, [SOLVED], "arithmetic", "en")
    pairs = format_pairs(get_template("chatml"), messages, "")
    prompt = "".join(p + r for p, r in pairs[:-1]) + pairs[-1][0]
    assert prompt == (
        "<|im_start|>user\nThe following are multiple choice questions (with answers) about arithmetic.\n\n"
        "What is 1 + 1?\nA. 2\nB. 11\nC. 0\nD. 3\nAnswer:<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    )
    chinese = exam_messages(QUESTION, [], "数学", "zh")
    assert chinese[0]["content"].startswith("以下是中国关于数学考试的单项选择题，请选出其中的正确答案。\n\n")
    assert chinese[0]["content"].endswith("\n答案：")


@pytest.fixture(scope="module")
def rigged_model(tiny_model_dir, tmp_path_factory):
    """A model that answers B whatever it is asked: its last hidden state is zero, its head's bias favours B."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
    model = PhiForCausalLM(config)
    with torch.no_grad():
        model.model.final_layernorm.weight.zero_()
        model.model.final_layernorm.bias.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tokenizer.encode("B", add_special_tokens=False)[-1]] = 5.0
    path = tmp_path_factory.mktemp("rigged")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def answer_share(letter: str, split: str = "test") -> float:
    answers = [row["answer"] for path in sorted((BUNDLED / "pystdlib" / split).glob("*.csv"))
               for row in read_csv_questions(path)]
    return 100 * sum(a == letter for a in answers) / len(answers)


def test_answers_from_the_head_at_each_prompts_last_token_equal_the_full_logits_ones(tiny_model_dir, monkeypatch):
    """predict runs the output head at each right-padded prompt's last token only, to the same logits there."""
    from transformers import AutoModelForCausalLM

    import tasks.lean_training
    from tasks.exam import predict

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [tokenizer.encode(f"Question {i}: " + "word " * (3 * i + 1)) for i in range(6)]
    heads = []
    model.lm_head.register_forward_hook(lambda module, args, output: heads.append(output))
    lean = predict(model, tokenizer, prompts, batch_size=4, progress=False)
    assert [h.shape[:-1] for h in heads] == [torch.Size([4]), torch.Size([2])]
    monkeypatch.setattr(tasks.lean_training, "supports_label_only_logits", lambda model: False)
    assert predict(model, tokenizer, prompts, batch_size=4, progress=False) == lean
    full = [h[torch.arange(len(h)), torch.tensor([len(p) for p in batch]) - 1]
            for h, batch in zip(heads[2:], (prompts[:4], prompts[4:]), strict=True)]
    assert heads[2].ndim == 3  # (batch, width, vocab): every position
    assert torch.allclose(torch.cat(heads[:2]), torch.cat(full), atol=1e-5)


def test_a_model_rigged_to_answer_b_scores_the_share_of_b(rigged_model, workdir):
    """Also an exam whose name Prefect's artifact keys and a category whose name MLflow's metric names would refuse
    (both failed the stage after every question was scored)."""
    import mlflow

    exam = workdir / "exams" / "PyStd.Lib"
    shutil.copytree(BUNDLED / "pystdlib", exam)
    mapping = json.loads((exam / "mapping.json").read_text())
    mapping["numeric"]["category"] = "Maths & Numbers (misc)"
    (exam / "mapping.json").write_text(json.dumps(mapping))
    recipe = Recipe.from_flat({"model_name_or_path": str(rigged_model), "do_train": False, "task": "PyStd.Lib_test",
                               "task_dir": str(workdir / "exams"), "template": "chatml", "n_shot": 2,
                               "batch_size": 8, "save_dir": str(workdir / "exam")})
    summary = run_finetune(recipe)
    scores = summary.metrics["base"]
    assert scores["exam_average"] == pytest.approx(answer_share("B"), abs=0.01)
    assert scores["exam_questions"] == 105 and {"exam_Text", "exam_Data", "exam_Internet"} <= set(scores)
    assert "exam_Maths & Numbers (misc)" in scores
    parent = mlflow.MlflowClient().get_run(summary.mlflow_run_id).data.metrics
    assert parent["base_exam_Maths _ Numbers _misc_"] == scores["exam_Maths & Numbers (misc)"]
    report = (workdir / "exam" / "base" / "report.md").read_text()
    assert report.startswith("# PyStd.Lib (test, 2-shot)") and "| text processing | Text |" in report
    assert set(json.loads((workdir / "exam" / "base" / "results.json").read_text())["numeric"].values()) == {"B"}
    assert run_finetune(recipe).metrics["base"] == scores  # save_dir again: our report replaced, not refused
    (workdir / "exam" / "base" / "notes.txt").write_text("mine")  # a user's file beside ours is kept
    run_finetune(recipe)
    assert (workdir / "exam" / "base" / "notes.txt").read_text() == "mine"


def test_exams_join_the_finetune_dag(tiny_model_dir, workdir):
    recipe = Recipe.from_flat(tiny_recipe_values(tiny_model_dir, max_samples=8, task="pystdlib_test", n_shot=1))
    summary = run_finetune(recipe)
    labels = [s.label for s in summary.stages]
    assert {"exam[base]", "exam[tuned]", "evaluate[base]", "evaluate[tuned]"} <= set(labels)
    assert 0 <= summary.metrics["base"]["exam_average"] <= 100 and "exam_average" in summary.metrics["tuned"]
    again = run_finetune(recipe.replace(n_shot=0))  # only the exams depend on n_shot
    assert [s.label for s in again.stages if not s.cached] == ["exam[base]", "exam[tuned]"]


def test_a_malformed_exam_row_is_named(tmp_path):
    shutil.copytree(BUNDLED / "pystdlib", tmp_path / "pystdlib")
    path = tmp_path / "pystdlib" / "test" / "numeric_test.csv"
    rows = list(csv.reader(path.open()))
    rows[2][5] = "E"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(DataError, match=r"numeric_test.csv, row 3, field 'answer': 'E' is not one of A, B, C, D"):
        read_csv_questions(path)


def test_a_hub_exam_reads_each_subject_as_a_dataset_config(tmp_path, monkeypatch):
    """The hub path, on a local folder laid out as a hub dataset repo (a config per subject, dev as `train`, val as
    `validation`: it asked for a split named 'val', which LlamaFactory's hub exams do not have)."""
    import datasets

    from tasks.exam import task_parts

    rows = read_csv_questions(BUNDLED / "pystdlib" / "test" / "numeric_test.csv")
    for split, part in (("train", rows[:3]), ("validation", rows[3:6]), ("test", rows)):
        datasets.Dataset.from_list(part).to_parquet(tmp_path / f"numeric-{split}.parquet")
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: numeric\n  data_files:\n"
                                        "  - {split: train, path: numeric-train.parquet}\n"
                                        "  - {split: validation, path: numeric-validation.parquet}\n"
                                        "  - {split: test, path: numeric-test.parquet}\n---\n")
    assert hub_split(f"hub:{tmp_path}@0123abc", "numeric", "dev") == rows[:3]
    assert hub_split(f"hub:{tmp_path}@0123abc", "numeric", "val") == rows[3:6]
    assert hub_split(f"hub:{tmp_path}@0123abc", "numeric", "test") == rows
    assert task_parts("ceval_validation") == ("ceval", "val")  # LlamaFactory's task name for C-Eval
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="no exam 'mmlu' in someorg or the bundled exams, and the hub dataset "
                                          "someorg/mmlu cannot be resolved"):
        hub_source("someorg", "mmlu")
