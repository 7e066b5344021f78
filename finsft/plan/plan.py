"""The plan: every ``"auto"`` in the recipe resolved for the hardware, each as a :class:`Choice` with its reason
(printed at start-up and written to the manifest). Pure functions of (recipe, hardware, model shape)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from finsft.plan.hardware import Hardware
from finsft.recipe import Recipe


@dataclass(frozen=True)
class Choice:
    setting: str
    value: Any
    reason: str
    automatic: bool


@dataclass
class Plan:
    """The recipe's settings with every "auto" resolved for the hardware."""

    hardware: Hardware
    dtype: str
    precision: str  # fp32 | bf16 | fp16
    attn_implementation: str
    packing: bool
    group_by_length: bool
    gradient_checkpointing: bool
    use_liger_kernel: bool
    tf32: bool
    optim: str
    compute_dtype: str | None
    quant_storage: str | None
    choices: list[Choice] = field(default_factory=list)


def estimate_training_bytes(recipe: Recipe, n_params: int, hidden: int, layers: int, dtype_bytes: int) -> int:
    """Rough peak memory of a training step without gradient checkpointing, per device.

    Weights (quantized when the recipe says so), LoRA optimizer state, and activations: about 34 x hidden bytes per
    token per layer in 16-bit (the standard transformer estimate), for batch x max_length tokens.
    """
    quant = recipe["quantization"] or {}
    weight_bytes = 0.55 if quant.get("load_in_4bit") else 1.0 if quant.get("load_in_8bit") else dtype_bytes
    weights = n_params * weight_bytes
    train = recipe["training"]
    if recipe["lora"] is None:
        weights += n_params * (dtype_bytes + 8)  # gradients + Adam moments
    tokens = train["per_device_train_batch_size"] * (train["max_length"] or 1024)
    activations = tokens * hidden * layers * 34 * dtype_bytes / 2
    return int(weights + activations)


def plan_run(recipe: Recipe, hw: Hardware, model_shape: tuple[int, int, int] | None = None) -> Plan:
    """Resolve every "auto" setting. ``model_shape`` = (parameters, hidden size, layers) for the memory estimate."""
    train, model, quant = recipe["training"], recipe["model"], recipe["quantization"] or {}
    choices: list[Choice] = []

    def choose(setting: str, pinned: Any, auto_value: Any, reason: str) -> Any:
        if pinned == "auto":
            choices.append(Choice(setting, auto_value, reason, True))
            return auto_value
        choices.append(Choice(setting, pinned, "pinned by the recipe", False))
        return pinned

    if hw.is_gpu:
        auto_prec, why = ("bf16", "GPU supports bf16") if hw.bf16 else ("fp16", "GPU lacks bf16")
    else:
        auto_prec, why = "fp32", f"{hw.device.upper()} has no fast bf16 (bf16 is ~17x slower than fp32 on such CPUs)"
    precision = choose("training.precision", train["precision"], auto_prec, why)
    prec_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    dtype = choose("model.dtype", model["dtype"], prec_dtype, f"matches precision {precision}")

    if hw.is_gpu and hw.flash_attn:
        attn, why = "flash_attention_2", "flash-attn is installed: variable-length kernels for packed batches"
    else:
        attn, why = "sdpa", "PyTorch scaled-dot-product attention" + ("" if hw.is_gpu else " (CPU)")
    attn = choose("model.attn_implementation", model["attn_implementation"], attn, why)

    from finsft.templates import template_from_recipe

    if hw.is_gpu and train["max_length"] is None:
        auto_pack, why = False, "packing needs training.max_length"
    elif hw.is_gpu and not template_from_recipe(recipe["template"]).supports_packing:
        auto_pack, why = False, f"template '{recipe['template']['name']}' does not support packing"
    elif hw.is_gpu:
        auto_pack, why = True, "GPU: padding-free best-fit-decreasing packing removes padding work"
    else:
        auto_pack, why = False, "CPU: packed attention is slower here (41 vs 54 tokens/s, 2.2x memory)"
    packing = choose("training.packing", train["packing"], auto_pack, why)

    grouped = choose("training.group_by_length", train["group_by_length"], not packing,
                     "length-grouped batches cut padding" if not packing else "packing already removes padding")

    if not hw.is_gpu:
        ckpt, why = False, "CPU: memory is not the limit; recomputation only costs time"
    elif model_shape is not None and hw.memory_bytes:
        n, hidden, layers = model_shape
        need = estimate_training_bytes(recipe, n, hidden, layers, 2 if precision != "fp32" else 4)
        ckpt = need > 0.85 * hw.memory_bytes
        why = (f"estimated {need / 2**30:.1f} GiB {'>' if ckpt else '<='} 85% of "
               f"{hw.memory_bytes / 2**30:.0f} GiB on the GPU")
    else:
        ckpt, why = True, "model size unknown: saving memory is the safe side"
    ckpt = choose("training.gradient_checkpointing", train["gradient_checkpointing"], ckpt, why)

    liger_ok = hw.is_gpu and hw.liger
    liger = choose("training.use_liger_kernel", train["use_liger_kernel"], liger_ok,
                   "liger-kernel installed on CUDA" if liger_ok else
                   ("needs CUDA" if not hw.is_gpu else "liger-kernel not installed (pip install finsft[liger])"))
    tf32 = choose("training.tf32", train["tf32"], hw.tf32,
                  "GPU has TF32 tensor cores" if hw.tf32 else "no TF32 on this hardware")
    if tf32 and not hw.tf32:
        choices[-1] = Choice("training.tf32", False, "pinned true, but this hardware has no TF32: not applied", False)
        tf32 = False
    optim = choose("training.optim", train["optim"], "adamw_torch_fused" if hw.is_gpu else "adamw_torch",
                   "fused AdamW on CUDA" if hw.is_gpu else "plain AdamW on CPU")

    compute_dtype = quant_storage = None
    if quant.get("load_in_4bit"):
        compute_dtype = choose("quantization.bnb_4bit_compute_dtype", quant["bnb_4bit_compute_dtype"], dtype,
                               "the model dtype")
        # FSDP and DeepSpeed ZeRO-3 shard the weights (PEFT's FSDP/ZeRO-3 + QLoRA recipes).
        engine = sharding_engine()
        quant_storage = choose("quantization.bnb_4bit_quant_storage", quant["bnb_4bit_quant_storage"],
                               dtype if engine else "uint8",
                               f"{engine} shards the 4-bit weights in the compute dtype" if engine
                               else "bitsandbytes' packing")
    return Plan(hardware=hw, dtype=dtype, precision=precision, attn_implementation=attn, packing=packing,
                group_by_length=grouped, gradient_checkpointing=ckpt, use_liger_kernel=liger, tf32=tf32, optim=optim,
                compute_dtype=compute_dtype, quant_storage=quant_storage, choices=choices)


def sharding_engine() -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when accelerate launch set one up (its environment), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "DeepSpeed ZeRO-3"
    return None
