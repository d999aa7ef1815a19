"""Finetuning methods and optimizers really run: which parameters changed, how many trained, which optimizer class
stepped, the loss falling, and the artifact loading back (each on the tiny model, a few steps)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from flows.plan import plan_run
from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe
from tasks.core.stage import run_in_process
from tasks.core.store import ArtifactStore
from tests.conftest import tiny_recipe_values

FULL = {"finetuning_type": "full", "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("methods-store")


def plan_train(values: dict):
    """The steps a recipe's train step needs, in order (no merge or evaluation)."""
    plan = plan_run(Recipe.from_flat(values))
    needed, wanted = [], {"train"}
    for step in reversed(plan.steps):
        if step.label in wanted:
            needed.append(step)
            wanted |= set(step.inputs.values())
    return list(reversed(needed))


def train(store, model_dir, **overrides):
    """Train the tiny model; returns (train artifact, its results, its log's losses)."""
    defaults = {"max_steps": 8, "logging_steps": 1, "save_steps": 100, "learning_rate": 5e-3}
    values = tiny_recipe_values(model_dir, **{**defaults, **overrides})
    refs = run_in_process(plan_train(values), store)
    artifact = ArtifactStore(store).open(refs["train"])
    results = json.loads(artifact.part("results").read_text())
    losses = [e["loss"] for e in json.loads(artifact.part("log_history").read_text()) if "loss" in e]
    return artifact, results, losses


def base_weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, value in after.items() if not torch.equal(value.float(), before[name].float())}


def falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_freeze_modules_and_extra_modules(store, tiny_model_dir):
    artifact, results, losses = train(store, tiny_model_dir, finetuning_type="freeze", freeze_trainable_layers=1,
                                      freeze_trainable_modules="mlp", freeze_extra_modules="norm")
    after = load_file(str(artifact.part("model") / "model.safetensors"))
    moved = changed(base_weights(tiny_model_dir), after)
    assert moved == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {"model.norm.weight"}
    assert results["trainable_parameters"] == 3 * 32 * 64 + 32
    assert results["optimizer"] == "torch.optim.adamw.AdamW" and falls(losses)


def test_freeze_finds_layers_by_structure():
    """Layer discovery follows the decoder's ModuleList, whatever it is called."""
    from torch import nn

    from tasks.train_methods import FreezeSettings, check_trainable, decoder_layers, freeze_selection

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.ffn = nn.Linear(4, 4), nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.h = nn.ModuleList([Block() for _ in range(3)])
            self.heads = nn.ModuleList([nn.Linear(4, 4), nn.Conv1d(4, 4, 1)])  # mixed classes: not the layers

    assert decoder_layers(Odd()) == ("h", 3)
    picked = freeze_selection(Odd(), FreezeSettings(trainable_layers=-1, trainable_modules=("ffn",),
                                                     extra_modules=("embed",)))
    assert picked == {"h.0.ffn.weight", "h.0.ffn.bias", "embed.weight"}
    with pytest.raises(RecipeError, match="key 'freeze_trainable_modules': no 'mlp'"):
        freeze_selection(Odd(), FreezeSettings(trainable_layers=1, trainable_modules=("mlp",)))
    with pytest.raises(RecipeError, match="key 'freeze_extra_modules': no 'norm'"):
        freeze_selection(Odd(), FreezeSettings(trainable_layers=1, extra_modules=("norm",)))
    # no layers, the extra modules alone (LlamaFactory accepts freeze_trainable_layers: 0 so)
    assert freeze_selection(Odd(), FreezeSettings(trainable_layers=0, extra_modules=("embed",))) == {"embed.weight"}
    check_trainable(Odd, None, FreezeSettings(trainable_layers=0, extra_modules=("embed",)))
    with pytest.raises(RecipeError, match="key 'freeze_trainable_layers': 0 leaves nothing sensible to train"):
        check_trainable(Odd, None, FreezeSettings(trainable_layers=0))


