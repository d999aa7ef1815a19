"""Build the bundled `pystdlib` exam, in the layout MMLU releases (`pystdlib/{dev,val,test}/<subject>_<split>.csv`,
headerless rows `question,A,B,C,D,answer`, plus `mapping.json`), from the pydoc_summaries rows.

Each question names a standard-library function and offers four one-line docstring summaries: its own
and three of other functions of the same subject. Subjects group modules by what they are for; the
answer letter is spread evenly by a hash of the function's name.

    python configs/exams/build_pystdlib.py      # rewrites configs/exams/pystdlib/
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
EXAM = HERE / "pystdlib"
LETTERS = "ABCD"
SPLITS = {"dev": 5, "val": 3, "test": 15}  # questions per subject, taken in this order
SUBJECTS = {  # subject -> (display name, category, modules)
    "text_processing": ("text processing", "Text", "re string textwrap difflib html shlex tokenize keyword"),
    "data_types": ("data types and functional tools", "Data", "collections heapq bisect enum types typing copy "
                                                              "pprint reprlib weakref dataclasses functools "
                                                              "itertools operator contextlib"),
    "numeric": ("numbers and randomness", "Math", "decimal fractions random statistics secrets"),
    "file_formats": ("file formats and archives", "Files", "csv json configparser netrc plistlib tarfile zipfile "
                                                            "gzip bz2 lzma base64 quopri uu wave mailbox"),
    "os_services": ("operating system services", "System", "os pathlib shutil glob fnmatch filecmp tempfile platform "
                                                            "subprocess sysconfig ntpath posixpath io locale gettext "
                                                            "logging getopt argparse optparse"),
    "networking": ("internet protocols", "Internet", "http.client http.cookies urllib.parse urllib.request smtplib "
                                                     "poplib imaplib ftplib socket socketserver ipaddress email.utils "
                                                     "mimetypes webbrowser"),
    "development": ("development tools", "Development", "ast dis inspect pydoc py_compile symtable tabnanny timeit "
                                                        "trace traceback tracemalloc pstats unittest warnings "
                                                        "importlib pkgutil zipimport linecache codecs"),
}


def digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def subject_of(source: str) -> str | None:
    for subject, (_, _, modules) in SUBJECTS.items():
        if any(source.startswith(module + ".") for module in modules.split()):
            return subject
    return None


def question(row: dict, pool: list[dict]) -> list[str]:
    """One exam row: the question, four summaries (the right one at a hashed letter), the answer letter."""
    others = sorted((r for r in pool if r["output"] != row["output"]),
                    key=lambda r: digest(row["source"] + r["source"]))
    options = [r["output"] for r in others[:3]]
    answer = digest(row["source"]) % 4
    options.insert(answer, row["output"])
    return [f"Which is the one-line docstring summary of `{row['source']}`?", *options, LETTERS[answer]]


def build() -> dict[str, int]:
    rows = [json.loads(line) for split in ("train", "test")
            for line in (DATA / f"pydoc_summaries_{split}.jsonl").read_text().splitlines()]
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if (subject := subject_of(row["source"])) is not None:
            by_subject[subject].append(row)
    shutil.rmtree(EXAM, ignore_errors=True)
    counts = {}
    for subject, members in sorted(by_subject.items()):
        members.sort(key=lambda r: digest(r["source"]))
        start = 0
        for split, size in SPLITS.items():
            (EXAM / split).mkdir(parents=True, exist_ok=True)
            with (EXAM / split / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(question(r, members) for r in members[start : start + size])
            start += size
        counts[subject] = min(len(members), sum(SPLITS.values()))
    mapping = {s: {"name": SUBJECTS[s][0], "category": SUBJECTS[s][1]} for s in sorted(by_subject)}
    (EXAM / "mapping.json").write_text(json.dumps(mapping, indent=2) + "\n")
    return counts


if __name__ == "__main__":
    for subject, count in build().items():
        print(f"{subject}: {count} questions")
