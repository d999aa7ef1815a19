"""Align: every format's converter on dict rows, and the fetch+align builds on small files."""

import json

import pytest

from tasks import align, fetch
from tasks.core.errors import DataError
from tasks.core.recipe import Recipe
from tasks.core.registry import DatasetEntry, load_registry
from tasks.core.stage import run_in_process
from tasks.core.store import ArtifactStore
from tasks.formats import RowError, convert_row, dataset_kind

OPENAI_AS_SHAREGPT = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                      "system_tag": "system"}


def entry(**fields) -> DatasetEntry:
    return DatasetEntry(name="demo", file_name="demo.json", **fields)


def convert(row, **fields):
    """Convert one row as the align stage would for an entry with these registry fields."""
    e = entry(**fields)
    columns = e.column_map()
    return convert_row(row, e.formatting, dataset_kind(e.formatting, columns, e.ranking), columns, e.tag_map())


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --- alpaca -------------------------------------------------------------------------------------


def test_alpaca_joins_instruction_and_input_and_keeps_history():
    row = {"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be exact.", "past": [["hi", "hello"]]}
    out = convert(row, columns={"prompt": "instruction", "query": "input", "response": "output",
                                "system": "system", "history": "past"})
    assert out == {"prompt": [user("hi"), assistant("hello"), user("Sum\n1 2")], "response": [assistant("3")],
                   "system": "Be exact.", "tools": "", "kto_tag": None, "text": ""}


def test_alpaca_defaults_and_optional_cells():
    assert convert({"instruction": "Q", "input": None, "output": "A"})["prompt"] == [user("Q")]
    assert convert({"instruction": "", "input": "only input", "output": "A"})["prompt"] == [user("only input")]
    tools = convert({"instruction": "Q", "output": "A", "tools": [{"name": "f"}]},
                    columns={"prompt": "instruction", "response": "output", "tools": "tools"})["tools"]
    assert json.loads(tools) == [{"name": "f"}]


def test_alpaca_numbers_are_read_as_text():
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": None, "history": None,
               "tools": None}
    converted = convert_row({"instruction": "Q", "output": 3}, "alpaca", "sft", columns, {})
    assert converted["response"] == [{"role": "assistant", "content": "3"}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "Q", "output": ""}, "field 'output' (response) is empty"),
        ({"instruction": "Q", "output": "  "}, "field 'output' (response) is empty"),
        ({"instruction": "Q", "output": {"a": 1}}, "field 'output' (response) must be a string, got dict"),
        ({"instruction": "", "input": "", "output": "A"}, "field 'instruction' (prompt) is empty"),
        ({"instruction": "Q", "output": "A", "system": ["x"]}, "field 'system' (system) must be a string, got list"),
        ({"instruction": "Q", "output": "A", "history": [["only one"]]}, "pair 0: expected [user, assistant]"),
        ({"instruction": "Q", "output": "A", "history": [["u", ""]]}, "pair 0: the assistant turn is empty"),
        ({"instruction": "Q", "output": "A", "tools": "{not json"}, "field 'tools' (tools) is not valid JSON"),
    ],
)
def test_alpaca_invalid_rows_name_the_field(row, message):
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history", "tools": "tools"}
    with pytest.raises(RowError) as err:
        convert(row, columns=columns)
    assert str(err.value).endswith(message)


def test_pretrain_text_has_no_response():
    out = convert({"text": "A document."}, columns={"prompt": "text"})
    assert out["text"] == "A document." and out["response"] == [] and out["prompt"] == [user("A document.")]
    assert convert({"t": "Title", "b": "Body"}, columns={"prompt": "t", "query": "b"})["text"] == "Title\nBody"
    with pytest.raises(RowError, match="field 'text' \\(prompt\\) is empty"):
        convert({"text": ""}, columns={"prompt": "text"})


