"""Exam stage: multiple-choice exams in MMLU's layout (MMLU, CMMLU, C-Eval, the bundled pystdlib), scored as
LlamaFactory's evaluator does, on one model artifact.

Files: an exam folder `<task_dir>/<name>` as MMLU, CMMLU or C-Eval release it, or a hub dataset repo with a
config per subject (tasks/exam_files.py reads and checks both). `task: <name>_<split>` picks the exam and the
split scored.

Prompt: a subject header ("The following are multiple choice questions (with answers) about {subject}.",
or the Chinese wording for `lang: zh`), `n_shot` solved examples from the dev split as earlier turns,
then the question with its choices and "Answer:", all through the recipe's chat template. The
prediction is the choice letter whose token has the highest next-token logit. The support examples are
the first `n_shot` of the dev split (the original MMLU harness's choice; LlamaFactory samples them at
random, which makes two runs differ); scoring the dev split itself, each question's support leaves it out.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from tasks.core.errors import RecipeError
from tasks.core.hardware import attn_implementation, compute_device, torch_dtype
from tasks.core.hashing import tree_digest
from tasks.core.loading import remote_code
from tasks.core.mapped_weights import load_causal_lm
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step, check_stop, unkeyed
from tasks.encoding import prompt_and_reply
from tasks.evaluate import inference_dtype
from tasks.exam_files import LETTERS, hub_exam, is_local_exam, read_local_exam, support_questions
from tasks.templates.choice import TemplateChoice

BUNDLED = Path(__file__).resolve().parents[1] / "configs" / "exams"
HEADERS = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "\nAnswer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案："),
}


class ExamConfig(StageConfig):
    exam: str  # the exam's name (mmlu, cmmlu, ceval, pystdlib)
    split: Literal["dev", "val", "test"]
    source: str  # content digest of the exam folder, or hub repo and commit
    lang: Literal["en", "zh"]
    n_shot: int
    template: TemplateChoice
    batch_size: int  # shapes padding, and so the last digits of the logits
    attn_implementation: str | None  # None: transformers chooses
    dtype: str  # as evaluation loads a model: the half precision the recipe trains in, else "auto" (as stored)
    progress: bool = unkeyed(True)


def task_parts(task: str) -> tuple[str, str]:
    """`mmlu_test` -> ("mmlu", "test"); LlamaFactory's `ceval_validation` is the val split."""
    name, _, split = task.rpartition("_")
    split = "val" if split == "validation" else split
    if not name or split not in ("dev", "val", "test"):
        raise RecipeError(f"key 'task': {task!r} should be <exam>_<split> with split dev, val (validation) or test "
                          "(mmlu_test)")
    return name, split


def exam_folder(task_dir: str, name: str) -> Path | None:
    """Where the exam's files are: under task_dir, else among the bundled exams."""
    for base in (Path(task_dir), BUNDLED):
        if is_local_exam(base / name):
            return base / name
    return None


def hub_source(task_dir: str, name: str) -> str:
    from huggingface_hub import HfApi

    repo = f"{task_dir}/{name}" if task_dir.count("/") == 0 else task_dir
    try:
        return f"hub:{repo}@{HfApi().dataset_info(repo).sha}"
    except Exception as exc:
        raise RecipeError(f"key 'task_dir': no exam '{name}' in {task_dir} or the bundled exams, and the hub dataset "
                          f"{repo} cannot be resolved ({type(exc).__name__})") from None


def plan(recipe: Recipe, scored: Step, role: str) -> Step:
    e = recipe.evaluation
    name, split = task_parts(e.task)
    folder = exam_folder(e.task_dir, name)
    source = tree_digest(folder) if folder else hub_source(e.task_dir, name)
    if folder:
        checked_once(folder, split, source)  # every file checked now, before any stage runs
    config = ExamConfig(exam=name, split=split, source=source, lang=e.lang, n_shot=e.n_shot,
                        template=TemplateChoice.of(recipe.data), batch_size=e.batch_size,
                        attn_implementation=attn_implementation(recipe.model.flash_attn),
                        dtype=inference_dtype(recipe))
    locators = {"folder": str(folder) if folder else "", "hub": "" if folder else source, "role": role}
    return STAGE.step(f"exam[{role}]", config, {"model": scored}, locators)


@lru_cache(maxsize=8)
def checked_once(folder: Path, split: str, digest: str) -> None:
    """Check the exam's files once per content (`digest`): the base and the tuned model each plan an exam step,
    and a no-op re-run would otherwise read every CSV of MMLU twice before finding everything cached."""
    read_local_exam(folder, split)


def exam_messages(target: dict[str, str], support: list[dict[str, str]], subject: str, lang: str) -> list[dict]:
    """The k-shot conversation: solved examples as earlier turns, the question last (LlamaFactory's EvalTemplate)."""
    header, answer = HEADERS[lang]

    def turn(example: dict[str, str]) -> tuple[str, str]:
        choices = "".join(f"\n{letter}. {example[letter]}" for letter in LETTERS)
        return example["question"] + choices + answer, example["answer"]

    messages = []
    for example in [*support, target]:
        prompt, reply = turn(example)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    messages[0]["content"] = header.format(subject=subject) + messages[0]["content"]
    return messages


def encode_question(messages: list[dict], tokenizer, template) -> list[int]:
    """Token ids of everything before the last answer."""
    row = {"prompt": messages[:-1], "system": "", "tools": ""}
    prompt, _ = prompt_and_reply(row, messages[-1], tokenizer, template)
    return prompt