def test_lora_additional_target(store, tiny_model_dir):
    artifact, results, losses = train(store, tiny_model_dir, additional_target="norm", lora_target="q_proj")
    saved = load_file(str(artifact.part("adapter") / "adapter_model.safetensors"))
    assert any("norm" in name and "lora" not in name for name in saved)  # the full module is saved with it
    lora = 2 * 2 * 4 * 32  # q_proj A and B, rank 4, hidden 32, two layers
    # PEFT matches modules_to_save by name suffix: model.norm and the four *_layernorm modules, 32 weights each
    assert results["trainable_parameters"] == lora + 5 * 32 and falls(losses)
    assert json.loads((artifact.part("adapter") / "adapter_config.json").read_text())["modules_to_save"] == ["norm"]


@pytest.mark.parametrize("whole", [None, "norm"])
def test_pissa_converted_adapter_fits_the_original_base(store, tiny_model_dir, whole):
    """With modules trained whole (additional_target, or a grown vocabulary's embedding and head), PEFT's
    conversion dropped them and the adapter no longer loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    artifact, results, losses = train(store, tiny_model_dir, pissa_init=True, pissa_iter=4, pissa_convert=True,
                                      lora_target="q_proj,v_proj", additional_target=whole)
    config = json.loads((artifact.part("adapter") / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # rank 2r, a plain LoRA
    assert falls(losses)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                      str(artifact.part("adapter")))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    tuned = model(input_ids=ids).logits
    with model.disable_adapter():
        plain = model(input_ids=ids).logits
    assert not torch.allclose(tuned, plain)  # it learned something, and applies to the unchanged base
    if whole:
        trained_norm = load_file(str(artifact.part("adapter") / "adapter_model.safetensors"))
        assert not torch.equal(trained_norm["base_model.model.model.norm.weight"], base_weights(tiny_model_dir)[
            "model.norm.weight"])


def test_create_new_adapter_merges_the_old_one(store, tiny_model_dir, tmp_path):
    first, _, _ = train(store, tiny_model_dir, lora_target="q_proj")
    artifact, results, losses = train(store, tiny_model_dir, lora_target="v_proj",
                                      adapter_name_or_path=str(first.part("adapter")), create_new_adapter=True)
    config = json.loads((artifact.part("adapter") / "adapter_config.json").read_text())
    assert config["target_modules"] == ["v_proj"]  # a new adapter, not the continued q_proj one
    assert results["trainable_parameters"] == 2 * 2 * 4 * 32 and falls(losses)
    # The merged (and evaluated, exported) model is the one trained: base + old adapter + new adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    values = tiny_recipe_values(tiny_model_dir, max_steps=8, logging_steps=1, save_steps=100, learning_rate=5e-3,
                                lora_target="v_proj", adapter_name_or_path=str(first.part("adapter")),
                                create_new_adapter=True)
    plan = plan_run(Recipe.from_flat(values))
    needed = [step for step in plan if step.stage.name not in ("evaluate", "exam", "export")]
    merged = ArtifactStore(store).open(run_in_process(needed, store)["merge"])
    trained = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    trained = PeftModel.from_pretrained(trained, str(first.part("adapter"))).merge_and_unload()
    trained = PeftModel.from_pretrained(trained, str(artifact.part("adapter"))).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(str(merged.part("model")))(input_ids=ids).logits,
                              expected, atol=1e-5)
    from flows.serving import trained_model

    assert trained_model(tmp_path / "r.yaml", Recipe.from_flat(values), str(store)) == (merged.part("model"), None)


def test_loraplus_groups(store, tiny_model_dir):
    from tasks.optimizers import OptimizerFactory, OptimizerSettings

    artifact, results, losses = train(store, tiny_model_dir, loraplus_lr_ratio=16.0)
    assert results["optimizer"] == "torch.optim.adamw.AdamW" and falls(losses)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from tasks.train_methods import LoraSettings, lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), lora_config(
        LoraSettings(rank=4, alpha=8, dropout=0.0, target="all", use_dora=False, use_rslora=False)))
    arguments = TrainingArguments(output_dir="unused", learning_rate=1e-3, use_cpu=True, report_to="none")
    settings = OptimizerSettings(kind="loraplus", options={"lr_ratio": 16.0, "lr_embedding": 1e-6})
    optimizer = OptimizerFactory()(model, settings=settings, arguments=arguments)
    rates = {group["lr"] for group in optimizer.param_groups if group["params"]}
    assert rates == {1e-3, 16e-3}  # B matrices learn 16 times faster


def test_loraplus_gives_the_embedding_rate_to_the_embeddings_b_matrix_only(tiny_model_dir):
    """As LlamaFactory's LoRA+ does: an embedding's A matrix learns at learning_rate like every A matrix (PEFT's
    create_loraplus_optimizer gave it loraplus_lr_embedding too)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from tasks.optimizers import OptimizerFactory, OptimizerSettings
    from tasks.train_methods import LoraSettings, lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), lora_config(
        LoraSettings(rank=4, alpha=8, dropout=0.0, target="q_proj,embed_tokens", use_dora=False, use_rslora=False)))
    arguments = TrainingArguments(output_dir="unused", learning_rate=1e-3, use_cpu=True, report_to="none")
    settings = OptimizerSettings(kind="loraplus", options={"lr_ratio": 16.0, "lr_embedding": 1e-6})
    optimizer = OptimizerFactory()(model, settings=settings, arguments=arguments)
    names = {id(p): n.removeprefix("base_model.model.") for n, p in model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rates["model.embed_tokens.lora_embedding_A.default"] == 1e-3
    assert rates["model.embed_tokens.lora_embedding_B.default"] == 1e-6
    assert rates["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == 1e-3
    assert rates["model.layers.0.self_attn.q_proj.lora_B.default.weight"] == 16e-3


@pytest.mark.parametrize(("keys", "optimizer"), [
    ({"use_galore": True, "galore_rank": 4, "galore_update_interval": 2}, "galore_torch.adamw.AdamW"),
    ({"use_galore": True, "galore_rank": 4, "galore_layerwise": True, "galore_target": "mlp"},
     "galore_torch.adamw.AdamW"),
    ({"use_apollo": True, "apollo_rank": 4, "apollo_update_interval": 2}, "apollo_torch.apollo.AdamW"),
    ({"use_adam_mini": True}, "adam_mini.adam_mini.Adam_mini"),
    ({"use_muon": True}, "tasks.muon.MuonAdamW"),
])
def test_full_tuning_optimizers(store, tiny_model_dir, keys, optimizer):
    artifact, results, losses = train(store, tiny_model_dir, **FULL, **keys)
    assert results["optimizer"] == optimizer
    assert falls(losses), losses
    after = load_file(str(artifact.part("model") / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight" in changed(base_weights(tiny_model_dir), after)


def test_badam_layer_mode_updates_one_block_at_a_time(store, tiny_model_dir):
    artifact, results, losses = train(store, tiny_model_dir, **FULL, use_badam=True, badam_switch_interval=4,
                                      badam_start_block=0, max_steps=3)
    moved = changed(base_weights(tiny_model_dir), load_file(str(artifact.part("model") / "model.safetensors")))
    # BAdam switches after the step that ends a block's turn: 3 steps with an interval of 4 are all block 0's
    assert moved and all(name.startswith("model.layers.0.") for name in moved)
    assert results["optimizer"] == "badam.block_optim.BlockOptimizer"
    assert results["trainable_parameters"] < sum(v.numel() for v in base_weights(tiny_model_dir).values()) / 2


def test_badam_under_bf16_trains_the_model_in_bf16_as_llamafactory_loads_it(store, tiny_model_dir, monkeypatch):
    """BAdam keeps fp32 copies of the block it trains and expects the model in half precision: under bf16 mixed
    precision (the CPU probe set, so this runs on any CPU) the base loads in bf16, not as fp32 weights that BAdam
    would train in place."""
    from badam import BlockOptimizer

    from tasks.core import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    stepped = []
    monkeypatch.setattr(BlockOptimizer, "step", lambda self, *args, original=BlockOptimizer.step, **kwargs: (
        stepped.append({p.dtype for group in self.param_groups for p in group["params"]}),
        original(self, *args, **kwargs))[1])
    artifact, results, losses = train(store, tiny_model_dir, **FULL, use_badam=True, badam_switch_interval=4,
                                      badam_start_block=0, max_steps=3, bf16=True)
    assert json.loads((artifact.path / "manifest.json").read_text())["config"]["precision"] == "bf16"
    assert results["optimizer"] == "badam.block_optim.BlockOptimizer"
    assert stepped == [{torch.bfloat16}] * 3  # the model's weights BAdam steps (its fp32 copies are its own)
    weights = load_file(str(artifact.part("model") / "model.safetensors"))
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
    rounded = {name: value.to(torch.bfloat16) for name, value in base_weights(tiny_model_dir).items()}
    moved = changed(rounded, weights)
    assert moved and all(name.startswith("model.layers.0.") for name in moved)


def test_badam_ratio_mode_updates_a_share_of_each_matrix(store, tiny_model_dir):
    """Ratio mode's gradients are sparse; the Trainer still clips and logs their norm (SparseGradClipping)."""
    ratio = 0.1
    artifact, results, losses = train(store, tiny_model_dir, **FULL, use_badam=True, badam_mode="ratio",
                                      badam_update_ratio=ratio, max_steps=6, max_grad_norm=0.5)
    assert results["optimizer"] == "badam.block_optim.BlockOptimizerRatio"
    assert falls(losses), losses
    log = json.loads(artifact.part("log_history").read_text())
    norms = [e["grad_norm"] for e in log if "grad_norm" in e]
    assert len(norms) == 6 and all(n > 0 for n in norms)
    before = base_weights(tiny_model_dir)
    after = load_file(str(artifact.part("model") / "model.safetensors"))
    matrices = [n for n, v in before.items() if v.ndim == 2 and n.startswith("model.layers.")]
    assert matrices and set(matrices) <= changed(before, after)
    for name in matrices:  # one mask per step-window (BAdam switches it every 100 steps): the same entries move
        share = (after[name].float() != before[name].float()).float().mean().item()
        assert ratio / 2 < share <= ratio, (name, share)
    assert torch.equal(after["model.embed_tokens.weight"].float(), before["model.embed_tokens.weight"].float())


def test_badam_ratio_sparse_grads_clip_as_dense_ones():
    from tasks.optimizers import clip_sparse_grads

    torch.manual_seed(0)
    grads = [torch.randn(8, 8) * (torch.rand(8, 8) < 0.2), torch.randn(5)]
    sparse = [torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(5))]
    dense = [torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(5))]
    sparse[0].grad, sparse[1].grad = grads[0].to_sparse(), grads[1].clone()
    dense[0].grad, dense[1].grad = grads[0].clone(), grads[1].clone()
    assert torch.allclose(clip_sparse_grads(sparse, float("inf")), torch.nn.utils.clip_grad_norm_(dense, float("inf")))
    assert torch.allclose(clip_sparse_grads(sparse, 0.5), torch.nn.utils.clip_grad_norm_(dense, 0.5))
    assert sparse[0].grad.is_sparse and torch.allclose(sparse[0].grad.to_dense(), dense[0].grad)
    assert torch.allclose(sparse[1].grad, dense[1].grad)


def test_neftune_and_pure_bf16(store, tiny_model_dir):
    _, plain, _ = train(store, tiny_model_dir)
    _, noisy, _ = train(store, tiny_model_dir, neftune_noise_alpha=5.0)
    assert noisy["train_loss"] != plain["train_loss"]  # the same run, with noise on the embeddings
    # NEFTune's noise is alpha / sqrt(row length * hidden): on one flattened row of the whole batch it was
    # sqrt(batch) times weaker than on LlamaFactory's padded batches, so a NEFTune run pads.
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from tasks.lean_training import FlatCollator, use_varlen_attention
    from tasks.train import collator_for

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    use_varlen_attention(model)
    tokenizer, data = AutoTokenizer.from_pretrained(str(tiny_model_dir)), SimpleNamespace(info={})
    assert isinstance(collator_for(data, tokenizer, model), FlatCollator)
    assert isinstance(collator_for(data, tokenizer, model, neftune=True), DataCollatorForSeq2Seq)
    # Neat-packed rows: transformers' own classes keep the samples apart by their position_ids (tests/
    # test_packing); a model with its own code is not known to, and its samples would attend to each other.
    from tasks.core.errors import RecipeError
    from tasks.packing import PackedCollator

    packed = SimpleNamespace(info={"position_ids": True})
    assert isinstance(collator_for(packed, tokenizer, model, neftune=True), PackedCollator)
    remote = type("RemoteLlama", (type(model),), {"__module__": "transformers_modules.someone.modeling"})
    model.__class__ = remote
    with pytest.raises(RecipeError, match="key 'neat_packing': this model runs its own code"):
        collator_for(packed, tokenizer, model)
    artifact, results, losses = train(store, tiny_model_dir, **{**FULL, "learning_rate": 1e-2}, pure_bf16=True)
    weights = load_file(str(artifact.part("model") / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16} and falls(losses)


@pytest.mark.parametrize(("keys", "message"), [
    ({"use_galore": True}, "key 'use_galore' trains full weights"),
    ({**FULL, "use_galore": True, "use_badam": True}, "keys 'use_galore' and 'use_badam' each choose the optimizer"),
    ({**FULL, "loraplus_lr_ratio": 2.0}, "key 'loraplus_lr_ratio' applies to finetuning_type: lora"),
    ({**FULL, "use_dora": True}, "key 'use_dora' applies to finetuning_type: lora \\(got full\\)"),
    ({"finetuning_type": "freeze", "use_rslora": True}, "key 'use_rslora' applies to finetuning_type: lora"),
    ({"freeze_extra_modules": "embed_tokens"}, "key 'freeze_extra_modules' applies to finetuning_type: freeze"),
    ({"pissa_init": True}, "key 'pissa_init' needs 'pissa_convert: true'"),
    ({**FULL, "adapter_name_or_path": "a"}, "key 'adapter_name_or_path' applies to finetuning_type: lora"),
    ({"pissa_init": True, "pissa_convert": True, "quantization_bit": 4}, "keys 'pissa_init' and 'quantization_bit'"),
    ({"create_new_adapter": True}, "key 'create_new_adapter' needs 'adapter_name_or_path'"),
    ({"lr_scheduler_type": "cosine_with_min_lr"}, "key 'lr_scheduler_kwargs': cosine_with_min_lr needs min_lr or"),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, "reduce_lr_on_plateau steps on evaluation during training"),
    ({"lr_scheduler_kwargs": {"min_lr": 1e-6}}, "key 'lr_scheduler_kwargs': cosine takes no min_lr"),
    ({"lr_scheduler_kwargs": "{min_lr"}, "key 'lr_scheduler_kwargs': .*not a mapping or JSON text"),
    ({"create_new_adapter": True, "adapter_name_or_path": "a", "quantization_bit": 4},
     "key 'create_new_adapter' merges the adapter into the base, which cannot be done exactly on quantized"),
    ({**FULL, "use_galore": True, "galore_layerwise": True, "gradient_accumulation_steps": 2},
     "key 'galore_layerwise'"),
    ({"module_dropout": 0.1}, "key 'module_dropout' is OFT's"),
    ({"shift_attn": True}, "key 'shift_attn'"),
    ({"use_unsloth": True}, "key 'use_unsloth'"),
    ({"finetuning_type": "freeze", "use_badam": True}, "key 'use_badam'"),
    ({**FULL, "use_badam": True, "badam_mode": "ratio", "deepspeed": "configs/deepspeed/ds_z2_config.json"},
     "key 'badam_mode': ratio runs in one plain process"),
    ({**FULL, "use_badam": True, "badam_mode": "ratio", "nproc_per_node": 2},
     "key 'use_badam' on several ranks needs badam_mode: layer"),
    ({"quantization_bit": 4, "deepspeed": "configs/deepspeed/ds_z3_config.json"},
     "keys 'deepspeed' \\(ZeRO-3\\) and 'quantization_bit'"),
    ({**FULL, "use_galore": True, "deepspeed": "configs/deepspeed/ds_z2_config.json"},
     "keys 'use_galore' and 'deepspeed'"),
    ({"deepspeed": "configs/deepspeed/ds_z2_config.json", "fsdp": "full_shard"}, "keys 'deepspeed' and 'fsdp'"),
    # each of these passed planning and then crashed inside the ranks
    ({**FULL, "use_badam": True, "deepspeed": "configs/deepspeed/ds_z2_config.json"},
     "key 'use_badam' \\(badam_mode: layer\\) supports DeepSpeed ZeRO-3 only"),
    ({**FULL, "use_muon": True, "deepspeed": "configs/deepspeed/ds_z2_config.json"},
     "keys 'use_muon' and 'deepspeed' cannot be combined"),
    ({**FULL, "use_adam_mini": True, "deepspeed": "configs/deepspeed/ds_z3_config.json"},
     "keys 'use_adam_mini' and 'deepspeed' cannot be combined"),
    ({"create_new_adapter": True, "adapter_name_or_path": "a", "deepspeed": "configs/deepspeed/ds_z3_config.json"},
     "keys 'create_new_adapter' and 'deepspeed' \\(ZeRO-3\\) cannot be combined"),
    ({"quantization_bit": 4, "fsdp": "full_shard auto_wrap"}, "keys 'fsdp' and 'quantization_bit' cannot be combined"),
    ({"nnodes": 2, "node_rank": 2, "master_port": 29500}, "key 'node_rank' must be below nnodes"),
    ({"deepspeed": "nowhere.json"}, "key 'deepspeed': config file not found"),
    ({"stage": "pt", "neat_packing": True}, "key 'neat_packing' applies to stage sft only"),
    ({"dataset": "a,b", "eval_dataset": "c,d,e", "mix_strategy": "interleave_under", "interleave_probs": "0.5,0.5"},
     "key 'interleave_probs' gives 2 probabilities for 3 datasets in 'eval_dataset'"),
    ({"streaming": True, "max_steps": 2, "packing": True}, "keys 'streaming' and 'packing'/'neat_packing'"),
])
def test_combinations_are_refused_naming_the_keys(tiny_model_dir, keys, message):
    from tests.conftest import REPO

    values = {k: str(REPO / v) if k == "deepspeed" and v != "nowhere.json" else v for k, v in keys.items()}
    with pytest.raises(RecipeError, match=message):
        Recipe.from_flat(tiny_recipe_values(tiny_model_dir, **values))


def test_plan_time_refusals(tiny_model_dir):
    with pytest.raises(RecipeError, match="key 'additional_target': no module named 'nope'"):
        plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, additional_target="nope")))
    with pytest.raises(RecipeError, match="key 'freeze_trainable_modules'"):
        plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, finetuning_type="freeze",
                                                     freeze_trainable_modules="attention")))
    with pytest.raises(RecipeError, match="key 'enable_liger_kernel'"):
        plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, enable_liger_kernel=True)))
    with pytest.raises(RecipeError, match="key 'optim': use_apollo works with adamw_torch"):
        plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, **FULL, use_apollo=True, optim="sgd")))