def test_alpaca_preference_and_kto():
    pair = convert({"q": "Q", "good": "yes", "bad": "no"}, ranking=True,
                   columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert pair["prompt"] == [user("Q")] and pair["response"] == [assistant("yes"), assistant("no")]
    with pytest.raises(RowError, match="field 'bad' \\(rejected\\) is empty"):
        convert({"q": "Q", "good": "yes"}, ranking=True, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    kto_columns = {"prompt": "q", "response": "a", "kto_tag": "label"}
    assert convert({"q": "Q", "a": "A", "label": False}, columns=kto_columns)["kto_tag"] is False
    assert convert({"q": "Q", "a": "A", "label": True}, columns=kto_columns)["response"] == [assistant("A")]
    with pytest.raises(RowError, match="field 'label' \\(kto_tag\\) must be true or false, got str 'yes'"):
        convert({"q": "Q", "a": "A", "label": "yes"}, columns=kto_columns)
    # A CSV cell is text: the words true and false are its booleans (pandas reads them so for LlamaFactory).
    assert convert({"q": "Q", "a": "A", "label": "True"}, columns=kto_columns)["kto_tag"] is True
    assert convert({"q": "Q", "a": "A", "label": "false"}, columns=kto_columns)["kto_tag"] is False


# --- sharegpt / openai ----------------------------------------------------------------------------


def turn(who, text):
    return {"from": who, "value": text}


def test_sharegpt_roles_system_and_tools():
    row = {
        "conversations": [turn("human", "weather?"), turn("function_call", '{"name": "w"}'),
                          turn("observation", "sunny"), turn("gpt", "It is sunny.")],
        "system": "sys", "tools": '[{"name": "w"}]',
    }
    out = convert(row, formatting="sharegpt", columns={"messages": "conversations", "system": "system",
                                                       "tools": "tools"})
    assert [m["role"] for m in out["prompt"]] == ["user", "function", "observation"]
    assert out["response"] == [assistant("It is sunny.")]
    assert (out["system"], out["tools"], out["kto_tag"], out["text"]) == ("sys", '[{"name": "w"}]', None, "")
    row["conversations"].insert(0, turn("system", "from the turn"))
    assert convert(row, formatting="sharegpt", columns={"messages": "conversations", "system": "system"})[
        "system"] == "from the turn"  # a leading system turn overrides the column


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([turn("gpt", "a"), turn("human", "b")],
         "turn 0 of 'conversations' (from 'gpt') has role 'assistant', expected a user-side turn (user or observation"),
        ([turn("human", "a"), turn("human", "b")],
         "turn 1 of 'conversations' (from 'human') has role 'user', expected an assistant-side turn"),
        ([turn("human", "a"), turn("gpt", "")], "turn 1 of 'conversations' is empty"),
        ([turn("human", "a"), turn("gpt", None)], "turn 1 of 'conversations' is empty"),
        ([turn("human", "a"), turn("gpt", 7)], "turn 1 of 'conversations' has non-string content (int)"),
        ([turn("human", "a"), turn("bot", "b")], "turn 1 of 'conversations' has unknown 'from' 'bot'"),
        ([turn("human", "a"), turn("system", "s")],
         "turn 1 of 'conversations' is a system turn (from 'system'); only the first turn may be one"),
        ([turn("human", "a"), turn("gpt", "b"), turn("human", "c")], "ends with a user turn"),
        ([turn("system", "s"), turn("gpt", "b")], "turn 1 of 'conversations' (from 'gpt') has role 'assistant'"),
        ([], "field 'conversations' (messages) must be a non-empty list of turns"),
    ],
)
def test_sharegpt_invalid_rows_name_the_turn(turns, message):
    with pytest.raises(RowError) as err:
        convert({"conversations": turns}, formatting="sharegpt")
    assert message in str(err.value)


def test_openai_messages_as_sharegpt_with_tags():
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}]}
    out = convert(row, formatting="sharegpt", columns={"messages": "messages"}, tags=OPENAI_AS_SHAREGPT)
    assert out["system"] == "Be brief." and out["prompt"] == [user("Hi")] and out["response"] == [assistant("Hello")]


def test_openai_formatting_tool_calls_and_results():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    row = {"messages": [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "content": "2"}, {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "2 and 3"},
    ]}
    out = convert(row, formatting="openai")
    assert [m["role"] for m in out["prompt"]] == ["user", "function", "observation"]
    assert json.loads(out["prompt"][1]["content"]) == [{"name": "add", "arguments": {"a": 1}}] * 2
    # parallel results merged into one turn, joined as LlamaFactory joins them
    assert out["prompt"][2]["content"] == "2\n</tool_response>\n<tool_response>\n3"
    assert out["response"] == [assistant("2 and 3")]
    row["messages"][1]["tool_calls"] = [call]  # one call: its object, as the API writes a call back
    row["messages"][2:4] = [{"role": "tool", "content": "2"}]
    single = convert(row, formatting="openai")["prompt"][1]["content"]
    assert json.loads(single) == {"name": "add", "arguments": {"a": 1}}
    row["messages"][1]["tool_calls"][0] = {"function": {"name": "add", "arguments": "{oops"}}
    with pytest.raises(RowError, match="turn 1 of 'messages' has tool call arguments that are not valid JSON"):
        convert(row, formatting="openai")


