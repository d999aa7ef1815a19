"""Keys hold exactly what shapes a result: every recipe field, changed, changes the typed config of exactly
the stages whose output it can change (downstream stages then follow by content, see test_pipeline)."""

import json
import shutil

import pytest
import yaml

from flows.plan import plan_run
from tasks.core.errors import RecipeError
from tasks.core.hardware import cpu_has_native_bf16, has_cuda
from tasks.core.hashing import stable_hash
from tasks.core.recipe import FIELD_SECTION, Recipe
from tasks.model import BUNDLED_GGUF, bundled_model_dir
from tests.conftest import BUNDLED_DATA, REPO, tiny_recipe_values

EVALS = {"evaluate[base]", "evaluate[tuned]"}
EXAMS = {"exam[base]", "exam[tuned]"}
FETCHES, ALIGNS = {"fetch#0", "fetch#1"}, {"align#0", "align#1"}
TWO_DATASETS = {"dataset": "mine,pydoc_summaries", "eval_dataset": None, "val_size": 4}
DPO = {"stage": "dpo", "dataset": "pydoc_preferences", "eval_dataset": "pydoc_preferences_test"}
KTO = {"stage": "kto", "dataset": "pydoc_feedback", "eval_dataset": "pydoc_feedback_test"}
PPO = {"stage": "ppo", "reward_model": "{rm_recipe}"}
FULL = {"finetuning_type": "full"}
GALORE, APOLLO, BADAM = {**FULL, "use_galore": True}, {**FULL, "use_apollo": True}, {**FULL, "use_badam": True}
PISSA = {"pissa_init": True, "pissa_convert": True}


def method_cases(field: str, value, method: dict) -> list:
    """An option of an optimizer or method: no change without it, a train change with it."""
    return [({}, {field: value}, set()), (method, {field: value}, {"train"})]


