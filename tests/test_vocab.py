"""Vocabulary changes: a template's missing stop token is refused by name, or added with resize_vocab;
new embedding rows start at the mean of the old ones and are trained, so the tuned model emits them."""

from __future__ import annotations

import json

import pytest

from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe
from tasks.model import vocabulary_values
from tasks.templates import get_template
from tasks.vocab import check_template_tokens, grow_vocabulary, read_descriptions
from tests.conftest import BUNDLED_DATA, tiny_recipe_values


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_missing_template_stop_token_is_refused_by_name(tiny):
    _, tokenizer = tiny
    with pytest.raises(RecipeError, match=r"'llama3' ends replies with '<\|eot_id\|>'.*resize_vocab: true"):
        check_template_tokens(tokenizer, get_template("llama3"))
    check_template_tokens(tokenizer, get_template("chatml"))  # <|im_end|> is there


def test_resize_vocab_adds_the_templates_stop_tokens(tiny_model_dir):
    values = vocabulary_values(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, template="llama3",
                                                                   resize_vocab=True)))
    assert values["special_tokens"] == ("<|eot_id|>", "<|eom_id|>") and values["init"] == "noise_init"
    plain = vocabulary_values(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, template="llama3")))
    assert plain["special_tokens"] == () and plain["init"] is None  # nothing added: nothing keyed


def test_new_rows_start_at_the_mean_of_the_old(tiny):
    import torch

    model, tokenizer = tiny
    old = model.get_input_embeddings().weight.detach().clone()
    grown = grow_vocabulary(model, tokenizer, ("plainword",), ("<|eot_id|>",), "desc_init", {}, resize=False)
    assert grown["added_tokens"] == ["plainword", "<|eot_id|>"] and grown["vocab_size"] == old.shape[0] + 2
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == old.shape[0] + 2 and torch.equal(weight[: old.shape[0]], old)
    for row in grown["added_token_ids"]:  # desc_init without a description: the plain mean, no noise
        assert torch.allclose(weight[row], old.mean(dim=0), atol=1e-6)
    assert len(tokenizer.encode("<|eot_id|>", add_special_tokens=False)) == 1
    assert model.get_output_embeddings().weight is weight  # still tied


def test_description_init_and_noise(tiny, tmp_path):
    import torch

    model, tokenizer = tiny
    old = model.get_input_embeddings().weight.detach().clone()
    (tmp_path / "tokens.yaml").write_text("'<|tool|>': 'def return'\n")
    descriptions = read_descriptions(str(tmp_path / "tokens.yaml"))
    grown = grow_vocabulary(model, tokenizer, (), tuple(descriptions), "desc_init", descriptions, resize=False)
    ids = tokenizer.encode("def return", add_special_tokens=False)
    row = model.get_input_embeddings().weight[grown["added_token_ids"][0]]
    assert torch.allclose(row, old[ids].mean(dim=0), atol=1e-6)
    torch.manual_seed(0)
    grown = grow_vocabulary(model, tokenizer, (), ("<|x|>",), "noise_init", {}, resize=False)
    noisy = model.get_input_embeddings().weight[grown["added_token_ids"][0]]
    assert not torch.allclose(noisy, old.mean(dim=0))
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(RecipeError, match="new_special_tokens_config.*description"):
        read_descriptions(str(tmp_path / "bad.yaml"))
    with pytest.raises(RecipeError, match="'init_special_tokens': desc_init needs 'new_special_tokens_config'"):
        Recipe.from_flat({"init_special_tokens": "desc_init"})


def eot_rank(model, tokenizer, pairs) -> list[bool]:
    """Whether <|eot_id|> is the model's top next token right after each training reply's content."""
    import torch

    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    hits = []
    for source, target in pairs:
        ids = torch.tensor([source + target[:-1]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        hits.append(int(logits.argmax()) == eot)
    return hits


def test_a_lora_tuned_model_learns_to_emit_the_added_stop_token(tiny):
    import torch

    from tasks.templates import encode_pairs, supervised_example
    from tasks.train_methods import LoraSettings, attach_trainable

    model, tokenizer = tiny
    template = get_template("llama3")
    grow_vocabulary(model, tokenizer, (), template.stop_words, "noise_init", {}, resize=True)
    check_template_tokens(tokenizer, template)  # now there
    rows = [json.loads(line) for line in (BUNDLED_DATA / "pydoc_summaries_train.jsonl").read_text().splitlines()[:4]]
    conversations = [[{"role": "user", "content": r["input"][:80]}, {"role": "assistant", "content": r["output"][:60]}]
                     for r in rows]
    pairs = [encode_pairs(tokenizer, template, c, "")[0] for c in conversations]
    assert all(target[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>") for _, target in pairs)
    assert not any(eot_rank(model, tokenizer, pairs))

    class Config:
        finetuning_type, quantization, gradient_checkpointing, freeze, precision = "lora", None, False, None, "fp32"
        lora = LoraSettings(rank=4, alpha=8, dropout=0.0, target="all", use_dora=False, use_rslora=False)

    peft_model = attach_trainable(model, Config, train_embeddings=True)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad and "embed_tokens" in n]
    assert trainable, "the embedding (tied to the head) must train"
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    for _ in range(40):
        for source, target in pairs:
            input_ids, labels = supervised_example([(source, target)], 256, train_on_prompt=False,
                                                   mask_history=False)
            loss = peft_model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    peft_model.eval()
    assert all(eot_rank(peft_model, tokenizer, pairs))


def test_the_pipeline_adds_trains_and_merges_the_stop_tokens(write_recipe, workdir):
    from flows.finetune import finetune
    from tasks.core.recipe import load_recipe
    from tasks.core.store import ArtifactStore

    options = {"template": "llama3", "do_eval": False, "max_samples": 8}
    with pytest.raises(RecipeError, match=r"ends replies with '<\|eot_id\|>'"):
        finetune(load_recipe(write_recipe("refused.yaml", **options)))
    summary = finetune(load_recipe(write_recipe(**options, resize_vocab=True)))
    store = ArtifactStore(str(workdir / "artifacts"))
    key = {s.label: s.key for s in summary.stages}
    base = store.lookup("model", key["model"])
    assert base.info["added_tokens"] == ["<|eot_id|>", "<|eom_id|>"]
    adapter = json.loads((store.lookup("train", key["train"]).part("adapter") / "adapter_config.json").read_text())
    assert "embed_tokens" in adapter["modules_to_save"]  # the head is tied to it in the tiny model
    from transformers import AutoConfig, AutoTokenizer

    merged = store.lookup("merge", key["merge"]).part("model")
    assert AutoConfig.from_pretrained(merged).vocab_size == base.info["vocab_size"]
    assert AutoTokenizer.from_pretrained(merged).convert_tokens_to_ids("<|eot_id|>") == base.info["added_token_ids"][0]


def test_split_special_tokens_reaches_the_saved_tokenizer(tiny_model_dir):
    from tasks.model import ModelConfig, load_source

    config = ModelConfig(source="x", source_kind="local", dtype="float32", trust_remote_code=False,
                         split_special_tokens=True)
    _, tokenizer, _ = load_source({"kind": "local", "path": str(tiny_model_dir), "gguf_file": ""}, config)
    assert len(tokenizer.encode("<|im_end|>", add_special_tokens=False)) > 1