def test_dotted_targets_name_modules_as_peft_matches_them(tiny_model_dir):
    """PEFT (and so LlamaFactory) takes a target's last dotted parts: `self_attn.q_proj` wraps every layer's q_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, lora_target="self_attn.q_proj,mlp.up_proj",
                                                 additional_target="model.norm")))
    with pytest.raises(RecipeError, match="key 'lora_target': no module named 'mlp.q_proj'"):
        plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, lora_target="mlp.q_proj")))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(target_modules=["self_attn.q_proj"]))
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert wrapped == [f"base_model.model.model.layers.{i}.self_attn.q_proj" for i in (0, 1)]


def test_trainable_checks_make_the_structure_once_and_only_when_they_need_names(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tasks.train_methods import FreezeSettings, LoraSettings, check_trainable

    calls = []

    def structure():
        calls.append(1)
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))

    def lora(target="all", extra=()):
        return LoraSettings(rank=4, alpha=8, dropout=0.0, target=target, additional_target=extra,
                            use_dora=False, use_rslora=False)

    check_trainable(structure, lora(), None)
    assert calls == []  # "all" needs no module names: planning does not import the modeling code
    with pytest.raises(RecipeError, match="key 'lora_target': no module named 'nope'"):
        check_trainable(structure, lora("q_proj,nope", extra=("norm",)), None)
    assert calls == [1]  # two checks, one structure
    check_trainable(structure, None, FreezeSettings(trainable_layers=1))
    assert len(calls) == 2
    check_trainable(lambda: None, lora("nope"), FreezeSettings(trainable_layers=99))  # no structure: no check


@pytest.mark.parametrize(("precision", "kind", "dtype"), [
    ("bf16", "full", torch.float32), ("fp16", "freeze", torch.float32), ("pure_bf16", "full", torch.bfloat16)])
def test_trainable_weights_train_in_fp32_under_mixed_precision(tiny_model_dir, precision, kind, dtype):
    """A half-precision base under bf16/fp16 mixed precision: what trains is upcast to fp32 (pure_bf16: kept)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from tasks.train_methods import FreezeSettings, attach_trainable

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    config = SimpleNamespace(finetuning_type=kind, lora=None, quantization=None, precision=precision, optimizer=None,
                             gradient_checkpointing=False,
                             freeze=FreezeSettings(trainable_layers=1) if kind == "freeze" else None)
    model = attach_trainable(model, config)
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {dtype} and frozen <= {torch.bfloat16}


