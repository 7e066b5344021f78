"""Compile a recipe into library objects: ``trl.SFTConfig``, ``peft.LoraConfig``, ``transformers.BitsAndBytesConfig``
and model-loading kwargs. Pure functions of (recipe, hardware): testable without training.

Every ``"auto"`` in the recipe becomes a :class:`Choice` with the reason, printed at start-up.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from finsft.recipe import Recipe

DTYPES = {"float32", "bfloat16", "float16"}


@dataclass(frozen=True)
class Hardware:
    """What the run executes on."""

    device: str  # "cuda", "mps" or "cpu"
    name: str
    bf16: bool  # fast bf16 (GPU with bf16 units)
    tf32: bool  # Ampere or newer
    memory_bytes: int | None  # per-device accelerator memory
    flash_attn: bool  # flash_attn installed and usable
    liger: bool  # liger-kernel installed
    world_size: int = 1

    @property
    def is_gpu(self) -> bool:
        return self.device == "cuda"


def detect_hardware() -> Hardware:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not cpu_forced:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        major = props.major
        return Hardware(
            device="cuda", name=props.name, bf16=torch.cuda.is_bf16_supported(), tf32=major >= 8,
            memory_bytes=int(props.total_memory),
            flash_attn=importlib.util.find_spec("flash_attn") is not None and major >= 8,
            liger=importlib.util.find_spec("liger_kernel") is not None, world_size=world,
        )
    import platform

    return Hardware(device="cpu", name=platform.processor() or platform.machine(), bf16=False, tf32=False,
                    memory_bytes=None, flash_attn=False, liger=False, world_size=world)


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


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}[name]


def get_quantization_config(recipe: Recipe, plan: Plan) -> Any:
    """``transformers.BitsAndBytesConfig`` for the recipe, or None."""
    quant = recipe["quantization"]
    if not quant:
        return None
    from transformers import BitsAndBytesConfig

    if quant["load_in_8bit"]:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=quant["bnb_4bit_use_double_quant"],
        bnb_4bit_compute_dtype=_torch_dtype(plan.compute_dtype or plan.dtype),
        bnb_4bit_quant_storage=_torch_dtype(plan.quant_storage or "uint8"),
    )


def get_peft_config(recipe: Recipe) -> Any:
    """``peft.LoraConfig`` for the recipe, or None for a full fine-tune."""
    lora = recipe["lora"]
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
    )


def get_model_kwargs(recipe: Recipe, plan: Plan) -> dict[str, Any]:
    """Keyword arguments for ``AutoModelForCausalLM.from_pretrained``."""
    model = recipe["model"]
    kwargs: dict[str, Any] = {
        "revision": model["revision"],
        "trust_remote_code": model["trust_remote_code"],
        "dtype": _torch_dtype(plan.dtype),
        "attn_implementation": plan.attn_implementation,
    }
    quant = get_quantization_config(recipe, plan)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if plan.hardware.is_gpu and (quant is not None or sharding_engine() is None):
        # Each process holds its model on its own GPU (also for evaluation before the trainer moves it); under
        # FSDP/ZeRO-3 the engine places the unquantized shards itself.
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


def get_sft_config(recipe: Recipe, plan: Plan, output_dir: str, *, has_eval: bool = False) -> Any:
    """``trl.SFTConfig`` for the recipe."""
    from trl import SFTConfig

    train = recipe["training"]
    on_cpu = not plan.hardware.is_gpu
    save_steps = train["save_steps"]
    return SFTConfig(
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
        completion_only_loss=recipe["template"]["completion_only_loss"],
        **_sampling_kwargs(SFTConfig, plan.group_by_length),
        **_checkpointing_kwargs(SFTConfig, plan.gradient_checkpointing),
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        tf32=plan.tf32 if plan.hardware.is_gpu else None,
        use_cpu=on_cpu,
        use_liger_kernel=plan.use_liger_kernel,
        logging_steps=train["logging_steps"],
        logging_first_step=True,
        eval_strategy="steps" if has_eval and train["eval_steps"] else "no",
        eval_steps=train["eval_steps"],
        save_strategy="steps" if save_steps else "epoch",
        save_steps=save_steps or 500,
        save_total_limit=train["save_total_limit"],
        seed=train["seed"],
        data_seed=train["seed"],
        dataloader_num_workers=train["dataloader_num_workers"],
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=True,
        dataset_kwargs={"skip_prepare_dataset": False},
        ddp_find_unused_parameters=False if recipe["lora"] else None,
    )