# field -> cases of (recipe keys to start from, the change, the steps whose config must change).
# Steps are named by stage and position (fetch#0, align#1, ...) so renaming a dataset is not a change.
CASES = {
    "model_name_or_path": [({}, {"model_name_or_path": "{copy}"}, set()),  # same bytes elsewhere
                           ({}, {"model_name_or_path": "{altered}"}, {"model"})],
    "model_revision": [({}, {"model_revision": "v2"}, set())],
    "gguf_file": [({"model_name_or_path": None}, {"model_name_or_path": "{bundled}", "gguf_file": BUNDLED_GGUF},
                   set())],
    "infer_backend": [({}, {"infer_backend": "vllm"}, set())],  # chat and api only
    "trust_remote_code": [({}, {"trust_remote_code": True}, {"model"})],
    "infer_dtype": [({}, {"infer_dtype": "float32"}, set()), ({}, {"infer_dtype": "bfloat16"}, {"model"})],
    # auto leaves the choice to transformers (SDPA where the class supports it, else eager): its own key
    "flash_attn": [({}, {"flash_attn": "sdpa"}, {"train"} | EVALS),
                   ({}, {"flash_attn": "disabled"}, {"train"} | EVALS)],
    "quantization_bit": [({}, {"quantization_bit": 4}, {"quantize", "train"}),  # QLoRA trains on its checkpoint
                         ({"quantization_bit": 4}, {"quantization_bit": 8}, {"quantize", "train"})],
    "quantization_type": [({}, {"quantization_type": "fp4"}, set()),
                          ({"quantization_bit": 4}, {"quantization_type": "fp4"}, {"quantize", "train"}),
                          ({"quantization_bit": 8}, {"quantization_type": "fp4"}, set()),
                          # the reference model is quantized as the recipe says (it was always nf4)
                          ({**DPO, "ref_model": "{altered}", "ref_model_quantization_bit": 4},
                           {"quantization_type": "fp4"}, {"dpo"})],
    "quantization_method": [({"quantization_bit": 4}, {"quantization_method": "bnb"}, set())],  # the only one
    "double_quantization": [({}, {"double_quantization": False}, set()),
                            ({"quantization_bit": 4}, {"double_quantization": False}, {"quantize", "train"}),
                            ({**DPO, "ref_model": "{altered}", "ref_model_quantization_bit": 4},
                             {"double_quantization": False}, {"dpo"})],
    "rope_scaling": [({}, {"rope_scaling": "linear"}, {"model"})],
    "upcast_layernorm": [({}, {"upcast_layernorm": True}, {"train"})],
    "upcast_lmhead_output": [({}, {"upcast_lmhead_output": True}, {"train"})],
    "low_cpu_mem_usage": [({}, {"low_cpu_mem_usage": False}, set())],  # transformers 5 ignores it
    "train_from_scratch": [({}, {"train_from_scratch": True}, {"model"})],
    "resize_vocab": [({}, {"resize_vocab": True}, {"model"})],
    "split_special_tokens": [({}, {"split_special_tokens": True}, {"model"})],
    "add_tokens": [({}, {"add_tokens": "foo,bar"}, {"model"})],
    "add_special_tokens": [({}, {"add_special_tokens": "<|x|>"}, {"model"})],
    "new_special_tokens_config": [({}, {"new_special_tokens_config": "{tokens}"}, {"model"}),
                                  ({"new_special_tokens_config": "{tokens}"},  # the same bytes elsewhere
                                   {"new_special_tokens_config": "{tokens_copy}"}, set())],
    "init_special_tokens": [({"new_special_tokens_config": "{tokens}"}, {"init_special_tokens": "desc_init"},
                             {"model"})],
    "dataset": [({}, {"dataset": "renamed"}, set()),  # another registry name for the same file
                # the bundled entry: the same file bytes (fetch unchanged) declared with its own column mapping
                ({}, {"dataset": "pydoc_summaries"}, {"align#0"}),
                # the eval_dataset's file: the two datasets' steps are then one (fetch#1, align#1 go)
                ({}, {"dataset": "pydoc_summaries_test"}, FETCHES | ALIGNS)],
    "dataset_dir": [({}, {"dataset_dir": "{data_copy}"}, set())],
    "allow_outside_dataset_dir": [({}, {"allow_outside_dataset_dir": True}, set())],
    "eval_dataset": [({}, {"eval_dataset": "mine"}, {"fetch#1", "align#1"})],
    "template": [({}, {"template": "default"}, {"tokenize"}),
                 ({"resize_vocab": True}, {"template": "llama3"}, {"tokenize", "model"}),  # its stop tokens join
                 ({}, {"template": None}, {"tokenize"})],  # then resolved against the model's tokenizer (keyed)
    "default_system": [({}, {"default_system": "Be kind."}, {"tokenize"}),
                       ({"task": "pystdlib_test"}, {"default_system": "Be kind."}, {"tokenize"} | EXAMS)],
    "tool_format": [({}, {"tool_format": "qwen"}, {"tokenize"})],
    "enable_thinking": [({}, {"enable_thinking": False}, set()),  # chatml has no thinking blocks
                        ({"template": "qwen3"}, {"enable_thinking": False}, {"tokenize"})],
    "preserve_thinking": [({}, {"preserve_thinking": True}, set()),
                          ({"template": "qwen3"}, {"preserve_thinking": True}, {"tokenize"})],
    "cutoff_len": [({}, {"cutoff_len": 64}, {"tokenize"}),
                   ({"rope_scaling": "linear"}, {"cutoff_len": 64}, {"tokenize", "model"})],  # RoPE stretched to it
    "train_on_prompt": [({}, {"train_on_prompt": True}, {"tokenize"})],
    "mask_history": [({}, {"mask_history": True}, {"tokenize"})],
    "max_samples": [({}, {"max_samples": 12}, {"tokenize"})],
    "val_size": [({"eval_dataset": None, "val_size": 4}, {"val_size": 6}, {"tokenize"})],  # with eval_dataset: refused
    "mix_strategy": [({}, {"mix_strategy": "interleave_under"}, set()),  # one dataset per split
                     (TWO_DATASETS, {"mix_strategy": "interleave_under"}, {"tokenize"})],
    "interleave_probs": [({**TWO_DATASETS, "mix_strategy": "interleave_under"}, {"interleave_probs": "0.5,0.5"},
                          {"tokenize"})],
    "streaming": [({"max_steps": 4}, {"streaming": True}, FETCHES | {"tokenize", "train"})],
    "buffer_size": [({}, {"buffer_size": 64}, set()),
                    ({"streaming": True, "max_steps": 4}, {"buffer_size": 64}, {"train"})],
    "packing": [({}, {"packing": True}, {"tokenize"})],
    "neat_packing": [({}, {"neat_packing": True}, {"tokenize"})],
    "on_invalid_row": [({}, {"on_invalid_row": "drop"}, ALIGNS)],
    "preprocessing_num_workers": [({}, {"preprocessing_num_workers": 2}, set())],
    "overwrite_cache": [({}, {"overwrite_cache": True}, set())],
    "stage": [({}, {"stage": "pt"}, {"tokenize", "train"} | EVALS)],
    "do_train": [({}, {"do_train": False}, {"train", "merge", "evaluate[tuned]"})],
    "finetuning_type": [({}, {"finetuning_type": "full"}, {"train"})],
    "lora_rank": [({}, {"lora_rank": 16}, {"train"}), ({"finetuning_type": "full"}, {"lora_rank": 16}, set())],
    "lora_alpha": [({}, {"lora_alpha": 4}, {"train"}), ({}, {"lora_alpha": 8}, set())],  # 8: the default 2 x rank
    "lora_dropout": [({}, {"lora_dropout": 0.1}, {"train"}),
                     ({"finetuning_type": "freeze"}, {"lora_dropout": 0.1}, set())],
    "lora_target": [({}, {"lora_target": "q_proj,v_proj"}, {"train"})],
    "use_dora": [({}, {"use_dora": True}, {"train"})],
    "use_rslora": [({}, {"use_rslora": True}, {"train"})],  # with full or freeze: refused (tests/test_methods.py)
    "freeze_trainable_layers": [({}, {"freeze_trainable_layers": 1}, set()),
                                ({"finetuning_type": "freeze"}, {"freeze_trainable_layers": 1}, {"train"})],
    "enable_liger_kernel": [],  # refused at plan time without a CUDA GPU and liger-kernel (tests/test_methods.py)
    "use_unsloth": [],  # refused at recipe time
    "shift_attn": [],  # refused at recipe time
    "freeze_trainable_modules": method_cases("freeze_trainable_modules", "mlp", {"finetuning_type": "freeze"}),
    "freeze_extra_modules": [({"finetuning_type": "freeze"}, {"freeze_extra_modules": "norm"}, {"train"})],
    "additional_target": [({}, {"additional_target": "norm"}, {"train"})],
    "module_dropout": [],  # any value but 0 is refused (OFT's key)
    "loraplus_lr_ratio": [({}, {"loraplus_lr_ratio": 2.0}, {"train"})],
    "loraplus_lr_embedding": method_cases("loraplus_lr_embedding", 1e-5, {"loraplus_lr_ratio": 2.0}),
    "pissa_init": [({"pissa_convert": True}, {"pissa_init": True}, {"train"})],
    "pissa_iter": method_cases("pissa_iter", 4, PISSA),
    "pissa_convert": [({}, {"pissa_convert": True}, set())],  # required with pissa_init
    "create_new_adapter": [({"adapter_name_or_path": "{adapter}"}, {"create_new_adapter": True}, {"train"})],
    "pure_bf16": [({}, {"pure_bf16": True}, {"train"})],
    "use_galore": [(FULL, {"use_galore": True}, {"train"})],
    **{f"galore_{k}": method_cases(f"galore_{k}", v, GALORE) for k, v in (
        ("target", "mlp"), ("rank", 4), ("update_interval", 2), ("scale", 1.0), ("proj_type", "right"),
        ("layerwise", True))},
    "use_apollo": [(FULL, {"use_apollo": True}, {"train"})],
    **{f"apollo_{k}": method_cases(f"apollo_{k}", v, APOLLO) for k, v in (
        ("target", "mlp"), ("rank", 4), ("update_interval", 2), ("scale", 1.0), ("proj", "svd"),
        ("proj_type", "left"), ("scale_type", "tensor"), ("layerwise", True))},
    "apollo_scale_front": [({}, {"apollo_scale_front": True}, set())],  # refused with use_apollo
    "use_badam": [(FULL, {"use_badam": True}, {"train"})],
    "badam_mode": method_cases("badam_mode", "ratio", BADAM),
    **{f"badam_{k}": method_cases(f"badam_{k}", v, BADAM) for k, v in (
        ("start_block", 1), ("switch_mode", "descending"), ("switch_interval", 5))},
    **{f"badam_{k}": [(BADAM, {f"badam_{k}": v}, set()),  # ratio mode only
                      ({**BADAM, "badam_mode": "ratio"}, {f"badam_{k}": v}, {"train"})]
       for k, v in (("update_ratio", 0.5), ("mask_mode", "scatter"))},
    "badam_verbose": [(BADAM, {"badam_verbose": 1}, set())],  # logging only
    "use_adam_mini": [({}, {"use_adam_mini": True}, {"train"})],
    "use_muon": [({}, {"use_muon": True}, {"train"})],
    "neftune_noise_alpha": [({}, {"neftune_noise_alpha": 5.0}, {"train"})],
    # The DeepSpeed/FSDP config files are keyed by content: the same bytes elsewhere change nothing.
    "deepspeed": [({}, {"deepspeed": "{ds_z2}"}, {"train"}),
                  ({"deepspeed": "{ds_z2}"}, {"deepspeed": "{ds_copy}"}, set()),
                  ({"deepspeed": "{ds_z2}"}, {"deepspeed": "{ds_z3}"}, {"train"})],
    # FSDP is refused without a GPU (tests/test_multirank.py)
    "fsdp": [({}, {"fsdp": "full_shard auto_wrap"}, {"train"})] if has_cuda() else [],
    "fsdp_config": [({"fsdp": "full_shard"}, {"fsdp_config": "{fsdp_json}"}, {"train"})] if has_cuda() else [],
    "nproc_per_node": [({}, {"nproc_per_node": 2}, {"train"}), ({}, {"nproc_per_node": 1}, set())],  # CPU: 1
    "nnodes": [({"master_port": 29500}, {"nnodes": 2}, {"train"})],
    "node_rank": [({"nnodes": 2, "master_port": 29500}, {"node_rank": 1}, set())],  # the same run, another node
    "master_addr": [({}, {"master_addr": "10.0.0.1"}, set())],
    "master_port": [({}, {"master_port": 29501}, set())],
    "per_device_train_batch_size": [({}, {"per_device_train_batch_size": 2}, {"train"})],
    "gradient_accumulation_steps": [({}, {"gradient_accumulation_steps": 2}, {"train"})],
    "learning_rate": [({}, {"learning_rate": 1e-4}, {"train"})],
    "num_train_epochs": [({}, {"num_train_epochs": 2.0}, {"train"}),
                         ({"max_steps": 3}, {"num_train_epochs": 2.0}, set())],
    "max_steps": [({}, {"max_steps": 3}, {"train"})],
    "lr_scheduler_type": [({}, {"lr_scheduler_type": "linear"}, {"train"})],
    "lr_scheduler_kwargs": [({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 0.0}},
                             {"lr_scheduler_kwargs": {"min_lr": 1e-6}}, {"train"})],
    "warmup_ratio": [({}, {"warmup_ratio": 0.1}, {"train"}), ({"warmup_steps": 2}, {"warmup_ratio": 0.1}, set())],
    "warmup_steps": [({}, {"warmup_steps": 2}, {"train"})],
    "weight_decay": [({}, {"weight_decay": 0.1}, {"train"})],
    "max_grad_norm": [({}, {"max_grad_norm": 0.5}, {"train"})],
    "optim": [({}, {"optim": "sgd"}, {"train"})],
    # bf16 autocast where the hardware has bf16 instructions; an older CPU trains in fp32 either way
    "bf16": [({}, {"bf16": True}, {"train"} | EVALS if has_cuda() or cpu_has_native_bf16() else set()),
             # exams load the model as evaluation does: in the half precision the recipe trains in
             ({"task": "pystdlib_test"}, {"bf16": True},
              {"train"} | EVALS | EXAMS if has_cuda() or cpu_has_native_bf16() else set())],
    "fp16": [({}, {"fp16": True}, set())],
    "seed": [({}, {"seed": 7}, {"train"}), ({"eval_dataset": None, "val_size": 4}, {"seed": 7}, {"tokenize", "train"}),
             ({"do_sample": True}, {"seed": 7}, {"train"} | EVALS),
             ({"train_from_scratch": True}, {"seed": 7}, {"model", "train"})],  # the random weights' seed
    "disable_gradient_checkpointing": [({}, {"disable_gradient_checkpointing": False}, set())],
    "logging_steps": [({}, {"logging_steps": 1}, set())],
    "save_steps": [({}, {"save_steps": 1}, set())],
    "save_total_limit": [({}, {"save_total_limit": 1}, set())],
    "plot_loss": [({}, {"plot_loss": True}, set())],
    "report_to": [({}, {"report_to": "mlflow"}, set())],  # MLflow tracking is always on
    "output_dir": [({}, {"output_dir": "{out}"}, set())],
    "overwrite_output_dir": [({}, {"overwrite_output_dir": True}, set())],
    "run_name": [({}, {"run_name": "other"}, set())],
    "dataloader_num_workers": [({}, {"dataloader_num_workers": 2}, set())],
    "save_only_model": [({}, {"save_only_model": True}, {"train"})],
    "ddp_timeout": [({}, {"ddp_timeout": 60}, set())],
    "resume_from_checkpoint": [({}, {"resume_from_checkpoint": "{checkpoint}"}, {"train"})],
    "do_eval": [({}, {"do_eval": False}, EVALS)],
    "do_predict": [({}, {"do_predict": False}, EVALS)],
    "predict_with_generate": [({}, {"predict_with_generate": False}, EVALS)],
    "per_device_eval_batch_size": [({}, {"per_device_eval_batch_size": 2}, EVALS)],
    "max_new_tokens": [({}, {"max_new_tokens": 4}, EVALS), ({"do_predict": False}, {"max_new_tokens": 4}, set())],
    "do_sample": [({}, {"do_sample": True}, EVALS)],
    "temperature": [({}, {"temperature": 0.5}, set()), ({"do_sample": True}, {"temperature": 0.5}, EVALS)],
    "top_p": [({}, {"top_p": 0.5}, set()), ({"do_sample": True}, {"top_p": 0.5}, EVALS)],
    "top_k": [({}, {"top_k": 5}, set()), ({"do_sample": True}, {"top_k": 5}, EVALS)],
    "repetition_penalty": [({}, {"repetition_penalty": 1.2}, EVALS)],
    # The starting adapter is an input (keyed by its content), not a config: train's config stays.
    "adapter_name_or_path": [({}, {"adapter_name_or_path": "{adapter}"}, {"adapter[adapter_name_or_path]"}),
                             (DPO, {"adapter_name_or_path": "{sft_recipe}"},  # the sft recipe's steps join
                              {"sft:fetch#0", "sft:align#0", "sft:fetch#1", "sft:align#1", "sft:tokenize",
                               "sft:train"})],
    "pref_beta": [({}, {"pref_beta": 0.2}, set()), (DPO, {"pref_beta": 0.2}, {"dpo"}), (KTO, {"pref_beta": 0.2},
                                                                                          {"kto"})],
    "pref_ftx": [({}, {"pref_ftx": 0.5}, set()), (DPO, {"pref_ftx": 0.5}, {"dpo"})],
    "pref_loss": [(DPO, {"pref_loss": "ipo"}, {"dpo"}), (KTO, {"pref_loss": "ipo"}, set())],
    "dpo_label_smoothing": [(DPO, {"dpo_label_smoothing": 0.1}, {"dpo"}), (KTO, {"dpo_label_smoothing": 0.1}, set())],
    "kto_chosen_weight": [(KTO, {"kto_chosen_weight": 2.0}, {"kto"}), (DPO, {"kto_chosen_weight": 2.0}, set())],
    "kto_rejected_weight": [(KTO, {"kto_rejected_weight": 2.0}, {"kto"}), (DPO, {"kto_rejected_weight": 2.0}, set())],
    "simpo_gamma": [({**DPO, "pref_loss": "simpo"}, {"simpo_gamma": 1.0}, {"dpo"}), (DPO, {"simpo_gamma": 1.0}, set())],
    "ld_alpha": [(DPO, {"ld_alpha": 0.5}, {"dpo"}), ({}, {"ld_alpha": 0.5}, set())],
    "ppo_buffer_size": [(PPO, {"ppo_buffer_size": 2}, {"ppo"}), ({}, {"ppo_buffer_size": 2}, set())],
    "ppo_epochs": [(PPO, {"ppo_epochs": 2}, {"ppo"}), ({}, {"ppo_epochs": 2}, set())],
    "ppo_score_norm": [(PPO, {"ppo_score_norm": True}, {"ppo"})],
    "ppo_target": [(PPO, {"ppo_target": 3.0}, {"ppo"}), (DPO, {"ppo_target": 3.0}, set())],
    "ppo_whiten_rewards": [(PPO, {"ppo_whiten_rewards": True}, {"ppo"})],
    "ref_model": [(DPO, {"ref_model": "{altered}"}, {"model[ref]", "dpo"}), ({}, {"ref_model": "{copy}"}, set()),
                  (DPO, {"ref_model": "{copy}"}, {"dpo"})],  # the base's own bytes: one model step, used twice
    "ref_model_adapters": [],  # refused at recipe time (tests/test_bad_input.py)
    "ref_model_quantization_bit": [({**DPO, "ref_model": "{altered}"}, {"ref_model_quantization_bit": 4}, {"dpo"}),
                                   (DPO, {"ref_model_quantization_bit": 4}, set())],
    "reward_model": [(PPO, {"reward_model": "{reward_folder}"}, {"adapter[reward_model]"} | {
        f"rm:{stage}" for stage in ("fetch#0", "align#0", "fetch#1", "align#1", "tokenize", "reward")})],
    "reward_model_adapters": [],  # refused at recipe time
    "reward_model_quantization_bit": [(PPO, {"reward_model_quantization_bit": 4}, set()),
                                      ({**PPO, "reward_model_type": "full"}, {"reward_model_quantization_bit": 4},
                                       {"ppo"})],
    "reward_model_type": [(PPO, {"reward_model_type": "full"}, {"ppo"})],
    "task": [({}, {"task": "pystdlib_test"}, EXAMS), ({"task": "pystdlib_test"}, {"task": "pystdlib_val"}, EXAMS)],
    "task_dir": [({"task": "pystdlib_test"}, {"task_dir": "{data}"}, set())],  # the bundled exam either way
    "lang": [({"task": "pystdlib_test"}, {"lang": "zh"}, EXAMS), ({}, {"lang": "zh"}, set())],
    "n_shot": [({"task": "pystdlib_test"}, {"n_shot": 2}, EXAMS), ({}, {"n_shot": 2}, set())],
    "batch_size": [({"task": "pystdlib_test"}, {"batch_size": 2}, EXAMS), ({}, {"batch_size": 2}, set())],
    "save_dir": [({"task": "pystdlib_test"}, {"save_dir": "{out}"}, set())],
    "export_dir": [({}, {"export_dir": "{export}"}, {"export#0"})],
    "export_size": [({}, {"export_size": 1}, set()), ({"export_dir": "{export}"}, {"export_size": 1}, {"export#0"})],
    "export_device": [({"export_dir": "{export}"}, {"export_device": "auto"}, set())],  # same bytes anywhere
    "export_legacy_format": [({}, {"export_legacy_format": True}, set()),
                             ({"export_dir": "{export}"}, {"export_legacy_format": True}, {"export#0"})],
}


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_model_dir):
    """Folders the cases refer to: the tiny model, copies of it and of the data, a checkpoint."""
    root = tmp_path_factory.mktemp("keys")
    data = root / "data"
    data.mkdir()
    shutil.copy(BUNDLED_DATA / "pydoc_summaries_train.jsonl", data / "mine.jsonl")
    registry = {"mine": {"file_name": "mine.jsonl"}, "renamed": {"file_name": "mine.jsonl"}}
    (data / "dataset_info.json").write_text(json.dumps(registry))
    shutil.copytree(data, root / "data_copy")
    shutil.copytree(tiny_model_dir, root / "copy")
    shutil.copytree(tiny_model_dir, root / "altered")
    config = json.loads((root / "altered" / "config.json").read_text())
    (root / "altered" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    reward_folder = root / "reward_folder"
    shutil.copytree(adapter, reward_folder)
    (reward_folder / "value_head.safetensors").write_bytes(b"head")
    rm = tiny_recipe_values(tiny_model_dir, stage="rm", dataset="pydoc_preferences",
                            eval_dataset="pydoc_preferences_test")
    (root / "rm.yaml").write_text(yaml.safe_dump(rm))
    (root / "sft.yaml").write_text(yaml.safe_dump(tiny_recipe_values(tiny_model_dir)))
    (root / "tokens.yaml").write_text("'<|x|>': a new token\n")
    (root / "tokens_copy.yaml").write_text("'<|x|>': a new token\n")
    deepspeed = REPO / "configs" / "deepspeed"
    shutil.copy(deepspeed / "ds_z2_config.json", root / "ds_copy.json")
    (root / "fsdp.json").write_text(json.dumps({"min_num_params": 1000}))
    (root / "checkpoint").mkdir()
    (root / "checkpoint" / "trainer_state.json").write_text("{}")
    return {"model": str(tiny_model_dir), "copy": str(root / "copy"), "altered": str(root / "altered"),
            "bundled": str(bundled_model_dir()), "data": str(data), "data_copy": str(root / "data_copy"),
            "checkpoint": str(root / "checkpoint"), "adapter": str(adapter), "reward_folder": str(reward_folder),
            "rm_recipe": str(root / "rm.yaml"), "sft_recipe": str(root / "sft.yaml"), "out": str(root / "out"),
            "export": str(root / "export"), "tokens": str(root / "tokens.yaml"),
            "tokens_copy": str(root / "tokens_copy.yaml"), "ds_z2": str(deepspeed / "ds_z2_config.json"),
            "ds_z3": str(deepspeed / "ds_z3_config.json"), "ds_copy": str(root / "ds_copy.json"),
            "fsdp_json": str(root / "fsdp.json")}


def fill(values: dict, places: dict) -> dict:
    return {k: places[v[1:-1]] if isinstance(v, str) and v.startswith("{") else v for k, v in values.items()}


def test_refused_fields_are_refused():
    for field in ("ref_model_adapters", "reward_model_adapters"):
        with pytest.raises(RecipeError, match=f"key '{field}' is not supported"):
            Recipe.from_flat({"dataset": "x", field: "somewhere"})


def configs(values: dict) -> dict[str, str]:
    """Each step's keyed config digest, by label; fetch/align/export steps by stage and position instead (within
    their recipe: an upstream recipe's steps keep its prefix)."""
    seen: dict[str, int] = {}
    out = {}
    for step in plan_run(Recipe.from_flat(values)):
        prefix = step.label.rpartition(":")[0]
        scope, name = f"{prefix}:" if prefix else "", step.stage.name
        label = step.label
        if name in ("fetch", "align", "export"):
            count = seen.get(scope + name, 0)
            seen[scope + name] = count + 1
            label = f"{scope}{name}#{count}"
        out[label] = stable_hash(step.config.keyed())
    return out


def test_every_recipe_field_has_cases():
    assert set(CASES) == set(FIELD_SECTION), set(FIELD_SECTION) ^ set(CASES)


@pytest.mark.parametrize(("field", "number"), [(f, i) for f, cases in CASES.items() for i in range(len(cases))])
def test_a_field_changes_exactly_the_configs_it_shapes(places, tiny_model_dir, field, number):
    start, change, expected = CASES[field][number]
    base = fill({**tiny_recipe_values(tiny_model_dir, dataset="mine", dataset_dir=places["data"]), **start}, places)
    before, after = configs(base), configs({**base, **fill(change, places)})
    changed = {label for label in before.keys() | after.keys() if before.get(label) != after.get(label)}
    assert changed == expected


def test_only_a_chosen_optimizers_library_is_keyed(tiny_model_dir):
    """Installing or upgrading galore-torch (or badam, apollo-torch, adam-mini) changed every train, reward and
    preference key, so a recipe that uses none of them rebuilt and dropped a killed run's checkpoints."""
    def trainer_versions(values):
        step = next(s for s in plan_run(Recipe.from_flat(values)) if s.stage.name == "train")
        return step.stage.versions_for(step.config)

    plain = trainer_versions(tiny_recipe_values(tiny_model_dir, **FULL))
    assert not {"galore-torch", "apollo-torch", "badam", "adam-mini"} & set(plain) and "peft" in plain
    assert set(trainer_versions(tiny_recipe_values(tiny_model_dir, **GALORE))) - set(plain) == {"galore-torch"}
    assert set(trainer_versions(tiny_recipe_values(tiny_model_dir, **BADAM))) - set(plain) == {"badam"}
