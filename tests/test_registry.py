"""The dataset registry: LlamaFactory's dataset_info.json (and .yaml) parse; bad entries name file, dataset, field."""

import json

import pytest
import yaml

from tasks.core.errors import DataError, RecipeError
from tasks.core.registry import load_registry, resolve_datasets

# A slice of LlamaFactory's own dataset_info.json: every kind of entry it uses.
LLAMAFACTORY_INFO = {
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "glaive_toolcall_en_demo": {
        "file_name": "glaive_toolcall_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    },
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en",
                  "om_hub_url": "HaM/alpaca_en"},
    "pinned": {"hf_hub_url": "org/data", "revision": "v1.0", "subset": "en", "split": "validation",
               "folder": "python", "num_samples": 100},
    "deepctrl": {"ms_hub_url": "deepctrl/deepctrl-sft-data"},
    "ultrachat_200k": {
        "hf_hub_url": "HuggingFaceH4/ultrachat_200k",
        "split": "train_sft",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "dpo_en_demo": {
        "file_name": "dpo_en_demo.json",
        "ranking": True,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
    },
    "nectar_rm": {"hf_hub_url": "AstraMindAI/RLAIF-Nectar", "ranking": True},
    "kto_en_demo": {
        "file_name": "kto_en_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    "mllm_demo": {
        "file_name": "mllm_demo.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
    },
    "chat": {"file_name": "chat.jsonl", "formatting": "openai"},
}


@pytest.fixture
def info_dir(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps(LLAMAFACTORY_INFO))
    return tmp_path


def test_llamafactory_registry_parses_with_its_defaults(info_dir):
    registry = load_registry(info_dir)
    assert set(LLAMAFACTORY_INFO) <= set(registry)
    demo = registry["alpaca_en_demo"]
    assert demo.local_path == info_dir / "alpaca_en_demo.json"
    assert demo.column_map()["prompt"] == "instruction" and demo.column_map()["query"] == "input"
    assert demo.column_map()["response"] == "output" and demo.column_map()["history"] is None
    assert demo.defaulted_columns() == ["prompt", "query", "response"]
    assert demo.tag_map() == {}
    pinned = registry["pinned"]
    assert (pinned.hf_hub_url, pinned.revision, pinned.subset, pinned.split, pinned.folder, pinned.num_samples) == (
        "org/data", "v1.0", "en", "validation", "python", 100)
    assert registry["glaive_toolcall_en_demo"].column_map()["tools"] == "tools"


def test_columns_block_replaces_defaults_and_tags_fill_in(info_dir):
    registry = load_registry(info_dir)
    c4 = registry["c4_demo"].column_map()
    assert c4["prompt"] == "text" and c4["response"] is None and c4["query"] is None  # a pretraining set
    assert registry["c4_demo"].defaulted_columns() == []
    tags = registry["ultrachat_200k"].tag_map()
    assert tags["role_tag"] == "role" and tags["user_tag"] == "user" and tags["system_tag"] == "system"
    assert tags["observation_tag"] == "observation" and tags["function_tag"] == "function_call"
    nectar = registry["nectar_rm"].column_map()
    assert (nectar["chosen"], nectar["rejected"]) == ("chosen", "rejected")
    assert registry["dpo_en_demo"].ranking and registry["kto_en_demo"].column_map()["kto_tag"] == "label"
    chat = registry["chat"]
    assert chat.column_map()["messages"] == "messages" and chat.tag_map()["role_tag"] == "role"
    assert chat.tag_map()["observation_tag"] == "tool"


def test_yaml_registry_beside_json(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))
    (tmp_path / "dataset_info.yaml").write_text(
        yaml.safe_dump({"b": {"file_name": "b.jsonl", "formatting": "sharegpt", "columns": {"messages": "turns"}}})
    )
    registry = load_registry(tmp_path)
    assert registry["a"].file_name == "a.json"
    assert registry["b"].column_map()["messages"] == "turns" and registry["b"].local_path == tmp_path / "b.jsonl"


def test_yaml_registry_alone_and_unknown_name_names_it(tmp_path):
    (tmp_path / "dataset_info.yaml").write_text("mine:\n  file_name: mine.jsonl\n")
    assert [e.name for e in resolve_datasets("mine", tmp_path, "dataset")] == ["mine"]
    with pytest.raises(RecipeError, match=r"dataset 'mne' is not in .*dataset_info\.yaml"):
        resolve_datasets("mne", tmp_path, "dataset")


def test_same_name_in_json_and_yaml_is_an_error(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))
    (tmp_path / "dataset_info.yaml").write_text("a:\n  file_name: other.json\n")
    with pytest.raises(DataError, match=r"dataset_info\.yaml: dataset 'a' is also declared in .*dataset_info\.json"):
        load_registry(tmp_path)


def test_unsupported_source_is_refused_when_used(info_dir):
    with pytest.raises(DataError) as err:
        resolve_datasets("deepctrl", info_dir, "dataset")
    assert str(err.value).startswith(f"{info_dir / 'dataset_info.json'}: dataset 'deepctrl', field 'ms_hub_url'")


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"file_nme": "a.json"}, "file_nme", "did you mean 'file_name'"),
        ({"file_name": "a.json", "ranking": "maybe"}, "ranking", "boolean"),
        ({"file_name": "a.json", "formatting": "chatml"}, "formatting", "alpaca"),
        ({"file_name": "a.json", "num_samples": 0}, "num_samples", "greater than 0"),
        ({"file_name": "a.json", "columns": {"promt": "q"}}, "columns.promt", "did you mean 'prompt'"),
        ({"file_name": "a.json", "formatting": "sharegpt", "columns": {"prompt": "q"}}, "columns.prompt",
         "not a sharegpt column"),
        ({"file_name": "a.json", "formatting": "sharegpt", "tags": {"role": "r"}}, "tags.role",
         "did you mean 'role_tag'"),
        ({"file_name": "a.json", "tags": {"role_tag": "r"}}, "tags", "sharegpt and openai"),
        ({"file_name": "a.json", "columns": {"response": "out"}}, "columns.prompt", "required"),
        ({"file_name": "a.json", "ranking": True, "columns": {"prompt": "q", "kto_tag": "k"}}, "ranking", "KTO"),
        ({"formatting": "alpaca"}, "file_name", "'file_name' or 'hf_hub_url'"),
    ],
)
def test_bad_entry_names_file_dataset_and_field(tmp_path, fields, field, words):
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps({"ok": {"file_name": "ok.json"}, "broken": fields}))
    with pytest.raises(DataError) as err:
        load_registry(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}: dataset 'broken', field '{field}': ") and words in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "text", "words"),
    [
        ("dataset_info.json", "{", "not valid JSON"),
        ("dataset_info.yaml", "a: [", "not valid YAML"),
        ("dataset_info.yaml", "- a\n- b\n", "a mapping of dataset names"),
        ("dataset_info.yaml", "a: just-a-file.json\n", "dataset 'a': an entry is a mapping"),
    ],
)
def test_unreadable_registry_names_the_file(tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as err:
        load_registry(tmp_path)
    assert str(err.value).startswith(str(tmp_path / name)) and words in str(err.value)
    assert "\n" not in str(err.value)
