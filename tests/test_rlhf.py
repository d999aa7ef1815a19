"""rm, dpo (every pref_loss), kto and ppo on the tiny model: each trains, its loss falls, its artifact loads back;
DPO under LoRA keeps one base in memory; PPO's shared reward model scores as the rm does; PPO's log-probs come
from the head at reply positions only; PPO raises a reward;
a ppo recipe chained on sft and rm recipes builds them once and reuses them; PPO and rm under bf16 mixed precision."""

import json
import math

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from flows.cli import main
from flows.plan import plan_run
from tasks import ppo, ppo_loop, reward_trainer
from tasks.core.recipe import Recipe
from tasks.core.stage import run_in_process
from tasks.core.store import ArtifactStore
from tests.conftest import tiny_recipe_values

PAIRS = {"dataset": "pydoc_preferences", "eval_dataset": "pydoc_preferences_test"}
FEEDBACK = {"dataset": "pydoc_feedback", "eval_dataset": "pydoc_feedback_test"}
TRAINERS = ("train", "reward", "preference", "ppo")


def run(model_dir, home, **values):
    """Plan and build a tiny recipe in this process; returns (plan, refs by label, store)."""
    recipe = Recipe.from_flat(tiny_recipe_values(model_dir, **{"max_samples": 8, "max_steps": 16,
                                                                "per_device_train_batch_size": 4,
                                                                "learning_rate": 2e-2, "logging_steps": 1,
                                                                "max_new_tokens": 4, **values}))
    plan = plan_run(recipe)
    return plan, run_in_process(plan.steps, home), ArtifactStore(home)


def trained(plan, refs, store):
    step = next(s for s in plan if s.stage.name in TRAINERS and ":" not in s.label)
    return store.lookup(step.stage.name, refs[step.label].key)


def losses(artifact) -> list[float]:
    return [entry["loss"] for entry in json.loads(artifact.part("log_history").read_text()) if "loss" in entry]


def falls(values: list[float]) -> bool:
    return sum(values[-3:]) / 3 < sum(values[:3]) / 3


