"""An exam's files: its subjects and each subject's questions, read and checked in full before a model loads, so
a bad file stops the run at once with its path, row and field rather than after the subjects before it were
scored.

Local exams are read as their releases ship (the formats LlamaFactory's exam loaders read):
- MMLU: headerless rows `question,A,B,C,D,answer` in `{dev,val,test}/<subject>_<split>.csv`, also under `data/`;
- C-Eval: a header row `id,question,A,B,C,D,answer[,explanation]`, files `<split>/<subject>_<split>.csv`;
- CMMLU: a header row `,Question,A,B,C,D,Answer` after an index column, files `<split>/<subject>.csv`.
`mapping.json` (LlamaFactory's: each subject's display name and category) is optional: without it the subjects
are the scored split's files, named by their file names, and the report has no categories.

Hub exams (LlamaFactory's layout: a dataset config per subject, splits train, validation and test) are checked
the same way, row by row; their answers may also be the index 0-3 of the right choice.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tasks.core.errors import DataError

LETTERS = ("A", "B", "C", "D")
FIELDS = ("question", *LETTERS, "answer")
SPLIT_NAMES_ON_HUB = {"dev": "train", "val": "validation", "test": "test"}
RESERVED_CATEGORIES = ("average", "questions")  # the names of the exam's own totals among its metrics

Question = dict[str, str]


@dataclass(frozen=True)
class ExamData:
    """Every subject's display name and category (None without a mapping), dev questions and scored questions."""

    mapping: dict[str, dict[str, str | None]]
    dev: dict[str, list[Question]]
    scored: dict[str, list[Question]]


def is_local_exam(folder: Path) -> bool:
    return (folder / "mapping.json").is_file() or any((root / split).is_dir() for root in (folder, folder / "data")
                                                      for split in ("dev", "val", "test"))


def split_root(folder: Path) -> Path:
    """Where dev/, val/ and test/ are: MMLU's release unpacks them under data/."""
    return folder / "data" if not (folder / "dev").is_dir() and (folder / "data" / "dev").is_dir() else folder


def split_file(folder: Path, subject: str, split: str) -> Path:
    root = split_root(folder) / split
    named = root / f"{subject}_{split}.csv"
    return named if named.is_file() or not (root / f"{subject}.csv").is_file() else root / f"{subject}.csv"


def read_local_exam(folder: Path, split: str) -> ExamData:
    listed = (folder / "mapping.json").is_file()
    mapping = (parse_mapping(read_text(folder / "mapping.json"), folder / "mapping.json")
               if listed else mapping_from_files(folder, split))
    dev, scored = {}, {}
    for subject in sorted(mapping):
        paths = {s: split_file(folder, subject, s) for s in dict.fromkeys(("dev", split))}
        for path in paths.values():
            if not path.is_file():
                why = "the exam's mapping.json lists" if listed else f"the {split} split has questions of"
                also = ", and the dev split gives the solved examples" if path.parent.name == "dev" else ""
                raise DataError(f"{path}: missing ({why} subject '{subject}'{also})")
        dev[subject] = read_csv_questions(paths["dev"])
        scored[subject] = dev[subject] if split == "dev" else read_csv_questions(paths[split])
        check_scored(scored[subject], str(paths[split]))
    return ExamData(mapping, dev, scored)


def mapping_from_files(folder: Path, split: str) -> dict[str, dict[str, str | None]]:
    root = split_root(folder) / split
    subjects = sorted(p.stem.removesuffix(f"_{split}") for p in root.glob("*.csv"))
    if not subjects:
        raise DataError(f"{folder}: no mapping.json and no {split} questions in {root} (the exam's files should be "
                        f"<subject>_{split}.csv or <subject>.csv there)")
    return {s: {"name": s.replace("_", " "), "category": None} for s in subjects}


def read_text(path: Path, newline: str | None = None) -> str:
    """The file's text (a UTF-8 byte-order mark dropped); newline="" keeps line endings as written, as csv wants."""
    try:
        with path.open(encoding="utf-8-sig", newline=newline) as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})") from None


def parse_mapping(text: str, where: object) -> dict[str, dict[str, str | None]]:
    """LlamaFactory's mapping.json: {subject: {"name": display name, "category": category}}."""
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{where}: expected an object mapping each subject to its name and category")
    for subject, entry in mapping.items():
        for field in ("name", "category"):
            if not isinstance(entry, dict) or not isinstance(entry.get(field), str) or not entry[field].strip():
                raise DataError(f"{where}, subject '{subject}', field '{field}': expected a non-empty string")
        if entry["category"].strip().lower() in RESERVED_CATEGORIES:
            raise DataError(f"{where}, subject '{subject}', field 'category': '{entry['category']}' is the name of "
                            "the exam's own total; name the category otherwise")
    return {s: {"name": e["name"], "category": e["category"]} for s, e in mapping.items()}


