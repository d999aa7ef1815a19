"""Data-worker features through the DAG on the tiny model: mixing, packing, preview."""

import json

import datasets
import pytest

from flows.cli import main
from flows.finetune import finetune
from tasks.core.recipe import load_recipe
from tasks.mixing import merge_parts
from tests.conftest import BUNDLED_DATA


def numbered(prefix: str, count: int):
    return datasets.Dataset.from_list([{"id": f"{prefix}{i}"} for i in range(count)])


def test_mix_strategies():
    a, b = numbered("a", 6), numbered("b", 2)
    assert merge_parts([a, b], "concat", None, 0)["id"] == [f"a{i}" for i in range(6)] + ["b0", "b1"]
    under = merge_parts([a, b], "interleave_under", None, 0)["id"]
    assert under == ["a0", "b0", "a1", "b1"]  # stops as soon as the shorter dataset runs out
    over = merge_parts([a, b], "interleave_over", None, 0)["id"]
    assert set(over) == {f"a{i}" for i in range(6)} | {"b0", "b1"}  # runs until the longer one is used up
    weighted = merge_parts([a, b], "interleave_under", [0.9, 0.1], 3)["id"]
    assert sum(x.startswith("a") for x in weighted) > sum(x.startswith("b") for x in weighted)


@pytest.mark.parametrize("neat", [True, False])
def test_packing_through_the_dag(write_recipe, workdir, neat):
    recipe = write_recipe(neat_packing=neat, packing=not neat, cutoff_len=256, max_samples=16, val_size=4,
                          eval_dataset=None)
    summary = finetune(load_recipe(recipe))
    tokenized = workdir / "artifacts" / "tokenize" / next(s.key for s in summary.stages if s.stage == "tokenize")
    rows = datasets.load_from_disk(str(tokenized / "train"))
    stats = json.loads((tokenized / "stats.json").read_text())
    assert "position_ids" in rows.column_names and len(rows) < 12  # 12 training samples, fewer packed rows
    restarts = [sum(p == 0 for p in positions) for positions in rows["position_ids"]]
    assert max(restarts) > 1 if neat else set(restarts) == {1}  # neat: positions restart at every sample
    assert stats["train"]["max_len"] <= 256
    train_dir = workdir / "artifacts" / "train" / next(s.key for s in summary.stages if s.stage == "train")
    results = json.loads((train_dir / "train_results.json").read_text())
    assert results["global_step"] >= 1 and results["padding_share"] < 0.3


def test_data_preview_prints_marked_samples_and_statistics(capsys, write_recipe):
    assert main(["data", "preview", str(write_recipe(cutoff_len=512))]) == 0
    out = capsys.readouterr().out
    assert "| split |" in out and "padding_share" in out and "trainable_share" in out
    assert "⟦" in out and "<|im_start|>assistant\n⟦" in out  # the reply is marked trainable, the prompt is not


def test_streaming_trains_from_a_lazy_stream(write_recipe, workdir):
    recipe = write_recipe(streaming=True, max_steps=3, max_samples=None, eval_dataset=None, val_size=6,
                          dataset="pydoc_summaries,pydoc_summaries_test", mix_strategy="interleave_under")
    summary = finetune(load_recipe(recipe))
    key = {s.label: s.key for s in summary.stages}
    store = workdir / "artifacts"
    fetched = store / "fetch" / key["fetch[pydoc_summaries]"]
    assert (fetched / "source.json").is_file() and not (fetched / "rows").exists()  # nothing materialized
    tokenized = store / "tokenize" / key["tokenize"]
    stream = json.loads((tokenized / "stream.json").read_text())
    assert len(stream["parts"]) == 2 and stream["skip"] == 6 and not (tokenized / "train").exists()
    assert len(datasets.load_from_disk(str(tokenized / "eval"))) == 6  # the stream's first rows
    results = json.loads((store / "train" / key["train"] / "train_results.json").read_text())
    assert results["global_step"] == 3
    assert summary.metrics["tuned"]["num_samples"] == 6


def test_streaming_row_errors_name_the_row(capsys, write_recipe, workdir):
    folder = workdir / "data"
    folder.mkdir()
    rows = [{"instruction": f"task {i}", "output": f"answer {i}"} for i in range(5)]
    rows[3]["output"] = ""
    (folder / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "dataset_info.json").write_text(json.dumps({"broken": {"file_name": "broken.jsonl"}}))
    recipe = write_recipe(streaming=True, max_steps=2, dataset="broken", dataset_dir=str(folder), eval_dataset=None)
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("row 3: field 'output' (response) is empty") and "broken.jsonl" in err