def predict(model, tokenizer, prompts: list[list[int]], batch_size: int, progress: bool) -> list[str]:
    """The choice letter with the highest next-token logit after each prompt (right-padded batches)."""
    import torch
    from tqdm.auto import tqdm

    from tasks.lean_training import supports_label_only_logits

    label_only = supports_label_only_logits(model)
    choice_ids = [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in LETTERS]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    letters = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="exam", disable=not progress):
        check_stop()
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in batch], device=model.device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch], device=model.device)
        last = torch.zeros_like(mask, dtype=torch.bool)
        last[torch.arange(len(batch), device=mask.device), mask.sum(-1) - 1] = True
        with torch.no_grad():
            if label_only:  # the head at each prompt's last token alone: (batch, vocab), not (batch, width, vocab)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=last).logits.reshape(len(batch), -1)
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits[last]
        letters += [LETTERS[i] for i in logits[:, choice_ids].argmax(-1).tolist()]
    return letters


def score(mapping: dict[str, dict[str, str | None]], predictions: dict[str, list[str]],
          answers: dict[str, list[str]]) -> dict[str, Any]:
    """Accuracy (x100) per subject, per category (subjects without one join only the average) and on average over
    all questions."""
    by_category: dict[str, list[bool]] = {}
    subjects, everything = {}, []
    for subject, letters in predictions.items():
        right = [p == a for p, a in zip(letters, answers[subject], strict=True)]
        subjects[subject] = accuracy(right)
        if mapping[subject]["category"] is not None:
            by_category.setdefault(mapping[subject]["category"], []).extend(right)
        everything += right
    return {"subjects": subjects, "categories": {name: accuracy(r) for name, r in by_category.items()},
            "average": accuracy(everything), "questions": len(everything)}


def accuracy(right: list[bool]) -> float:
    return round(100 * sum(right) / len(right), 2)


def report(config: ExamConfig, mapping: dict[str, dict[str, str | None]], scores: dict[str, Any]) -> str:
    lines = [f"# {config.exam} ({config.split}, {config.n_shot}-shot): {scores['average']:.2f}", ""]
    if scores["categories"]:
        lines += ["| category | accuracy |", "|---|---|"]
        lines += [f"| {name} | {value:.2f} |" for name, value in scores["categories"].items()]
        lines += [""]
    lines += ["| subject | category | accuracy |", "|---|---|---|"]
    lines += [f"| {mapping[s]['name']} | {mapping[s]['category'] or ''} | {v:.2f} |"
              for s, v in scores["subjects"].items()]
    return "\n".join(lines) + "\n"


def build(config: ExamConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoTokenizer

    folder = Path(ctx.locators["folder"]) if ctx.locators["folder"] else None
    # every question read and checked before the model loads
    exam = read_local_exam(folder, config.split) if folder else hub_exam(config.source, config.split)
    model_dir = ctx.inputs["model"].part("model")
    remote = remote_code(ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **remote)
    dtype = "auto" if config.dtype == "auto" else torch_dtype(config.dtype)
    model = load_causal_lm(model_dir, dtype, device=compute_device(), attn_implementation=config.attn_implementation,
                           **remote).eval()
    template = config.template.load(tokenizer)
    predictions = {}
    for subject, questions in exam.scored.items():
        support = [support_questions(exam.dev[subject], index, config.n_shot, config.split == "dev")
                   for index in range(len(questions))]
        name = exam.mapping[subject]["name"]
        prompts = [encode_question(exam_messages(q, s, name, config.lang), tokenizer, template)
                   for q, s in zip(questions, support, strict=True)]
        predictions[subject] = predict(model, tokenizer, prompts, config.batch_size, config.progress)
    answers = {subject: [q["answer"] for q in questions] for subject, questions in exam.scored.items()}
    scores = score(exam.mapping, predictions, answers)
    metrics = {"exam_average": scores["average"], "exam_questions": scores["questions"],
               **{f"exam_{name}": value for name, value in scores["categories"].items()}}
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "results.json").write_text(json.dumps({s: dict(enumerate(p)) for s, p in predictions.items()}, indent=1))
    (out / "report.md").write_text(report(config, exam.mapping, scores), encoding="utf-8")
    ctx.log_metrics(metrics)
    ctx.log_files([out / "report.md", out / "results.json"])
    publish_report((out / "report.md").read_text(encoding="utf-8"), config, ctx.locators["role"])
    ctx.log.info("%s_%s: %.2f average over %d questions", config.exam, config.split, scores["average"],
                 scores["questions"])
    layout = {"metrics": "metrics.json", "scores": "scores.json", "results": "results.json", "report": "report.md"}
    return Built("exam_scores", layout, metrics)


def publish_report(markdown: str, config: ExamConfig, role: str) -> None:
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is not None:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=artifact_key(config.exam, role), markdown=markdown,
                                 description=f"{config.exam} {config.split} accuracy ({role} model)")


def artifact_key(exam: str, role: str) -> str:
    """Prefect takes only lower-case letters, digits and dashes in an artifact key; the role keeps the base and
    tuned reports apart."""
    return re.sub(r"[^a-z0-9]+", "-", f"exam-{exam}-{role}".lower()).strip("-")


def hub_libraries(config: ExamConfig) -> tuple[str, ...]:
    """datasets reads a hub exam's rows; a local exam's never pass through it."""
    return ("datasets",) if config.source.startswith("hub:") else ()


STAGE = Stage(
    name="exam",
    plan=plan,
    build=build,
    code=("tasks.exam", "tasks.exam_files", "tasks.encoding", "tasks.templates", "tasks.lean_training",
          "tasks.core.mapped_weights"),
    libraries=("torch", "transformers"),
    config_libraries=hub_libraries,
    heavy=True,
)
