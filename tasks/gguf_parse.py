"""One parse of a GGUF file per import, where transformers makes three.

Importing a GGUF model with transformers (`AutoTokenizer`, `AutoConfig`, `AutoModelForCausalLM`, each with
`gguf_file=`) builds a new `gguf.GGUFReader` of the file for each of the three, and while it maps tensor names
it builds gguf's `TensorNameMap` once per module of the model (397 times for SmolLM2-135M). gguf's reader is
pure Python over a memory map: for the bundled model's 49,152-token vocabulary one parse takes about 5.7 s on
this project's 2-core machine, and the 397 maps 7 s. With both memoised for the length of one import, the
bundled model's tokenizer, config and weights load in 10.3 s instead of 21.9, to the same weights bit for bit
(`tests/test_gguf_parse.py`).

Both are memoised only inside `one_gguf_parse()`, as transformers reads them (`from gguf import ...` at call
time); nothing is kept afterwards, so a file that changes between imports is read afresh.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within the block, `gguf.GGUFReader(path)` returns one reader per file and `gguf.get_tensor_name_map` one
    map per architecture and depth. Readers are read-only memory maps and the maps are only looked up in, so
    sharing them between the tokenizer's, the config's and the weights' loads changes nothing they read."""
    import gguf

    build_reader, build_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode: str = "r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = build_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(build_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = build_reader, build_name_map