def read_csv_questions(path: Path) -> list[Question]:
    """A split file's questions, with or without a header row (named columns may come in any order, among others
    such as C-Eval's id and explanation or CMMLU's index; a header without an answer column, as C-Eval's test
    split has, gives blank answers)."""
    reader = csv.reader(io.StringIO(read_text(path, newline=""), newline=""))
    rows = [(number, cells) for number, cells in enumerate(reader, start=1) if cells]  # blank lines skipped
    header = [cell.strip().lower() for cell in rows[0][1]] if rows else []
    if {"question", "a", "b", "c", "d"} <= set(header):
        columns, rows = [header.index(f.lower()) if f.lower() in header else None for f in FIELDS], rows[1:]
    else:
        columns = list(range(6))
    width = 1 + max(c for c in columns if c is not None)
    questions = []
    for number, cells in rows:
        if columns == list(range(6)) and len(cells) != 6:
            raise DataError(f"{path}, row {number}: expected 6 cells question,A,B,C,D,answer (or a header row naming "
                            f"the columns), found {len(cells)}")
        if len(cells) < width:
            raise DataError(f"{path}, row {number}: {len(cells)} cells, short of the header's {width} columns")
        row = {field: "" if column is None else cells[column] for field, column in zip(FIELDS, columns, strict=True)}
        questions.append(checked_question(row, f"{path}, row {number}"))
    return questions


def checked_question(row: dict, where: str) -> Question:
    """The row with its answer as a letter: a letter A-D (spaces around it ignored) or the index 0-3 of the right
    choice, as some hub exams store it. A blank answer is kept blank (a split whose answers are withheld); a
    scored split must have none (check_scored)."""
    answer = row["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(LETTERS):
        answer = LETTERS[answer]
    answer = "" if answer is None else str(answer).strip()
    if answer and answer not in LETTERS:
        raise DataError(f"{where}, field 'answer': {answer!r} is not one of A, B, C, D")
    return {**{f: "" if row[f] is None else str(row[f]) for f in FIELDS[:-1]}, "answer": answer}


def check_scored(questions: list[Question], where: str) -> None:
    """A scored split needs questions, and an answer for each (C-Eval withholds its test split's answers)."""
    if not questions:
        raise DataError(f"{where}: no questions to score")
    blank = [number for number, q in enumerate(questions, start=1) if not q["answer"]]
    if len(blank) == len(questions):
        raise DataError(f"{where}: every answer is blank, so nothing can be scored (C-Eval withholds its test "
                        "answers: score its val split, task: ceval_validation)")
    if blank:
        raise DataError(f"{where}: question {blank[0]} has a blank answer ({len(blank)} in all)")


def hub_exam(source: str, split: str) -> ExamData:
    """Every subject of a hub exam, from the commit `source` names (`hub:<repo>@<commit>`)."""
    from huggingface_hub import hf_hub_download

    repo, commit = source.removeprefix("hub:").rsplit("@", 1)
    mapping_path = hf_hub_download(repo, "mapping.json", repo_type="dataset", revision=commit)
    mapping = parse_mapping(read_text(Path(mapping_path)), f"{repo}/mapping.json")
    dev = {s: hub_split(source, s, "dev") for s in sorted(mapping)}
    scored = {s: dev[s] if split == "dev" else hub_split(source, s, split) for s in sorted(mapping)}
    for subject, questions in scored.items():
        check_scored(questions, f"{repo}, subject '{subject}', split '{SPLIT_NAMES_ON_HUB[split]}'")
    return ExamData(mapping, dev, scored)


def hub_split(source: str, subject: str, split: str) -> list[Question]:
    """A subject's questions from a hub exam, checked as a local file's are."""
    import datasets

    repo, commit = source.removeprefix("hub:").rsplit("@", 1)
    rows = datasets.load_dataset(repo, name=subject, revision=commit, split=SPLIT_NAMES_ON_HUB[split])
    where = f"{repo}, subject '{subject}', split '{SPLIT_NAMES_ON_HUB[split]}'"
    missing = [f for f in FIELDS if f not in rows.column_names]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (has {', '.join(rows.column_names)})")
    return [checked_question(row, f"{where}, row {number}") for number, row in enumerate(rows, start=1)]


def support_questions(dev: list[Question], target_index: int, n_shot: int, scoring_dev: bool) -> list[Question]:
    """The first n_shot dev questions as solved examples; when the dev split itself is scored, those other than the
    question asked, which would otherwise be shown with its own answer."""
    if not scoring_dev:
        return dev[:n_shot]
    return [q for index, q in enumerate(dev) if index != target_index][:n_shot]
