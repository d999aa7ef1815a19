"""tunefactory export: an adapter merged into its base, in the asked format, with a chat template that renders
the training template's text; and the adapter in output_dir is portable."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from flows.cli import main
from flows.finetune import finetune
from tasks.core.recipe import load_recipe
from tasks.ollama import to_go_template
from tasks.templates import format_pairs, get_template

CONVERSATION = [{"role": "user", "content": "Summarise `abc.abstractmethod`."},
                {"role": "assistant", "content": "A decorator indicating abstract methods."}]


@pytest.fixture
def trained(write_recipe, workdir):
    """A tiny LoRA run whose adapter is copied to output_dir."""
    summary = finetune(load_recipe(write_recipe(max_samples=8, output_dir=str(workdir / "saves"))))
    return summary


def test_export_merges_the_adapter_with_the_training_template(trained, write_recipe, workdir, tiny_model_dir):
    adapter_id = next(f"{s.stage}/{s.key}" for s in trained.stages if s.stage == "train")
    recipe = write_recipe("export.yaml", adapter_name_or_path=adapter_id, export_dir=str(workdir / "exported"),
                          export_legacy_format=True, template="chatml", do_train=False)
    assert main(["export", str(recipe)]) == 0
    exported = workdir / "exported"
    assert (exported / "pytorch_model.bin").is_file() and not list(exported.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(exported)
    pairs = format_pairs(get_template("chatml"), CONVERSATION, "", tokenizer.bos_token, tokenizer.eos_token)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == "".join(p + r for p, r in pairs)
    merged = AutoModelForCausalLM.from_pretrained(exported)
    adapter_dir = workdir / "artifacts" / adapter_id / "adapter"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    ids = torch.tensor([tokenizer.encode("def register(cls, subclass):")])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
    ends = GenerationConfig.from_pretrained(exported).eos_token_id  # generate() stops where a chatml turn ends
    assert ends == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])  # EOS first
    ollama = (exported / "Modelfile").read_text()  # Ollama imports the folder with the training template
    go = to_go_template(get_template("chatml"), tokenizer.bos_token, tokenizer.eos_token)
    assert f'TEMPLATE """{go}"""' in ollama
    assert 'PARAMETER stop "<|im_end|>"\n' in ollama and 'PARAMETER stop "<|im_start|>"\n' in ollama
    assert ollama.endswith("PARAMETER num_ctx 512\n")  # the tiny model's context
    assert main(["export", str(recipe)]) == 0  # again: every stage cached, the folder rewritten
    assert main(["data", "preview", str(recipe)]) == 0  # the artifact id is looked up in the same store

    # No template named and none in the tokenizer: training used `default` with the recipe's system prompt, and
    # so does the exported chat template (it dropped the system prompt).
    recipe = write_recipe("export2.yaml", adapter_name_or_path=adapter_id, export_dir=str(workdir / "exported2"),
                          template=None, default_system="You summarise Python docs.", do_train=False)
    assert main(["export", str(recipe)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(workdir / "exported2")
    training = AutoTokenizer.from_pretrained(tiny_model_dir)  # what tokenize resolved the template against
    template = get_template(None, training, default_system="You summarise Python docs.")
    pairs = format_pairs(template, CONVERSATION, "", tokenizer.bos_token, tokenizer.eos_token)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == "".join(p + r for p, r in pairs) and "You summarise Python docs." in rendered


def test_the_adapter_in_output_dir_loads_on_its_own(trained, workdir, tiny_model_dir):
    saves = workdir / "saves"
    settings = json.loads((saves / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(tiny_model_dir)  # the model the user gave
    assert (saves / "tokenizer.json").is_file()
    model = AutoPeftModelForCausalLM.from_pretrained(saves)
    assert model.active_adapter == "default"
    AutoTokenizer.from_pretrained(saves)


def test_export_and_evaluation_follow_what_the_recipe_trains(trained, write_recipe, workdir, capsys):
    """A recipe that trains exports its trained model (it exported the bare base); one that does not train but
    names adapter_name_or_path scores and serves the base with that adapter (as LlamaFactory evaluates model +
    adapter; the adapter was dropped)."""
    from flows.plan import plan_run
    from flows.serving import trained_model
    from tasks.core.store import ArtifactStore

    recipe = write_recipe(max_samples=8, output_dir=str(workdir / "saves"), export_dir=str(workdir / "exported"))
    assert main(["export", str(recipe)]) == 0  # the run's own stages, cached
    merged_key = next(s.key for s in trained.stages if s.stage == "merge")
    expected = AutoModelForCausalLM.from_pretrained(workdir / "artifacts" / "merge" / merged_key / "model")
    exported = AutoModelForCausalLM.from_pretrained(workdir / "exported")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, expected(ids).logits)
    assert main(["export", str(write_recipe("rm.yaml", stage="rm", dataset="pydoc_preferences", eval_dataset=None,
                                            export_dir=str(workdir / "rm")))]) == 1
    assert "stage rm trains a reward model" in capsys.readouterr().err

    adapter_id = next(f"{s.stage}/{s.key}" for s in trained.stages if s.stage == "train")
    recipe = load_recipe(write_recipe("eval.yaml", adapter_name_or_path=adapter_id, do_train=False))
    plan = plan_run(recipe, ArtifactStore())
    assert plan["evaluate[tuned]"].inputs["model"] == "merge" and "evaluate[base]" not in plan.labels()
    exporting = plan_run(recipe.replace(export_dir=str(workdir / "exp")), ArtifactStore())  # it was ignored
    assert exporting["export"].inputs["model"] == "merge"
    model_dir, adapter_dir = trained_model(workdir / "eval.yaml", recipe, None)
    assert adapter_dir is None and model_dir.parent.parent.name == "merge"
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.model_name_or_path),
                                          str(workdir / "artifacts" / adapter_id / "adapter"))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)


def test_a_full_fine_tune_exports_in_infer_dtype(write_recipe, workdir):
    """Full tuning trains (and merge re-saves) fp32 weights; export wrote them so, at twice the size of the
    infer_dtype asked for (LlamaFactory's export casts to it)."""
    from safetensors.torch import load_file

    recipe = write_recipe(finetuning_type="full", infer_dtype="bfloat16", max_samples=8, max_steps=2, do_eval=False,
                          export_dir=str(workdir / "exported"))
    assert main(["run", str(recipe)]) == 0
    weights = load_file(str(workdir / "exported" / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(workdir / "exported").dtype == torch.bfloat16
    assert AutoConfig.from_pretrained(workdir / "exported").use_cache  # not the Trainer's training-time false


def test_legacy_format_names_tensors_as_the_checkpoint_does(write_recipe, workdir, tiny_model_dir):
    """transformers 5 fuses a Mixtral's experts in memory; the .bin held those internal names, which a
    transformers 4 (or any other) reader of the format does not know."""
    import shutil

    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = workdir / "mixtral"
    MixtralForCausalLM(MixtralConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                                     num_experts_per_tok=1)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    recipe = write_recipe(model_name_or_path=str(folder), do_train=False, export_legacy_format=True,
                          export_dir=str(workdir / "exported"))
    assert main(["export", str(recipe)]) == 0
    legacy = torch.load(workdir / "exported" / "pytorch_model.bin", weights_only=True)
    assert set(legacy) == set(load_file(str(folder / "model.safetensors")))  # e.g. ...experts.0.w1.weight
    reloaded = AutoModelForCausalLM.from_pretrained(workdir / "exported")
    original = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)


def test_legacy_format_keeps_a_remote_code_models_own_modules(tmp_path):
    """A trust_remote_code model's configuration and modeling files went missing from the .bin export."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.export import save_legacy

    source = tmp_path / "remote"
    source.mkdir()
    (source / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\nclass TinyConfig(LlamaConfig):\n    model_type = 'tinyremote'\n")
    (source / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_tiny import TinyConfig\n"
        "class TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=["TinyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (source / "config.json").write_text(json.dumps(config))
    save_legacy(AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True), tmp_path / "out", "5GB")
    assert {"configuration_tiny.py", "modeling_tiny.py", "pytorch_model.bin"} <= {p.name for p in
                                                                                   (tmp_path / "out").iterdir()}
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)).__name__ == \
        "TinyForCausalLM"


def test_the_exported_end_ids_put_eos_first_and_keep_what_the_model_shipped():
    """Qwen2.5-Instruct ships [<|im_end|>, <|endoftext|>]: the template's stop words replaced that list."""
    from types import SimpleNamespace

    from tasks.export import end_at_turns_end

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 2]))
    end_at_turns_end(model, 1, [0, 1])
    assert model.generation_config.eos_token_id == [1, 2, 0]
    single = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    end_at_turns_end(single, 5, [5])
    assert single.generation_config.eos_token_id == 5