def test_a_freeze_tuned_reward_model_trains_its_new_score_head(tiny_model_dir):
    """The score head of a classifier is new and random: freezing it trained the layers against a fixed random
    projection."""
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification

    from tasks.train_methods import FreezeSettings, attach_trainable

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    config = SimpleNamespace(finetuning_type="freeze", lora=None, quantization=None, precision="fp32", optimizer=None,
                             gradient_checkpointing=False, freeze=FreezeSettings(trainable_layers=1))
    model = attach_trainable(model, config, task_type="SEQ_CLS")
    assert model.score.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad


@pytest.mark.parametrize(("ratio", "steps"), [(0.5, 50), (1.0, 100)])
def test_warmup_ratio_warms_up_that_share_of_the_steps(tiny_model_dir, tmp_path, ratio, steps):
    """transformers 5 reads warmup_steps below 1 as a ratio and 1.0 as one step: a whole-run warm-up was 1 step."""
    from transformers import TrainingArguments

    from tasks.train_common import arguments_values

    config = plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, warmup_ratio=ratio)))["train"].config
    assert TrainingArguments(**arguments_values(config, tmp_path)).get_warmup_steps(100) == steps


def test_scheduler_arguments_reach_the_scheduler(store, tiny_model_dir):
    """cosine_with_min_lr and warmup_stable_decay need their own arguments: without lr_scheduler_kwargs they were
    accepted and failed mid-run with a traceback."""
    artifact, _, _ = train(store, tiny_model_dir, lr_scheduler_type="cosine_with_min_lr",
                           lr_scheduler_kwargs='{"min_lr_rate": 0.5}')  # JSON text, as LlamaFactory's CLI gives it
    rates = [e["learning_rate"] for e in json.loads(artifact.part("log_history").read_text()) if "learning_rate" in e]
    assert min(rates) >= 0.5 * 5e-3 * 0.99 and rates[-1] < rates[0]  # decays, but not below min_lr_rate