def test_sharegpt_preference_and_kto():
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    row = {"conversations": [turn("human", "Q")], "chosen": turn("gpt", "good"), "rejected": turn("gpt", "bad")}
    out = convert(row, formatting="sharegpt", ranking=True, columns=columns)
    assert out["prompt"] == [user("Q")] and out["response"] == [assistant("good"), assistant("bad")]
    with pytest.raises(RowError, match="field 'rejected' \\(rejected\\) has role 'human'"):
        convert({**row, "rejected": turn("human", "bad")}, formatting="sharegpt", ranking=True, columns=columns)
    with pytest.raises(RowError, match="field 'chosen' \\(chosen\\) is empty"):
        convert({**row, "chosen": None}, formatting="sharegpt", ranking=True, columns=columns)
    with pytest.raises(RowError, match="a preference prompt ends with a user turn"):
        convert({**row, "conversations": [turn("human", "Q"), turn("gpt", "A")]}, formatting="sharegpt",
                ranking=True, columns=columns)
    kto = {"messages": "conversations", "kto_tag": "label"}
    out = convert({"conversations": [turn("human", "Q"), turn("gpt", "A")], "label": True}, formatting="sharegpt",
                  columns=kto)
    assert out["kto_tag"] is True and out["response"] == [assistant("A")]
    with pytest.raises(RowError, match="got missing"):
        convert({"conversations": [turn("human", "Q"), turn("gpt", "A")]}, formatting="sharegpt", columns=kto)


def test_dataset_kind():
    assert dataset_kind("alpaca", entry().column_map(), False) == "sft"
    assert dataset_kind("alpaca", entry(columns={"prompt": "text"}).column_map(), False) == "pretrain"
    assert dataset_kind("sharegpt", {"messages": "m"}, True) == "preference"
    assert dataset_kind("sharegpt", {"messages": "m", "kto_tag": "label"}, False) == "kto"


# --- the stage: fetch + align builds on files ----------------------------------------------------


def write_dataset(folder, file_name, rows, **fields):
    """Write rows (JSON array for .json, lines for .jsonl) and a dataset_info.json naming them `mine`."""
    path = folder / file_name
    if file_name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": file_name, **fields}}))
    return load_registry(folder)["mine"]


def run_align(tmp_path, dataset_entry, on_invalid_row="fail"):
    """fetch then align, as the flow does but without Prefect; returns (rows, manifest data)."""
    import datasets

    recipe = Recipe.from_flat({"do_train": False, "on_invalid_row": on_invalid_row})
    fetched = fetch.plan(dataset_entry, streaming=False)
    step = align.plan(dataset_entry, fetched, recipe)
    assert step.config.on_invalid_row == on_invalid_row
    ref = run_in_process([fetched, step], tmp_path / "store")[step.label]
    artifact = ArtifactStore(tmp_path / "store").lookup(ref.stage, ref.key)
    rows = datasets.load_from_disk(str(artifact.part("rows")))
    return rows, artifact.info


ALPACA_ROWS = [
    {"instruction": "a", "input": "", "output": "A"},
    {"instruction": "b", "input": "x", "output": ""},
    {"instruction": "c", "input": "", "output": "C"},
    {"instruction": "", "input": "", "output": "D"},
]


def test_alpaca_file_fails_on_first_invalid_row(tmp_path):
    mine = write_dataset(tmp_path, "mine.json", ALPACA_ROWS)
    with pytest.raises(DataError) as err:
        run_align(tmp_path, mine)
    assert str(err.value) == (
        f"dataset 'mine' ({tmp_path / 'mine.json'}), row 1: field 'output' (response) is empty"
    )
    assert not list((tmp_path / "store").glob("align/*"))


def test_alpaca_file_drops_and_counts_invalid_rows(tmp_path):
    mine = write_dataset(tmp_path, "mine.json", ALPACA_ROWS)
    rows, manifest = run_align(tmp_path, mine, on_invalid_row="drop")
    assert rows.column_names == ["prompt", "response", "system", "tools", "kto_tag", "text", "file", "row"]
    assert rows["row"] == [0, 2]
    assert rows[1]["prompt"] == [user("c")] and rows[1]["response"] == [assistant("C")]
    assert manifest["rows"] == 2 and manifest["dataset_kind"] == "sft" and manifest["dropped_invalid"] == 2
    assert manifest["drop_reasons"] == {"'output' is empty": 1, "'instruction' is empty": 1}
    assert manifest["drop_examples"][0] == "row 1: field 'output' (response) is empty"