def test_reward_model_trains_and_ppo_scores_with_it_as_the_rm_does(tiny_model_dir, tmp_path, monkeypatch):
    flattened, collate = [], reward_trainer.FlatPairCollator.__call__
    monkeypatch.setattr(reward_trainer.FlatPairCollator, "__call__",
                        lambda self, rows: flattened.append(len(rows)) or collate(self, rows))
    plan, refs, store = run(tiny_model_dir, tmp_path, stage="rm", **PAIRS)
    reward = trained(plan, refs, store)
    assert reward.kind == "reward_model" and falls(losses(reward))
    assert flattened.count(4) >= 16  # every training step on an unpadded batch of 4 pairs
    results = json.loads(reward.part("results").read_text())
    assert 0 <= results["eval_accuracy"] <= 1 and "eval_margin" in results
    assert results["tokens_trained"] > 0 and results["tokens_per_second"] > 0
    # The rm as a classifier with its adapter, against PPO's shared model (reward adapter + head on one base).
    base_dir = store.lookup("model", refs["model"].key).part("model")
    classifier = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=1)
    classifier.config.pad_token_id = 0
    classifier = PeftModel.from_pretrained(classifier, str(reward.part("adapter"))).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                       str(reward.part("adapter")), adapter_name="default")  # any policy adapter
    ppo_loop.load_reward_adapter(policy, reward.part("adapter"))
    head = ppo_loop.linear_head(load_file(str(reward.part("value_head")))["weight"], trainable=False)
    shared = ppo_loop.SharedModel(policy, head, head, pad_id=0)
    padded = (torch.tensor([[5, 17, 42, 8, 9], [7, 3, 11, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    # Where pad is EOS, a reply's closing EOS is attended but not pooled: scored at the token before it, as the rm.
    closed = (torch.tensor([[5, 17, 42, 8, 0], [7, 3, 11, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]))
    for ids, mask in (padded, closed):
        with torch.no_grad():
            expected = classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert shared.scores(ids, mask).tolist() == pytest.approx(expected.tolist(), abs=1e-4)


def test_reward_model_under_pure_bf16_trains_in_bf16(tiny_model_dir, tmp_path):
    """pure_bf16 loads the rm's classifier in bf16 as it does the other stages' models (it loaded the checkpoint's
    fp32 here, and trained in fp32): its score head trains in bf16 (peft keeps LoRA factors in fp32 either way)."""
    plan, refs, store = run(tiny_model_dir, tmp_path, stage="rm", pure_bf16=True, max_steps=2, **PAIRS)
    weights = load_file(str(trained(plan, refs, store).part("adapter") / "adapter_model.safetensors"))
    assert weights["base_model.model.score.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("pref_loss", ["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"])
def test_dpo_losses_train(tiny_model_dir, tmp_path_factory, pref_loss):
    home = tmp_path_factory.getbasetemp() / "dpo-store"  # one store: the data and model stages are shared
    extra = {"dpo_label_smoothing": 0.1} if pref_loss == "sigmoid" else {}
    plan, refs, store = run(tiny_model_dir, home, stage="dpo", pref_loss=pref_loss, pref_ftx=0.1, **PAIRS, **extra)
    policy = trained(plan, refs, store)
    assert policy.kind == "adapter" and falls(losses(policy))
    history = json.loads(policy.part("log_history").read_text())
    assert "rewards/accuracies" in history[0] and "rewards/margins" in history[0]
    results = json.loads(policy.part("results").read_text())
    assert results["tokens_trained"] > 0 and results["tokens_per_second"] > 0
    evaluated = store.lookup("evaluate", refs["evaluate[tuned]"].key)
    assert {"pair_accuracy", "pair_margin", "rougeL", "perplexity"} <= set(evaluated.info)
    base_dir = store.lookup("model", refs["model"].key).part("model")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(policy.part("adapter")))


def test_preference_losses_are_averaged_over_accumulated_batches(tiny_model_dir, tmp_path):
    """At the first step the policy is the reference (LoRA starts as a no-op), so DPO's sigmoid loss is ln 2 and
    KTO's 0.5 whatever the batch. Accumulating two batches logged (and stepped on) their sum."""
    for stage, data, expected in (("dpo", PAIRS, math.log(2)), ("kto", FEEDBACK, 0.5)):
        plan, refs, store = run(tiny_model_dir, tmp_path, stage=stage, **data, max_steps=1,
                                per_device_train_batch_size=2, gradient_accumulation_steps=2)
        assert losses(trained(plan, refs, store))[0] == pytest.approx(expected, abs=1e-3), stage


def test_dpo_with_lora_keeps_one_base_in_memory(tiny_model_dir, tmp_path, monkeypatch):
    plan = plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, stage="dpo", max_steps=2, **PAIRS)))
    step = plan["dpo"]
    assert step.config.reference == "adapters_off" and "reference" not in step.inputs
    before = [s for s in plan if s.label != "dpo" and s.stage.name != "evaluate" and s.stage.name != "merge"]
    run_in_process(before, tmp_path)
    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    run_in_process([*before, step], tmp_path)
    assert len(loads) == 1  # the policy; the reference is the same model with its adapter disabled


def test_kto_trains(tiny_model_dir, tmp_path):
    plan, refs, store = run(tiny_model_dir, tmp_path, stage="kto", pref_ftx=0.1, **FEEDBACK)
    policy = trained(plan, refs, store)
    assert falls(losses(policy))
    history = json.loads(policy.part("log_history").read_text())
    assert any("kl" in entry for entry in history)
    assert json.loads(policy.part("results").read_text())["tokens_trained"] > 0


def test_ppo_log_probs_from_the_head_at_reply_positions_equal_the_full_logits_ones(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    critic = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
    shared = ppo_loop.SharedModel(policy, critic, None)
    ids = torch.tensor([[5, 17, 42, 8, 9, 3], [7, 3, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # prompts of 3 and 2 tokens
    heads = []
    policy.get_output_embeddings().register_forward_hook(lambda module, args, output: heads.append(args[0].shape))
    logprobs, values = shared.logprobs_and_values(ids, mask, response)
    assert heads == [torch.Size([5, policy.config.hidden_size])]  # the 5 reply positions, not 2 x 5
    with torch.no_grad():
        full = policy(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    expected = torch.gather(full, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * response
    assert torch.allclose(logprobs, expected, atol=1e-5) and values.shape == response.shape


def test_ppo_passes_on_unpadded_rows_equal_the_padded_ones(tiny_model_dir):
    """flat: the backbone runs a batch's real tokens as one row, attended sequence by sequence. Log-probs,
    values, the reference's log-probs, the scores, and the gradients of the policy and the critic equal the
    padded batch's (fp32); the values at pads, which every reader masks out, are not compared."""
    from peft import LoraConfig, get_peft_model

    from tasks.lean_training import use_varlen_attention

    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    policy.add_adapter(ppo_loop.REWARD, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    policy.set_adapter(ppo_loop.POLICY)
    critic = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
    reward_head = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
    use_varlen_attention(policy)
    ids = torch.tensor([[5, 17, 42, 8, 9, 3, 0], [7, 3, 11, 12, 0, 0, 0], [9, 9, 4, 21, 30, 31, 32]])
    mask = (torch.arange(7) < torch.tensor([[6], [4], [7]])).long()
    response = torch.zeros(3, 6)
    response[0, 2:5], response[1, 1:3], response[2, 3:6] = 1, 1, 1  # the last row's reply ends the batch
    rows = []
    policy.get_input_embeddings().register_forward_hook(lambda module, args, output: rows.append(args[0].shape))
    results = {}
    for flat in (False, True):
        shared = ppo_loop.SharedModel(policy, critic, reward_head, flat=flat)
        policy.zero_grad()
        critic.zero_grad()
        logprobs, values = shared.logprobs_and_values(ids, mask, response)
        (logprobs.sum() + (values * response).sum()).backward()
        gradients = [p.grad.clone() for p in [*policy.parameters(), *critic.parameters()] if p.grad is not None]
        reference = shared.reference_logprobs(ids, mask, response)
        results[flat] = [logprobs.detach(), (values * response).detach(), reference, shared.scores(ids, mask),
                         *gradients]
    assert rows[:3] == [torch.Size([3, 7])] * 3 and rows[3:] == [torch.Size([1, 64])] * 3  # 17 tokens, on the grid
    assert len(results[True]) == len(results[False]) > 4
    for padded, flat in zip(results[False], results[True], strict=True):
        assert torch.allclose(padded, flat, atol=1e-5), (padded - flat).abs().max()


def test_ppo_forward_passes_run_under_bf16_autocast_with_fp32_heads(tiny_model_dir):
    """Under bf16 mixed precision PPO's own loop autocasts its forward passes as the Trainer-run stages do (the
    frozen weights are held in bf16, so without autocast they would not even run), while the critic and reward
    heads stay fp32. Log-probs and values match the fp32 model's to bf16 precision."""
    from peft import LoraConfig, get_peft_model

    from tasks.train_methods import hold_frozen_weights_in_bf16

    def shared_model(precision):
        torch.manual_seed(0)
        policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules="all-linear"))
        policy.add_adapter(ppo_loop.REWARD, LoraConfig(r=4, target_modules="all-linear"))
        policy.set_adapter(ppo_loop.POLICY)
        torch.manual_seed(1)
        critic = torch.nn.Linear(policy.config.hidden_size, 1, bias=False)
        if precision == "bf16":
            hold_frozen_weights_in_bf16(policy)
        return ppo_loop.SharedModel(policy, critic, critic, precision=precision)

    ids = torch.tensor([[5, 17, 42, 8, 9, 3], [7, 3, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    mixed, exact = shared_model("bf16"), shared_model("fp32")
    seen = []
    mixed.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append((torch.is_autocast_enabled("cpu"), output.dtype)))
    mixed.critic.register_forward_hook(lambda module, args, output: seen.append(("critic", output.dtype)))
    logprobs, values = mixed.logprobs_and_values(ids, mask, response)
    assert seen == [(True, torch.bfloat16), ("critic", torch.float32)]
    assert logprobs.dtype == values.dtype == torch.float32
    expected_logprobs, expected_values = exact.logprobs_and_values(ids, mask, response)
    assert torch.allclose(logprobs, expected_logprobs, atol=0.1) and not torch.equal(logprobs, expected_logprobs)
    assert torch.allclose(values, expected_values, atol=0.05)
    assert mixed.scores(ids, mask).dtype == torch.float32
    rollout = ppo.Rollout(max_new_tokens=3, do_sample=False, temperature=None, top_p=None, top_k=None,
                          repetition_penalty=1.0)
    generation = {"stop_token_ids": [2], "pad_token_id": 0}
    replies = ppo_loop.sample_replies(mixed, [[5, 17, 42], [7, 3]], rollout, generation, 2)
    assert [len(reply) for reply in replies] == [3, 3]


class RuleRewardModel(ppo_loop.SharedModel):
    """A reward model paying for each reply token among the first 100 of the vocabulary (the prompts hold none):
    a synthetic task PPO can learn in a few steps."""

    low, reply_length = 100, 3

    @torch.no_grad()
    def scores(self, ids, mask):
        return ((ids < self.low) & mask.bool()).sum(-1).float() / self.reply_length


SYNTHETIC_PROMPTS = [[101, 202, 303], [404, 505, 506], [307, 208], [110, 211, 312, 413]] * 2
SYNTHETIC_GENERATION = {"stop_token_ids": [599], "pad_token_id": 0}


def synthetic_ppo(tiny_model_dir, folder, score_norm: bool = False, **values):
    """The synthetic task's PPO config and a function that makes its shared model afresh (the same each time)."""
    from transformers import LlamaForCausalLM

    from tasks.train_methods import attach_trainable, load_base
    from tests.conftest import tiny_llama_config

    # Initialised with larger weights than the shared tiny model, whose near-uniform next-token distribution a
    # rank-8 adapter can barely tilt: here the policy can learn to prefer tokens.
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(600, initializer_range=0.4, tie_word_embeddings=True)).save_pretrained(folder)
    recipe = Recipe.from_flat(tiny_recipe_values(tiny_model_dir, stage="ppo", reward_model="unused",
                                                 **{"learning_rate": 2e-2, "max_steps": 30, "lora_rank": 8,
                                                    "per_device_train_batch_size": 8,
                                                    "lr_scheduler_type": "constant", **values}))
    config = ppo.PPOConfig(**ppo.training_values(recipe), ppo=ppo.PPOSettings(
        buffer_size=1, epochs=4, score_norm=score_norm, target_kl=6.0, whiten_rewards=False, init_kl_coef=0.01),
        rollout=ppo.Rollout(max_new_tokens=3, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                            repetition_penalty=1.0), reward_type="lora", reward_quantization=None)

    def fresh() -> RuleRewardModel:
        torch.manual_seed(0)
        model = attach_trainable(load_base(folder, config), config)
        return RuleRewardModel(model, torch.nn.Linear(32, 1, bias=False), None)

    return config, fresh


def test_ppo_raises_the_mean_reward_on_a_synthetic_task(tiny_model_dir, tmp_path):
    config, fresh = synthetic_ppo(tiny_model_dir, tmp_path)
    history = ppo_loop.train_ppo(fresh(), SYNTHETIC_PROMPTS, config, SYNTHETIC_GENERATION)
    first, last = history[:5], history[-5:]
    assert sum(h["reward"] for h in last) / 5 > sum(h["reward"] for h in first) / 5 + 0.3


def test_ppo_with_gradient_checkpointing_learns_the_same(tiny_model_dir, tmp_path):
    config, fresh = synthetic_ppo(tiny_model_dir, tmp_path, max_steps=3)
    plain = ppo_loop.train_ppo(fresh(), SYNTHETIC_PROMPTS, config, SYNTHETIC_GENERATION)
    shared = fresh()
    shared.model.gradient_checkpointing_enable()
    checkpointed = ppo_loop.train_ppo(shared, SYNTHETIC_PROMPTS, config, SYNTHETIC_GENERATION)
    assert shared.model.get_base_model().is_gradient_checkpointing
    assert [h["loss"] for h in checkpointed] == pytest.approx([h["loss"] for h in plain], rel=1e-5)


def test_ppo_chains_on_sft_and_rm_recipes_all_under_bf16(tiny_model_dir, write_recipe, workdir, capsys, monkeypatch):
    """Under `bf16: true` on a CPU with bf16 instructions (the probe is set, so this runs on any CPU): every stage
    of the chain trains under bf16 mixed precision, rm and ppo with their frozen weights held in bf16."""
    from tasks import reward
    from tasks.core import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    held = {}
    for module in (reward, ppo):
        def hold_and_record(model, config, cast=module.cast_frozen_weights_for_autocast, stage=module.STAGE.name):
            cast(model, config)
            held[stage] = {p.dtype for n, p in model.named_parameters() if p.ndim == 2 and ".default." not in n}
        monkeypatch.setattr(module, "cast_frozen_weights_for_autocast", hold_and_record)
    flat = []
    shared_init = ppo_loop.SharedModel.__init__

    checkpointed = []

    def recording_init(self, *args, **kwargs):
        flat.append(kwargs["flat"])
        checkpointed.append(args[0].get_base_model().is_gradient_checkpointing)
        shared_init(self, *args, **kwargs)
    monkeypatch.setattr(ppo_loop.SharedModel, "__init__", recording_init)
    common = {"max_samples": 8, "max_steps": 2, "per_device_train_batch_size": 4, "max_new_tokens": 3, "bf16": True}
    sft = write_recipe("sft.yaml", **common)
    rm = write_recipe("rm.yaml", stage="rm", **PAIRS, **common)
    chained = write_recipe("ppo.yaml", stage="ppo", adapter_name_or_path=str(sft), reward_model=str(rm), **common,
                           disable_gradient_checkpointing=False)
    assert main(["run", "--dry-run", str(chained)]) == 0
    out = capsys.readouterr().out
    assert "sft:train" in out and "rm:reward" in out and "ppo" in out and out.count("cached") == 0
    assert main(["run", str(chained)]) == 0
    assert main(["run", "--dry-run", str(chained)]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[0]: line.split()[-1] for line in lines if line and line.split()[0] != "store:"}
    assert status["sft:train"] == status["rm:reward"] == status["ppo"] == "cached"
    ppo_dir = next((workdir / "artifacts" / "ppo").glob("[0-9a-f]*"))
    manifest = json.loads((ppo_dir / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"data", "model", "reward", "adapter"}
    assert (ppo_dir / "value_head.safetensors").is_file()
    assert held == {"reward": {torch.bfloat16}, "ppo": {torch.bfloat16}}  # base and reward adapter; not the trained
    assert flat == [True]  # ppo's passes on unpadded rows
    assert checkpointed == [True]  # as the Trainer stages do
    precisions = {path.parent.parent.name: json.loads(path.read_text())["config"]["precision"]
                  for path in (workdir / "artifacts").glob("*/*/manifest.json") if path.parent.parent.name in TRAINERS}
    assert precisions == {"train": "bf16", "reward": "bf16", "ppo": "bf16"}
    assert yaml.safe_load(sft.read_text())["stage"] == "sft"


def test_rm_continues_an_sft_adapter_and_an_adapter_of_another_model_is_named(tiny_model_dir, tmp_path):
    """An SFT adapter as the rm's starting point crashed ('LlamaForSequenceClassification' has no attribute
    'prepare_inputs_for_generation'); one made for a model of another width gave PEFT's 280-line trace."""
    from tasks.core.errors import RecipeError
    from tasks.train_methods import starting_adapter_on
    from tests.conftest import tiny_llama_config

    plan, refs, store = run(tiny_model_dir, tmp_path, max_steps=2)
    sft = trained(plan, refs, store)
    plan, refs, store = run(tiny_model_dir, tmp_path, stage="rm", adapter_name_or_path=str(sft.part("adapter")),
                            max_steps=4, **PAIRS)
    reward = trained(plan, refs, store)
    weights = load_file(str(reward.part("adapter") / "adapter_model.safetensors"))
    assert any("score" in name for name in weights) and any("lora_A" in name for name in weights)
    assert len(losses(reward)) == 4
    from peft import get_peft_model_state_dict

    classifier = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    started = starting_adapter_on(classifier, sft.part("adapter"), "SEQ_CLS", trainable=True)
    policy = load_file(str(sft.part("adapter") / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(started)
    assert all(torch.equal(loaded[name], value) for name, value in policy.items())  # the SFT adapter goes on
    assert reward_trainer.score_head(started).weight.requires_grad  # with a trainable head
    wider = AutoModelForCausalLM.from_config(tiny_llama_config(600, hidden_size=48, intermediate_size=96))
    with pytest.raises(RecipeError, match="key 'adapter_name_or_path': .* does not fit this model"):
        starting_adapter_on(wider, sft.part("adapter"), "CAUSAL_LM", trainable=True)


@pytest.mark.parametrize(("rm_merges", "ppo_merges", "fits"), [
    (False, False, True), (True, True, True), (True, False, False), (False, True, False)])
def test_a_lora_reward_model_must_share_the_policys_merged_adapter(write_recipe, tmp_path, rm_merges, ppo_merges,
                                                                    fits):
    """PPO puts a LoRA rm's adapter on its own base; with create_new_adapter on one side only, that base lacked
    (or doubled) the SFT adapter the rm was trained on, and PPO scored with a different reward model."""
    from tasks.core.errors import RecipeError
    from tasks.core.recipe import load_recipe

    sft = write_recipe("sft.yaml")
    rm = write_recipe("rm.yaml", stage="rm", adapter_name_or_path=str(sft), create_new_adapter=rm_merges, **PAIRS)
    chained = write_recipe("ppo.yaml", stage="ppo", adapter_name_or_path=str(sft), create_new_adapter=ppo_merges,
                           reward_model=str(rm))
    if fits:
        assert any(step.stage.name == "ppo" for step in plan_run(load_recipe(chained)))
        return
    with pytest.raises(RecipeError, match="a LoRA reward model only fits the base it was trained on"):
        plan_run(load_recipe(chained))
    # An imported reward model (a folder, an artifact id) says nothing of how it was trained: it is let through.
    imported = tmp_path / "imported_rm"
    imported.mkdir()
    (imported / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (imported / "value_head.safetensors").write_bytes(b"")
    elsewhere = write_recipe("ppo_imported.yaml", stage="ppo", adapter_name_or_path=str(sft),
                             create_new_adapter=ppo_merges, reward_model=str(imported))
    assert any(step.stage.name == "ppo" for step in plan_run(load_recipe(elsewhere)))


@pytest.mark.parametrize("key", [{"ref_model": "some/model"}, {"ref_model_quantization_bit": 4}])
def test_ppo_refuses_a_separate_reference_model(write_recipe, key):
    """ppo's reference is the base with the policy adapter off; ref_model was accepted and ignored."""
    from tasks.core.errors import RecipeError
    from tasks.core.recipe import load_recipe

    rm = write_recipe("rm.yaml", stage="rm", **PAIRS)
    chained = write_recipe("ppo.yaml", stage="ppo", reward_model=str(rm), **key)
    with pytest.raises(RecipeError, match=f"key '{next(iter(key))}'.*ppo"):
        load_recipe(chained)


def test_a_lora_reward_model_with_whole_modules_is_refused_and_leaves_the_base_alone(tiny_model_dir, tmp_path):
    """An rm trained with additional_target saves those modules whole; PPO loaded them straight into the shared base,
    which changed the reference and the policy too (a grown vocabulary's embeddings were dropped instead)."""
    from peft import LoraConfig, get_peft_model

    from tasks import reward
    from tasks.core.errors import RecipeError
    from tasks.train_methods import attach_trainable

    values = tiny_recipe_values(tiny_model_dir, stage="rm", additional_target="norm", **PAIRS)
    config = reward.RewardModelConfig(**reward.training_values(Recipe.from_flat(values)))
    attach_trainable(reward.load_classifier(tiny_model_dir, config, 0), config, None,
                     task_type="SEQ_CLS").save_pretrained(tmp_path / "rm")
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                            LoraConfig(r=4, target_modules="all-linear"), adapter_name=ppo_loop.POLICY)
    before = {n: p.clone() for n, p in policy.named_parameters()}
    with pytest.raises(RecipeError, match=r"also trained whole modules .*norm.*reward_model_type: full"):
        ppo_loop.load_reward_adapter(policy, tmp_path / "rm")
    assert all(torch.equal(before[n], p) for n, p in policy.named_parameters())


def test_ppo_builds_the_optimizer_optim_names():
    """PPO's loop built AdamW whatever `optim` said, decaying biases and norms too."""
    from types import SimpleNamespace

    matrix, bias = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    for name, expected in (("sgd", torch.optim.SGD), ("adamw_torch", torch.optim.AdamW)):
        optimizer = ppo_loop.named_optimizer([matrix, bias], SimpleNamespace(optim=name, learning_rate=0.1,
                                                                              weight_decay=0.01))
        assert type(optimizer) is expected
        assert [(g["params"], g["weight_decay"]) for g in optimizer.param_groups] == [([matrix], 0.01), ([bias], 0.0)]


def test_ld_alpha_weights_the_averaged_losses_too(tiny_model_dir, tmp_path):
    """LlamaFactory applies LD-DPO's weighting before simpo / orpo / ipo average over the label tokens; here
    ld_alpha was ignored for them (the same first loss with it and without)."""
    first = {}
    for alpha in (None, 0.0):
        extra = {} if alpha is None else {"ld_alpha": alpha}
        plan, refs, store = run(tiny_model_dir, tmp_path, stage="dpo", pref_loss="simpo", max_steps=1,
                                **PAIRS, **extra)
        first[alpha] = losses(trained(plan, refs, store))[0]
    assert first[0.0] != pytest.approx(first[None], abs=1e-4)


def test_an_imported_trl_value_head_keeps_its_bias(tmp_path):
    """LlamaFactory's reward model (TRL's value head) has a bias; importing it kept only the weight, shifting every
    reward PPO read."""
    from safetensors.torch import save_file

    from tasks import adapter

    folder = tmp_path / "lf-rm"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    save_file({"unused": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    save_file({"v_head.summary.weight": torch.ones(1, 4), "v_head.summary.bias": torch.tensor([0.5])},
              str(folder / "value_head.safetensors"))
    step = adapter.plan(folder, "reward_model", "reward_model", "adapter[reward_model]")
    ref = run_in_process([step], tmp_path / "store")[step.label]
    stored = load_file(str(ArtifactStore(tmp_path / "store").open(ref).part("value_head")))
    head = ppo_loop.linear_head(stored["weight"], trainable=False, bias=stored.get("bias"))
    assert head(torch.ones(1, 4)).item() == pytest.approx(4.5)


def test_preference_training_turns_dropout_off(tiny_model_dir, tmp_path):
    """As LlamaFactory's DPO and KTO trainers: with lora_dropout the policy's pass was noisier than the reference's
    (the same model with its adapters off)."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from tasks.preference import Loss
    from tasks.preference_trainer import PreferenceTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    loss = Loss(kind="sigmoid", beta=0.1, ftx=0.0, label_smoothing=None, simpo_gamma=None, ld_alpha=None,
                desirable_weight=None, undesirable_weight=None)
    PreferenceTrainer(loss, None, model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                       report_to="none"))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)
