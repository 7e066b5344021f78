"""Compile a recipe and its plan into library objects: ``trl.SFTConfig``, ``peft.LoraConfig``,
``transformers.BitsAndBytesConfig`` and model-loading kwargs. Pure functions: testable without training."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from finsft.plan.plan import Plan
from finsft.recipe import Recipe, schema
from finsft.recipe.training_rules import best_at_end, strategies


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}[name]


def library_kwargs(recipe: Recipe, section: str, cls: Any) -> dict[str, Any]:
    """The library keys (``x-library`` in the schema: the fields of ``cls`` that finsft does not manage) that the
    recipe sets, for ``cls``'s constructor. Absent keys keep the library's default. An object given for a field
    typed as a dataclass (peft's EvaConfig, CordaConfig ...) becomes that dataclass."""
    import dataclasses
    import typing

    values = recipe[section] or {}
    props = schema()["properties"][section]["properties"]
    kwargs = {k: copy.deepcopy(v) for k, v in values.items() if "x-library" in props.get(k, {})}
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        for key, value in kwargs.items():
            if isinstance(value, dict):
                targets = [t for t in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(t)]
                if targets:
                    kwargs[key] = typing.cast(Any, targets[0])(**value)
    return kwargs


def get_quantization_config(recipe: Recipe, plan: Plan) -> Any:
    """``transformers.BitsAndBytesConfig`` for the recipe, or None."""
    quant = recipe.quantization
    if not quant:
        return None
    from transformers import BitsAndBytesConfig

    passed = library_kwargs(recipe, "quantization", BitsAndBytesConfig)
    if quant["load_in_8bit"]:
        return BitsAndBytesConfig(load_in_8bit=True, **passed)
    return BitsAndBytesConfig(
        **passed,
        load_in_4bit=True,
        bnb_4bit_quant_type=quant["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=quant["bnb_4bit_use_double_quant"],
        bnb_4bit_compute_dtype=torch_dtype(plan.compute_dtype or plan.dtype),
        bnb_4bit_quant_storage=torch_dtype(plan.quant_storage or "uint8"),
    )


def get_peft_config(recipe: Recipe) -> Any:
    """``peft.LoraConfig`` for the recipe, or None for a full fine-tune."""
    lora = recipe.lora
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"],
        layers_to_transform=lora["layers_to_transform"],
        bias=lora["bias"],
        use_rslora=lora["use_rslora"],
        use_dora=lora["use_dora"],
        modules_to_save=lora["modules_to_save"],
        **library_kwargs(recipe, "lora", LoraConfig),
    )


def inference_attention(plan: Plan) -> str:
    """The attention for scoring and generating: the plan's, except that an automatic FlexAttention (chosen for
    packed training rows) becomes SDPA. Inference batches are padded, not packed, and FlexAttention would compile
    its kernel again for the shapes of every generation step."""
    if plan.attn_implementation == "flex_attention" and any(
            c.setting == "model.attn_implementation" and c.automatic for c in plan.choices):
        return "sdpa"
    return plan.attn_implementation


def get_model_kwargs(recipe: Recipe, plan: Plan, *, inference: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (``inference``: for eval, predict and
    merge, with :func:`inference_attention`)."""
    model = recipe.model
    kwargs: dict[str, Any] = {
        "revision": model["revision"],
        "trust_remote_code": model["trust_remote_code"],
        "dtype": torch_dtype(plan.dtype),
        "attn_implementation": inference_attention(plan) if inference else plan.attn_implementation,
    }
    quant = get_quantization_config(recipe, plan)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if plan.hardware.is_gpu and plan.parallel.sharding_engine is None:
        # Each process holds its model on its own GPU (also for evaluation before the trainer moves it). Under
        # FSDP/ZeRO-3 no device_map, as PEFT's FSDP/ZeRO-3 + QLoRA examples load it: the engine places the
        # unquantized shards itself, and transformers' bitsandbytes quantizer puts a quantized model on
        # torch.cuda.current_device() (the rank's GPU, set by accelerate) before FSDP shards it.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs


def _checkpointing_kwargs(config_cls: Any, enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing settings under the name this transformers version uses (5.x renamed them to
    activation checkpointing and warns about the old names)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def _sampling_kwargs(config_cls: Any, grouped: bool) -> dict[str, Any]:
    """Length-grouped sampling under the name this transformers version uses."""
    import dataclasses

    if "train_sampling_strategy" in {f.name for f in dataclasses.fields(config_cls)}:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def _strategy_kwargs(train: Mapping[str, Any], passed: dict[str, Any], has_eval: bool) -> dict[str, Any]:
    """When to evaluate and save (finsft.recipe.training_rules.strategies), and with evaluation, the best-model
    settings: early stopping loads the best checkpoint at the end unless the recipe says otherwise, and compares
    the validation loss unless the recipe names another metric. Without evaluation they have nothing to compare
    and are left out."""
    out = strategies(train, has_eval)
    if out["eval_strategy"] == "no":
        for key in ("load_best_model_at_end", "metric_for_best_model", "greater_is_better"):
            passed.pop(key, None)
        return out
    if best_at_end(train) and "load_best_model_at_end" not in passed:
        out["load_best_model_at_end"] = True
    if (best_at_end(train) or out["save_strategy"] == "best") and "metric_for_best_model" not in passed:
        out["metric_for_best_model"] = "loss"
    return out


def get_sft_config(recipe: Recipe, plan: Plan, output_dir: str, *, has_eval: bool = False) -> Any:
    """``trl.SFTConfig`` for the recipe."""
    from trl import SFTConfig

    train = recipe.training
    on_cpu = not plan.hardware.is_gpu
    passed = library_kwargs(recipe, "training", SFTConfig)
    strategy = _strategy_kwargs(train, passed, has_eval)  # (may drop best-model keys from passed)
    return SFTConfig(
        **passed,
        **strategy,
        report_to=train["report_to"],
        run_name=train["run_name"] or recipe.name,
        output_dir=output_dir,
        num_train_epochs=train["num_train_epochs"],
        max_steps=train["max_steps"],
        per_device_train_batch_size=train["per_device_train_batch_size"],
        per_device_eval_batch_size=train["per_device_eval_batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"],
        learning_rate=train["learning_rate"],
        lr_scheduler_type=train["lr_scheduler_type"],
        warmup_steps=train["warmup_steps"],
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        optim=plan.optim,
        max_length=train["max_length"],
        packing=plan.packing,
        packing_strategy="bfd",
        padding_free=plan.packing,
        completion_only_loss=recipe.template["completion_only_loss"],
        **_sampling_kwargs(SFTConfig, plan.group_by_length),
        **_checkpointing_kwargs(SFTConfig, plan.gradient_checkpointing),
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        tf32=plan.tf32,  # None (left to the libraries) except on CUDA GPUs with TF32: see plan._choose_tf32
        use_cpu=on_cpu,
        use_liger_kernel=plan.use_liger_kernel,
        logging_steps=train["logging_steps"],
        logging_first_step=True,
        eval_steps=train["eval_steps"],
        save_total_limit=train["save_total_limit"],
        seed=train["seed"],
        data_seed=train["seed"],
        dataloader_num_workers=train["dataloader_num_workers"],
        # Padding-free batches have no attention mask and no padding: every token counts. The "non_padding" count
        # falls back to input_ids != pad_token_id there, which drops every EOS when pad == EOS (Mistral, Llama).
        include_num_input_tokens_seen="all" if plan.packing else "non_padding",
        disable_tqdm=True,
        remove_unused_columns=True,
        dataset_kwargs={"skip_prepare_dataset": False},
        ddp_find_unused_parameters=False if recipe.lora else None,
    )
