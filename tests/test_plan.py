"""Recipe -> library objects (SFTConfig, LoraConfig, BitsAndBytesConfig, model kwargs) and the hardware Plan.

Pure functions of (recipe, hardware): no model is loaded and nothing trains here. GPU plans use a synthetic
Hardware object, so they are checked on CPU-only machines too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from finsft.plan import (
    Hardware,
    Plan,
    estimate_training_bytes,
    get_model_kwargs,
    get_peft_config,
    get_quantization_config,
    get_sft_config,
    plan_run,
)
from finsft.recipe import Recipe, load_recipe

GiB = 2**30
CPU = Hardware(device="cpu", name="test-cpu", bf16=False, tf32=False, memory_bytes=None, flash_attn=False,
               liger=False)
H100 = Hardware(device="cuda", name="NVIDIA H100", bf16=True, tf32=True, memory_bytes=80 * GiB, flash_attn=False,
                liger=True)
T4 = Hardware(device="cuda", name="Tesla T4", bf16=False, tf32=False, memory_bytes=16 * GiB, flash_attn=False,
              liger=False)
SMALL = (135_000_000, 576, 30)  # (parameters, hidden, layers) of SmolLM2-135M
HUGE = (70_000_000_000, 8192, 80)  # a 70B model


@pytest.fixture
def recipe(make_recipe: Any):  # type: ignore[no-untyped-def]
    def build(**sections: Any) -> Recipe:
        return load_recipe(str(make_recipe(**sections)))

    return build


def val(x: Any) -> Any:
    """The value of an enum setting (TrainingArguments turns strings into enums)."""
    return getattr(x, "value", x)


def choice(plan: Plan, setting: str) -> tuple[Any, bool, str]:
    [c] = [c for c in plan.choices if c.setting == setting]
    return c.value, c.automatic, c.reason


# ------------------------------------------------------------------------------------------------- plan


def test_cpu_plan_is_fp32_unpacked_grouped_without_checkpointing(recipe: Any) -> None:
    plan = plan_run(recipe(), CPU, SMALL)
    assert plan.precision == "fp32" and plan.dtype == "float32"
    assert plan.packing is False
    assert plan.group_by_length is True
    assert plan.gradient_checkpointing is False
    assert plan.use_liger_kernel is False and plan.tf32 is None  # never set off CUDA
    assert plan.attn_implementation == "sdpa"
    assert plan.optim == "adamw_torch_fused"  # torch fuses AdamW on the CPU too (tests/test_optimizer.py)
    assert plan.compute_dtype is None and plan.quant_storage is None
    # TRL's fused LM head projects every position off Triton devices: finsft projects the supervised ones only
    assert plan.supervised_lm_head is True
    assert "only the supervised" in plan.choice("training.supervised_lm_head").reason
    # every auto setting is explained
    assert all(c.automatic and c.reason for c in plan.choices)
    assert {c.setting for c in plan.choices} >= {
        "training.precision", "model.dtype", "training.packing", "training.group_by_length",
        "training.gradient_checkpointing", "training.use_liger_kernel", "training.tf32", "training.optim",
        "training.supervised_lm_head"}


def test_gpu_plan_uses_bf16_packing_and_liger_and_leaves_tf32_to_the_libraries(recipe: Any) -> None:
    plan = plan_run(recipe(), H100, SMALL)
    assert plan.precision == "bf16" and plan.dtype == "bfloat16"
    assert plan.packing is True
    assert plan.group_by_length is False  # packing already removes padding
    # bf16 matmuls do not use TF32; with torch >= 2.9 transformers owns the precision API (no legacy flags)
    assert plan.tf32 is None and "left to the libraries" in choice(plan, "training.tf32")[2]
    fp32 = plan_run(recipe(training={"precision": "fp32"}), H100, SMALL)
    assert fp32.tf32 is True and choice(fp32, "training.tf32")[1] is True
    assert plan.use_liger_kernel is True
    assert plan.optim == "adamw_torch_fused"
    # flash-attn not installed on this Hardware: FlexAttention keeps the packed examples apart (tests/test_attention.py)
    assert plan.attn_implementation == "flex_attention"


def test_gpu_plan_without_liger_installed_or_bf16(recipe: Any) -> None:
    plan = plan_run(recipe(), T4, SMALL)
    assert plan.precision == "fp16" and plan.dtype == "float16"
    assert plan.use_liger_kernel is False
    assert "not installed" in choice(plan, "training.use_liger_kernel")[2]
    assert plan.tf32 is None  # no TF32 on a T4: not set (transformers raises for tf32=True there)


def test_flash_attention_chosen_when_installed(recipe: Any) -> None:
    hw = Hardware(device="cuda", name="A100", bf16=True, tf32=True, memory_bytes=40 * GiB, flash_attn=True,
                  liger=False)
    assert plan_run(recipe(), hw, SMALL).attn_implementation == "flash_attention_2"


def test_gradient_checkpointing_auto_follows_the_memory_estimate(recipe: Any) -> None:
    r = recipe()
    small = plan_run(r, H100, SMALL)
    assert small.gradient_checkpointing is False
    assert "<=" in choice(small, "training.gradient_checkpointing")[2]
    huge = plan_run(r, H100, HUGE)
    assert huge.gradient_checkpointing is True
    value, automatic, reason = choice(huge, "training.gradient_checkpointing")
    assert value is True
    assert automatic and "GiB" in reason and ">" in reason
    # unknown model size on a GPU: checkpointing is the safe side
    assert plan_run(r, H100, None).gradient_checkpointing is True


def test_memory_estimate_grows_with_batch_and_shrinks_with_quantization(recipe: Any) -> None:
    base = estimate_training_bytes(recipe(), *SMALL, dtype_bytes=2)
    bigger = estimate_training_bytes(recipe(training={"per_device_train_batch_size": 16}), *SMALL, dtype_bytes=2)
    q4 = estimate_training_bytes(recipe(quantization={"load_in_4bit": True}), *SMALL, dtype_bytes=2)
    full = estimate_training_bytes(recipe(lora=None), *SMALL, dtype_bytes=2)
    assert bigger > base > q4
    assert full > base  # gradients and Adam moments of every weight


def test_pinned_values_win_and_are_reported_as_pinned(recipe: Any) -> None:
    r = recipe(model={"dtype": "float32", "attn_implementation": "eager"},
               training={"precision": "fp32", "packing": False, "group_by_length": False,
                         "gradient_checkpointing": True, "use_liger_kernel": False, "tf32": False,
                         "optim": "adafactor", "supervised_lm_head": False})
    plan = plan_run(r, H100, HUGE)
    assert (plan.precision, plan.dtype, plan.attn_implementation) == ("fp32", "float32", "eager")
    assert (plan.packing, plan.group_by_length, plan.gradient_checkpointing) == (False, False, True)
    assert (plan.use_liger_kernel, plan.tf32, plan.optim) == (False, False, "adafactor")
    assert plan.supervised_lm_head is False
    recipe_choices = [c for c in plan.choices if not c.setting.startswith("env.")]  # the allocator is not a recipe key
    assert recipe_choices and all(not c.automatic and c.reason == "pinned by the recipe" for c in recipe_choices)
    # and on CPU a pinned packing=true is honoured too
    cpu = plan_run(recipe(training={"packing": True}), CPU, SMALL)
    assert cpu.packing is True and choice(cpu, "training.packing")[1] is False


# ------------------------------------------------------------------------------------------- quantization


def test_qlora_nf4_double_quant(recipe: Any) -> None:
    r = recipe(quantization={"load_in_4bit": True})
    plan = plan_run(r, H100, SMALL)
    assert plan.compute_dtype == "bfloat16" and plan.quant_storage == "uint8"
    q = get_quantization_config(r, plan)
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_use_double_quant is True
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.bnb_4bit_quant_storage == torch.uint8
    kwargs = get_model_kwargs(r, plan)
    assert kwargs["quantization_config"] is q or kwargs["quantization_config"].to_dict() == q.to_dict()
    assert kwargs["dtype"] == torch.bfloat16
    assert kwargs["device_map"] == {"": 0}


def test_qlora_device_map_follows_local_rank(recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    r = recipe(quantization={"load_in_4bit": True})
    assert get_model_kwargs(r, plan_run(r, H100, SMALL))["device_map"] == {"": 3}


def test_fp4_without_double_quant_and_pinned_compute_dtype(recipe: Any) -> None:
    r = recipe(quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False,
                             "bnb_4bit_compute_dtype": "float16"})
    plan = plan_run(r, H100, SMALL)
    q = get_quantization_config(r, plan)
    assert q.bnb_4bit_quant_type == "fp4"
    assert q.bnb_4bit_use_double_quant is False
    assert q.bnb_4bit_compute_dtype == torch.float16
    assert choice(plan, "quantization.bnb_4bit_compute_dtype")[1] is False


def test_quant_storage_follows_compute_dtype_under_fsdp(recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    r = recipe(quantization={"load_in_4bit": True})
    plan = plan_run(r, H100, SMALL)
    assert plan.quant_storage == "bfloat16"
    assert get_quantization_config(r, plan).bnb_4bit_quant_storage == torch.bfloat16


def test_8bit(recipe: Any) -> None:
    r = recipe(quantization={"load_in_8bit": True})
    plan = plan_run(r, CPU, SMALL)
    q = get_quantization_config(r, plan)
    assert q.load_in_8bit and not q.load_in_4bit
    kwargs = get_model_kwargs(r, plan)
    assert kwargs["quantization_config"].load_in_8bit
    assert "device_map" not in kwargs  # CPU: no device map
    assert plan.compute_dtype is None


def test_no_quantization(recipe: Any) -> None:
    r = recipe()
    plan = plan_run(r, CPU, SMALL)
    assert get_quantization_config(r, plan) is None
    kwargs = get_model_kwargs(r, plan)
    assert "quantization_config" not in kwargs
    assert kwargs["dtype"] == torch.float32 and kwargs["attn_implementation"] == "sdpa"
    assert kwargs["revision"] == "main" and kwargs["trust_remote_code"] is False


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_config(recipe: Any) -> None:
    r = recipe(lora={"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                     "layers_to_transform": [1], "use_rslora": True, "modules_to_save": ["lm_head"]})
    cfg = get_peft_config(r)
    assert cfg.task_type == "CAUSAL_LM"
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert cfg.layers_to_transform == [1]
    assert cfg.use_rslora is True and cfg.use_dora is False
    assert cfg.modules_to_save == ["lm_head"]
    assert get_peft_config(recipe(lora={"target_modules": "all-linear"})).target_modules == "all-linear"


def test_full_fine_tune_has_no_peft_config(recipe: Any) -> None:
    assert get_peft_config(recipe(lora=None)) is None


# -------------------------------------------------------------------------------------------- SFTConfig


def test_sft_config_on_cpu(recipe: Any, tmp_path: Any) -> None:
    r = recipe(training={"gradient_accumulation_steps": 2, "warmup_steps": 5, "save_steps": 7, "seed": 3,
                         "lr_scheduler_type": "linear", "weight_decay": 0.01})
    plan = plan_run(r, CPU, SMALL)
    cfg = get_sft_config(r, plan, str(tmp_path / "ckpt"))
    assert cfg.use_cpu is True
    assert cfg.bf16 is False and cfg.fp16 is False
    assert cfg.gradient_checkpointing is False
    assert cfg.packing is False and cfg.padding_free is False
    assert cfg.train_sampling_strategy == "group_by_length"
    assert cfg.completion_only_loss is True
    assert cfg.max_steps == 2 and cfg.per_device_train_batch_size == 4 and cfg.gradient_accumulation_steps == 2
    assert cfg.learning_rate == 1e-3 and cfg.warmup_steps == 5 and cfg.weight_decay == 0.01
    assert val(cfg.lr_scheduler_type) == "linear"
    assert cfg.max_length == 128
    assert val(cfg.optim) == "adamw_torch_fused"
    assert cfg.save_steps == 7 and val(cfg.save_strategy) == "steps"
    assert cfg.seed == 3 and cfg.data_seed == 3
    assert val(cfg.eval_strategy) == "no"
    assert cfg.report_to in ([], "none", ["none"])
    assert cfg.disable_tqdm is True


def test_sft_config_packing_and_checkpointing_pinned(recipe: Any, tmp_path: Any) -> None:
    r = recipe(training={"packing": True, "gradient_checkpointing": True},
               template={"completion_only_loss": False})
    cfg = get_sft_config(r, plan_run(r, CPU, SMALL), str(tmp_path))
    assert cfg.packing is True and cfg.padding_free is True and cfg.packing_strategy == "bfd"
    assert cfg.train_sampling_strategy == "random"
    assert cfg.gradient_checkpointing is True
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert cfg.completion_only_loss is False


def test_sft_config_does_not_warn_about_deprecated_names(recipe: Any, tmp_path: Any) -> None:
    import warnings

    r = recipe(training={"gradient_checkpointing": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_sft_config(r, plan_run(r, CPU, SMALL), str(tmp_path))
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]


def test_sft_config_evaluates_only_with_a_validation_set(recipe: Any, tmp_path: Any) -> None:
    r = recipe(data={"validation_size": 0.2}, training={"eval_steps": 1})
    plan = plan_run(r, CPU, SMALL)
    assert val(get_sft_config(r, plan, str(tmp_path), has_eval=True).eval_strategy) == "steps"
    assert val(get_sft_config(r, plan, str(tmp_path), has_eval=False).eval_strategy) == "no"


def test_gpu_auto_packing_stays_off_without_max_length(recipe: Any) -> None:
    plan = plan_run(recipe(training={"max_length": None}), H100, SMALL)
    assert plan.packing is False
    assert choice(plan, "training.packing") == (False, True, "packing needs training.max_length")


def test_tf32_pinned_on_cpu_is_reported_as_not_applied(recipe: Any) -> None:
    plan = plan_run(recipe(training={"tf32": True}), CPU, SMALL)
    assert plan.tf32 is None
    value, automatic, reason = choice(plan, "training.tf32")
    assert value is None and not automatic and "not applied" in reason


def test_gpu_models_load_onto_the_process_gpu_unless_an_engine_shards_them(
        recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    r = recipe()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert get_model_kwargs(r, plan_run(r, H100, SMALL))["device_map"] == {"": 1}
    assert "device_map" not in get_model_kwargs(r, plan_run(r, CPU, SMALL))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "device_map" not in get_model_kwargs(r, plan_run(r, H100, SMALL))