def test_all_rows_invalid_is_an_error_even_when_dropping(tmp_path):
    mine = write_dataset(tmp_path, "mine.json", [ALPACA_ROWS[1], ALPACA_ROWS[3]])
    with pytest.raises(DataError, match=r"all 2 rows are invalid, e\.g\. row 0: field 'output'"):
        run_align(tmp_path, mine, on_invalid_row="drop")


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    mine = write_dataset(tmp_path, "mine.json", ALPACA_ROWS, columns={"prompt": "instruction", "response": "answer"})
    with pytest.raises(DataError) as err:
        run_align(tmp_path, mine)
    message = str(err.value)
    assert "column 'answer' (the 'response' field) not found" in message and "mine.json" in message
    assert "['instruction', 'input', 'output']" in message


def test_sharegpt_jsonl_with_openai_tags_system_and_drop(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]},
        {"messages": [{"role": "user", "content": "u"}]},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]
    mine = write_dataset(tmp_path, "chat.jsonl", rows, formatting="sharegpt", columns={"messages": "messages"},
                         tags=OPENAI_AS_SHAREGPT)
    aligned, manifest = run_align(tmp_path, mine, on_invalid_row="drop")
    assert aligned["row"] == [0, 3] and aligned[0]["system"] == "S"
    assert aligned[0]["prompt"] == [user("u1"), assistant("a1"), user("u2")]
    assert aligned[0]["response"] == [assistant("a2")] and aligned[1]["system"] == ""
    assert manifest["drop_reasons"] == {"'messages': wrong turn order": 1, "'messages': odd number of turns": 1}


def test_preference_kto_and_pretrain_files(tmp_path):
    preference = write_dataset(
        tmp_path, "dpo.json",
        [{"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
          "rejected": {"from": "gpt", "value": "bad"}}],
        formatting="sharegpt", ranking=True,
        columns={"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    )
    rows, manifest = run_align(tmp_path, preference)
    assert manifest["dataset_kind"] == "preference" and rows[0]["response"] == [assistant("good"), assistant("bad")]

    kto = write_dataset(tmp_path, "kto.jsonl", [{"q": "Q", "a": "A", "label": False}],
                        columns={"prompt": "q", "response": "a", "kto_tag": "label"})
    rows, manifest = run_align(tmp_path, kto)
    assert manifest["dataset_kind"] == "kto" and rows[0]["kto_tag"] is False

    (tmp_path / "docs.txt").write_text("first document\nsecond document\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"docs": {"file_name": "docs.txt",
                                                                     "columns": {"prompt": "text"}}}))
    rows, manifest = run_align(tmp_path, load_registry(tmp_path)["docs"])
    assert manifest["dataset_kind"] == "pretrain" and rows["text"] == ["first document", "second document"]
    assert rows[0]["response"] == [] and rows[0]["kto_tag"] is None


def test_multimodal_columns_are_refused_at_plan(tmp_path):
    mine = write_dataset(tmp_path, "mm.json", [], formatting="sharegpt",
                         columns={"messages": "messages", "images": "images"})
    with pytest.raises(DataError, match="column 'images' \\(images\\) is multimodal input"):
        align.plan(mine, fetch.plan(mine, streaming=False), Recipe())


def test_a_row_is_named_by_its_file_where_the_files_can_be_counted():
    import datasets

    from tasks.sources import located, row_origin

    rows = datasets.Dataset.from_list([{"a": i} for i in range(5)])
    counted = located(rows, ("x.jsonl", "y.jsonl"), [2, 3])
    assert [row_origin(row) for row in counted.select([1, 2, 4])] == [
        "file x.jsonl, row 1", "file y.jsonl, row 0", "file y.jsonl, row 2"]
    uncounted = located(rows, ("x.csv", "y.csv"), None)  # CSV files are not counted up front
    assert row_origin(uncounted[3]) == "row 3 of the folder's files in name order"
    assert row_origin(located(rows, (), None)[4]) == "row 4"
    from tasks.encoding import row_location  # tokenize's messages say the same, after the dataset

    assert row_location({"file": "*", "row": 3, "dataset": "dataset 'x'"}) == (
        "dataset 'x', row 3 of the folder's files in name order")
