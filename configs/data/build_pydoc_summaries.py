"""Build the bundled `pydoc_summaries` dataset from the Python standard library's own docstrings.

Each row asks for the one-line summary of a function given its signature and the rest of its
docstring (alpaca format: instruction / input / output). Rows are split by *module*, so no
function of a test module, and no summary sentence, appears in the training file.

    python configs/data/build_pydoc_summaries.py      # rewrites the two .jsonl files beside it
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTION = "Write the one-line docstring summary for this Python function."
MODULES = sorted(
    """abc argparse ast base64 bisect bz2 calendar cgi cmd codecs collections colorsys configparser
    contextlib copy csv dataclasses datetime decimal difflib dis email.utils enum filecmp fnmatch
    fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html http.client
    http.cookies imaplib importlib inspect io ipaddress itertools json keyword linecache locale
    logging lzma mailbox mimetypes netrc ntpath operator optparse os pathlib pickle pkgutil
    platform plistlib poplib posixpath pprint pstats py_compile pydoc queue quopri random re
    reprlib sched secrets selectors shelve shlex shutil smtplib socket socketserver sqlite3
    statistics string struct subprocess symtable sysconfig tabnanny tarfile tempfile textwrap
    threading timeit tokenize trace traceback tracemalloc turtle types typing unittest
    urllib.parse urllib.request uu uuid warnings wave weakref webbrowser xml.dom.minidom
    xml.etree.ElementTree zipfile zipimport""".split()
)
MAX_INPUT_CHARS = 360
TEST_SHARE = 6  # one module in about six goes to the test split


def summary_and_body(doc: str) -> tuple[str, str] | None:
    """Split a docstring into its first line and the rest; None if it has no usable summary."""
    lines = inspect.cleandoc(doc).splitlines()
    if not lines:
        return None
    summary = lines[0].strip()
    body = "\n".join(lines[1:]).strip()
    if not (20 <= len(summary) <= 100 and summary.endswith(".") and body):
        return None
    if not re.match(r"^[A-Z]", summary):
        return None
    return summary, body


def function_rows(module_name: str):
    """Yield (qualified name, input text, summary) for documented public functions of a module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    objects = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            objects.append((name, obj))
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(member):
                    objects.append((f"{name}.{attr}", member))
    for qualname, func in objects:
        parts = summary_and_body(func.__doc__ or "")
        if parts is None:
            continue
        try:
            signature = str(inspect.signature(func))
        except (TypeError, ValueError):
            continue
        summary, body = parts
        text = f"def {qualname.split('.')[-1]}{signature}:\n{body}"
        if len(text) > MAX_INPUT_CHARS:
            text = text[:MAX_INPUT_CHARS].rsplit(" ", 1)[0] + " ..."
        yield f"{module_name}.{qualname}", text, summary


def is_test_module(module_name: str) -> bool:
    """Assign whole modules to the test split by a stable hash of their name."""
    return int(hashlib.sha256(module_name.encode()).hexdigest(), 16) % TEST_SHARE == 0


def main() -> None:
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    seen_summaries: set[str] = set()
    for module_name in MODULES:
        try:
            rows = list(function_rows(module_name))
        except ImportError:
            continue
        split = "test" if is_test_module(module_name) else "train"
        for qualname, text, summary in rows:
            if summary in seen_summaries:
                continue  # the same sentence in two places would leak across the split
            seen_summaries.add(summary)
            splits[split].append({"instruction": INSTRUCTION, "input": text, "output": summary, "source": qualname})
    for split, rows in splits.items():
        path = HERE / f"pydoc_summaries_{split}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{path.name}: {len(rows)} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