def write_documents(workdir, count: int = 40):
    """A pretraining dataset 'docs': one document per line of a text file."""
    folder = workdir / "data"
    folder.mkdir()
    lines = [json.loads(line)["input"].replace("\n", " ")
             for line in (BUNDLED_DATA / "pydoc_summaries_train.jsonl").read_text().splitlines()[:count]]
    (folder / "docs.txt").write_text("\n".join(lines) + "\n")
    (folder / "dataset_info.json").write_text(json.dumps({"docs": {"file_name": "docs.txt",
                                                                   "columns": {"prompt": "text"}}}))
    return folder


def one_eos_per_document(blocks: list[list[int]], eos: int) -> bool:
    """No two EOS in a row across the packed stream (each document ends in exactly one)."""
    stream = [t for block in blocks for t in block]
    return stream.count(eos) > 3 and not any(a == b == eos for a, b in zip(stream, stream[1:], strict=False))


def test_pretraining_packs_documents_into_blocks(write_recipe, workdir, tiny_model_dir):
    from transformers import AutoTokenizer

    recipe = write_recipe(stage="pt", dataset="docs", dataset_dir=str(write_documents(workdir)), eval_dataset=None,
                          val_size=4, cutoff_len=64, max_samples=None)
    summary = finetune(load_recipe(recipe))
    tokenized = workdir / "artifacts" / "tokenize" / next(s.key for s in summary.stages if s.stage == "tokenize")
    rows = datasets.load_from_disk(str(tokenized / "train"))
    assert len(rows) > 36 and {len(ids) for ids in rows["input_ids"]} == {64}  # documents packed into blocks
    assert rows[0]["labels"] == rows[0]["input_ids"]
    assert one_eos_per_document(rows["input_ids"], AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id)
    assert "perplexity" in summary.metrics["tuned"] and "rougeL" not in summary.metrics["tuned"]


def test_streamed_pretraining_is_packed_too(write_recipe, workdir, tiny_model_dir):
    """Packing is on for pt; a stream was cut at cutoff_len per document, the rest of each document lost."""
    from transformers import AutoTokenizer

    from flows.plan import plan_run
    from tasks.core.store import ArtifactStore
    from tasks.streaming import training_stream

    recipe = write_recipe(stage="pt", dataset="docs", dataset_dir=str(write_documents(workdir)), eval_dataset=None,
                          streaming=True, max_steps=2, cutoff_len=32, max_samples=None)
    assert main(["data", "preview", str(recipe)]) == 0
    store = ArtifactStore(workdir / "artifacts")
    step = next(s for s in plan_run(load_recipe(recipe), store) if s.stage.name == "tokenize")
    tokenized = next(artifact for artifact in store.artifacts() if artifact.ref.stage == "tokenize")
    spec = json.loads(tokenized.part("stream").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    blocks = [row["input_ids"] for row in training_stream(spec, tokenizer, step.locators["sources"])]
    documents = [json.loads(line)["input"] for line in
                 (BUNDLED_DATA / "pydoc_summaries_train.jsonl").read_text().splitlines()[:40]]
    tokens = sum(len(tokenizer.encode(text.replace("\n", " "), add_special_tokens=False)) + 1 for text in documents)
    assert {len(block) for block in blocks} == {32} and len(blocks) == tokens // 32  # every whole block kept
    assert one_eos_per_document(blocks, tokenizer.eos_token_id)


ROWS = [{"instruction": f"Say {i}.", "output": f"00{i}"} for i in range(6)]  # digits a CSV reader would make 5


def write_table(path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ROWS)
    if kind == "csv":
        path.write_text("instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in ROWS))
    elif kind == "parquet":
        pq.write_table(table, path)
    elif kind == "arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "folder":
        path.mkdir()
        (path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
        (path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3:]))


@pytest.mark.parametrize("kind,name", [("csv", "t.csv"), ("parquet", "t.parquet"), ("arrow", "t.arrow"),
                                       ("json", "t.json"), ("folder", "parts")])
def test_local_file_types_fetch_and_align(tmp_path, kind, name):
    from tasks import align, fetch
    from tasks.core.recipe import Recipe
    from tasks.core.registry import load_registry
    from tasks.core.stage import run_in_process

    write_table(tmp_path / name, kind)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"t": {"file_name": name}}))
    entry = load_registry(tmp_path)["t"]
    recipe = Recipe.from_flat({"dataset": "t", "dataset_dir": str(tmp_path)})
    fetched = fetch.plan(entry, streaming=False)
    aligned = align.plan(entry, fetched, recipe)
    ref = run_in_process([fetched, aligned], tmp_path / "store")[aligned.label]
    rows = datasets.load_from_disk(str(tmp_path / "store" / "align" / ref.key / "rows"))
    assert len(rows) == 6 and rows[5]["prompt"][0]["content"] == "Say 5." and rows[5]["response"][0]["content"] == "005"