@pytest.mark.parametrize("optimizer", ["loraplus", "galore", "galore_layerwise", "apollo"])
def test_every_optimizer_decays_the_weights_the_trainer_decays(tiny_model_dir, tmp_path, optimizer):
    """weight_decay reached neither LoRA+ (PEFT reads loraplus_weight_decay) nor GaLore and APOLLO (transformers
    builds their groups without it); LlamaFactory decays all but norms and biases for each of them."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from tasks.lean_training import trainer_class
    from tasks.optimizers import OptimizerFactory, OptimizerSettings, low_rank_arguments
    from tasks.train_methods import LoraSettings, lora_config

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    common = {"output_dir": str(tmp_path), "learning_rate": 1e-3, "weight_decay": 0.1, "use_cpu": True,
              "report_to": "none"}
    if optimizer == "loraplus":
        model = get_peft_model(model, lora_config(LoraSettings(rank=4, alpha=8, dropout=0.0, target="all",
                                                               use_dora=False, use_rslora=False)))
        settings = OptimizerSettings(kind="loraplus", options={"lr_ratio": 16.0, "lr_embedding": 1e-6})
        groups = OptimizerFactory()(model, settings=settings, arguments=TrainingArguments(**common)).param_groups
    else:
        kind, layerwise = optimizer.split("_")[0], optimizer.endswith("layerwise")
        options = {"target": "all", "rank": 4, "update_interval": 200, "scale": 0.25, "proj_type": "std",
                   "layerwise": layerwise} | ({"proj": "random", "scale_type": "channel"} if kind == "apollo" else {})
        arguments = TrainingArguments(**common, **low_rank_arguments(OptimizerSettings(kind=kind, options=options),
                                                                     "adamw_torch"))
        trainer = trainer_class()(model=model, args=arguments)
        trainer.create_optimizer()
        inner = getattr(trainer.optimizer, "optimizer_dict", None)
        groups = [g for o in inner.values() for g in o.param_groups] if inner else trainer.optimizer.param_groups
        assert any("rank" in g and g["weight_decay"] == 0.1 for g in groups)  # the low-rank weights decay
    names = {id(p): n for n, p in model.named_parameters()}
    decays = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decays) == trained
    assert all((value == 0.0) == ("norm" in name or "bias" in name) for name, value in decays.items()), decays


def test_a_saved_adapter_config_lists_its_targets_in_one_order(tiny_model_dir, tmp_path):
    """PEFT saved target_modules in a set's order, which differs between processes (PYTHONHASHSEED): a rebuilt
    adapter was not byte-identical, and the merge and everything after it were rebuilt too."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from tasks.train_methods import LoraSettings, attach_trainable

    lora = LoraSettings(rank=4, alpha=8, dropout=0.0, target="all", use_dora=False, use_rslora=False)
    config = SimpleNamespace(finetuning_type="lora", lora=lora, quantization=None, precision="fp32", optimizer=None,
                             gradient_checkpointing=False, freeze=None)
    model = attach_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    leaves = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert saved == sorted(saved) and {name.rsplit(".", 1)[-1] for name in saved} == set(leaves)