@pytest.mark.parametrize("wanted", [3, 10])
def test_num_samples_draws_a_sample_and_upsamples_as_llamafactory_does(tmp_path, wanted):
    """Fewer than the rows: a random sample of distinct rows, not the file's head. More: every row once, then
    drawn again until there are `num_samples` (LlamaFactory's loader)."""
    from tasks import fetch
    from tasks.core.registry import load_registry
    from tasks.core.stage import run_in_process

    write_table(tmp_path / "t.json", "json")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json", "num_samples": wanted}}))
    fetched = fetch.plan(load_registry(tmp_path)["t"], streaming=False)
    ref = run_in_process([fetched], tmp_path / "store")[fetched.label]
    outputs = datasets.load_from_disk(str(tmp_path / "store" / "fetch" / ref.key / "rows"))["output"]
    assert len(outputs) == wanted
    if wanted < len(ROWS):
        assert len(set(outputs)) == wanted and outputs != [r["output"] for r in ROWS[:wanted]]
    else:
        assert set(outputs) == {r["output"] for r in ROWS}
    assert fetch.sample_indexes(6, wanted) == fetch.sample_indexes(6, wanted)  # the same rows on every build


def test_a_document_starts_with_bos_where_the_tokenizer_adds_one(tiny_model_dir):
    from transformers import AutoTokenizer

    from tasks.encoding import encode_document

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"text": "def join(a, b):", "prompt": [], "response": [], "kto_tag": None, "row": 0}
    plain = encode_document(row, tokenizer)["input_ids"]
    assert plain[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in plain  # SmolLM-style: no BOS
    tokenizer.add_bos_token = True  # as Llama's tokenizers are set
    assert encode_document(row, tokenizer)["input_ids"] == [tokenizer.bos_token_id, *plain]


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PARALLEL_CALLS = {"messages": [  # two tool calls in one turn, which the glm4 tool format cannot write
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "w", "arguments": '{"c": "a"}'}},
        {"type": "function", "function": {"name": "w", "arguments": '{"c": "b"}'}}]},
    {"role": "tool", "content": "sun"}, {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "sun and rain"}]}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_errors_name_the_row_in_its_file_after_sampling_joining_and_mixing(write_recipe, workdir, capsys):
    """A bad row was named by its place in the sampled rows (num_samples), in a folder's files joined (no file
    named), or, at tokenize, by a row number with no dataset though several were mixed."""
    folder = workdir / "data"
    answers = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    write_jsonl(folder / "sampled.jsonl", [*answers[:2], {"instruction": "q2", "output": ""}, *answers[3:]])
    write_jsonl(folder / "parts" / "part1.jsonl", answers[:3])
    write_jsonl(folder / "parts" / "part1b.jsonl", [])  # an empty file holds no rows (it failed to load alone)
    write_jsonl(folder / "parts" / "part2.jsonl", [answers[3], {"instruction": "q", "output": ""}])
    write_jsonl(folder / "one.jsonl", [GOOD_CHAT, GOOD_CHAT])
    write_jsonl(folder / "two.jsonl", [GOOD_CHAT, PARALLEL_CALLS])
    chat = {"formatting": "openai", "columns": {"messages": "messages"}}
    (folder / "dataset_info.json").write_text(json.dumps({
        "sampled": {"file_name": "sampled.jsonl", "num_samples": 10}, "parts": {"file_name": "parts"},
        "one": {"file_name": "one.jsonl", **chat}, "two": {"file_name": "two.jsonl", **chat}}))
    cases = [("sampled", {}, f"dataset 'sampled' ({folder / 'sampled.jsonl'}), row 2: field 'output'"),
             ("parts", {}, f"dataset 'parts' ({folder / 'parts'}), file part2.jsonl, row 1: field 'output'"),
             ("one,two", {"tool_format": "glm4"},
              "dataset 'two', row 1: a function turn holds parallel tool calls")]
    for dataset, overrides, message in cases:
        recipe = write_recipe(dataset=dataset, dataset_dir=str(folder), eval_dataset=None, max_samples=None,
                              **overrides)
        assert main(["data", "preview", str(recipe)]) == 1
        assert message in capsys.readouterr().err


def test_a_corpus_shorter_than_one_block_says_so(write_recipe, workdir, capsys):
    """The advice was 'raise cutoff_len', which makes a too-short pretraining corpus shorter still."""
    recipe = write_recipe(stage="pt", dataset="docs", dataset_dir=str(write_documents(workdir, count=2)),
                          eval_dataset=None, cutoff_len=2048, max_samples=None)
    assert main(["data", "preview", str(recipe)]) == 1
    assert "fewer tokens than one cutoff_len block (2048); lower cutoff_len" in capsys.readouterr().err
