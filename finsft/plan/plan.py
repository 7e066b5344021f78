"""The plan: every ``"auto"`` in the recipe resolved for the hardware, each as a :class:`Choice` with its reason
(printed at start-up and written to the manifest). Pure functions of (recipe, hardware, model shape)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from finsft.errors import FinsftError
from finsft.plan.hardware import Hardware
from finsft.plan.memory import (
    ALL_LINEAR,
    FP16_UNSAFE_MODEL_TYPES,
    GiB,
    MemoryEstimate,
    MemorySettings,
    ModelShape,
    estimate_memory,
    fitting_overrides,
)
from finsft.recipe import Recipe

# "auto" gradient checkpointing turns on when the estimate without it exceeds this share of the GPU's memory.
CHECKPOINTING_SHARE = 0.85
# A plan fits when the estimated peak is at most this share of the GPU's memory (CUDA context, fragmentation).
FITS_SHARE = 0.9


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
    memory: MemoryEstimate | None = None  # None when the model's shape is unknown
    evaluate_before_training: bool = False  # evaluation.before_training, unless the plan had to skip it
    model_shape: ModelShape | None = None

    def choice(self, setting: str) -> Choice:
        return next(c for c in self.choices if c.setting == setting)


ShapeLike = ModelShape | tuple[int, int, int] | None


def _shape(model_shape: ShapeLike) -> ModelShape | None:
    if model_shape is None or isinstance(model_shape, ModelShape):
        return model_shape
    return ModelShape.from_legacy(model_shape)


def memory_settings(recipe: Recipe, *, precision: str, gradient_checkpointing: bool, packing: bool,
                    attn_implementation: str, use_liger_kernel: bool, optim: str) -> MemorySettings:
    """The recipe's settings that the memory estimate depends on."""
    train, quant, lora = recipe.training, recipe.quantization, recipe.lora
    targets: tuple[str, ...] = ALL_LINEAR
    if lora and lora["target_modules"] not in ("all-linear", None):
        names = [lora["target_modules"]] if isinstance(lora["target_modules"], str) else lora["target_modules"]
        targets = tuple(n for n in ALL_LINEAR if any(n == t or n.endswith(t) for t in names))
    layers = lora["layers_to_transform"] if lora else None
    return MemorySettings(
        batch=train["per_device_train_batch_size"], max_length=train["max_length"] or 1024, precision=precision,
        quantization=None if quant is None else "4bit" if quant["load_in_4bit"] else "8bit",
        double_quant=quant["bnb_4bit_use_double_quant"] if quant else True,
        lora_r=lora["r"] if lora else None, lora_targets=targets, lora_dropout=lora["lora_dropout"] if lora else 0.0,
        lora_layers=(1 if isinstance(layers, int) else len(layers)) if layers is not None else None,
        gradient_checkpointing=gradient_checkpointing, packing=packing, attn_implementation=attn_implementation,
        use_liger_kernel=use_liger_kernel, optim=optim,
        kbit_upcast=bool(quant) and precision == "fp16",  # see finsft.models.load_training_model
    )


def estimate_training_bytes(recipe: Recipe, n_params: int, hidden: int, layers: int, dtype_bytes: int) -> int:
    """Peak memory of a training step without gradient checkpointing, per device, for a model known only by
    (parameters, hidden, layers): :func:`finsft.plan.memory.estimate_memory` on a Llama-like guess of the rest."""
    shape = ModelShape.from_legacy((n_params, hidden, layers))
    s = memory_settings(recipe, precision="fp32" if dtype_bytes == 4 else "bf16", gradient_checkpointing=False,
                        packing=True, attn_implementation="sdpa", use_liger_kernel=False,
                        optim=str(recipe.training["optim"]).replace("auto", "adamw_torch"))
    return estimate_memory(shape, s).peak


def _model_type(recipe: Recipe, shape: ModelShape | None) -> str:
    if shape is not None and shape.model_type:
        return shape.model_type
    return "gemma" if "gemma" in str(recipe.model["name_or_path"]).lower() else ""


def _precision(recipe: Recipe, hw: Hardware, model_type: str) -> tuple[str, str]:
    """(precision, reason) for "auto"."""
    if not hw.is_gpu:
        return "fp32", f"{hw.device.upper()} has no fast bf16 (bf16 is ~17x slower than fp32 on such CPUs)"
    cc = f" (compute capability {hw.compute_capability[0]}.{hw.compute_capability[1]})" if hw.compute_capability else ""
    if hw.bf16:
        return "bf16", f"GPU has native bf16{cc}"
    if model_type in FP16_UNSAFE_MODEL_TYPES:
        return "fp32", (f"GPU has no native bf16{cc} and {model_type} overflows in fp16: fp32 compute "
                        "(slower, more memory)")
    return "fp16", f"GPU has no native bf16{cc} (emulated bf16 is slow): fp16 with loss scaling"


class _Choices(list[Choice]):
    """The plan's choices, in order; ``choose`` resolves one setting."""

    def choose(self, setting: str, pinned: Any, auto_value: Any, reason: str) -> Any:
        if pinned == "auto":
            self.append(Choice(setting, auto_value, reason, True))
            return auto_value
        self.append(Choice(setting, pinned, "pinned by the recipe", False))
        return pinned


def _auto_packing(recipe: Recipe, hw: Hardware) -> tuple[bool, str]:
    if not hw.is_gpu:
        return False, "CPU: packed attention is slower here (41 vs 54 tokens/s, 2.2x memory)"
    if recipe.training["max_length"] is None:
        return False, "packing needs training.max_length"
    from finsft.templates import template_from_recipe

    if not template_from_recipe(recipe.template).supports_packing:
        return False, f"template '{recipe['template']['name']}' does not support packing"
    return True, "GPU: padding-free best-fit-decreasing packing removes padding work"


def _auto_attention(hw: Hardware, will_pack: bool) -> tuple[str, str]:
    if hw.is_gpu and hw.flash_attn:
        return "flash_attention_2", ("flash-attn is installed and imports: its variable-length kernel keeps packed "
                                     "examples apart without a mask (fastest, least memory)")
    if not hw.is_gpu:
        return "sdpa", "PyTorch scaled-dot-product attention (CPU)"
    why = ("PyTorch SDPA" + (": packed examples are kept apart by a block-diagonal mask built from position_ids "
                             "(SDPA's memory-efficient kernel; k/v expanded to all heads). flash-attn's varlen kernel "
                             "would need no mask (pip install flash-attn on Ampere or newer); flex_attention would "
                             "need torch.compile" if will_pack else " (flash/memory-efficient kernels)"))
    if hw.compute_capability and hw.compute_capability < (8, 0):
        why += "; flash-attn needs compute capability >= 8.0"
    return "sdpa", why


def _auto_checkpointing(hw: Hardware, without: MemoryEstimate | None) -> tuple[bool, str]:
    if not hw.is_gpu:
        return False, "CPU: memory is not the limit; recomputation only costs time"
    if without is None or not hw.memory_bytes:
        return True, "model size unknown: saving memory is the safe side"
    ckpt = without.peak > CHECKPOINTING_SHARE * hw.memory_bytes
    return ckpt, (f"estimated peak without it {without.peak / GiB:.1f} GiB {'>' if ckpt else '<='} "
                  f"{CHECKPOINTING_SHARE:.0%} of {hw.memory_bytes / GiB:.0f} GiB on the GPU")


def _choose_precision(recipe: Recipe, hw: Hardware, model_type: str, choices: _Choices) -> str:
    train = recipe.training
    auto_prec, why = _precision(recipe, hw, model_type)
    precision: str = choices.choose("training.precision", train["precision"], auto_prec, why)
    if precision == "fp16" and model_type in FP16_UNSAFE_MODEL_TYPES:
        raise FinsftError(
            f"{recipe.source}: $.training.precision: fp16 is pinned, but {model_type} models overflow in fp16 "
            "(activations beyond 65504 turn into inf/NaN). Use \"bf16\" on a GPU with native bf16 (Ampere or "
            "newer), \"fp32\", or \"auto\" (which picks one of them for the hardware)")
    if precision == "bf16" and hw.is_gpu and not hw.bf16 and train["precision"] != "auto":
        choices[-1] = Choice("training.precision", "bf16", "pinned by the recipe; this GPU only emulates bf16 "
                             "(several times slower)", False)
    return precision


def _choose_quantization(recipe: Recipe, dtype: str, choices: _Choices) -> tuple[str | None, str | None]:
    """(compute dtype, storage dtype) of a 4-bit model."""
    quant = recipe.quantization
    if not (quant and quant["load_in_4bit"]):
        return None, None
    compute_dtype = choices.choose("quantization.bnb_4bit_compute_dtype", quant["bnb_4bit_compute_dtype"], dtype,
                                   "the model dtype")
    # FSDP and DeepSpeed ZeRO-3 shard the weights (PEFT's FSDP/ZeRO-3 + QLoRA recipes).
    engine = sharding_engine()
    quant_storage = choices.choose("quantization.bnb_4bit_quant_storage", quant["bnb_4bit_quant_storage"],
                                   dtype if engine else "uint8",
                                   f"{engine} shards the 4-bit weights in the compute dtype" if engine
                                   else "bitsandbytes' packing")
    return compute_dtype, quant_storage


def _choose_evaluation_before(recipe: Recipe, choices: _Choices) -> bool:
    evaluation = recipe.evaluation
    before = bool(evaluation and evaluation["before_training"])
    engine = sharding_engine()
    if before and engine and not recipe.quantization:
        choices.append(Choice("evaluation.before_training", False,
                              f"skipped: {engine} shards the unquantized model across ranks; generating on rank 0 "
                              "alone would leave the other ranks waiting at a barrier (30-minute timeout)", False))
        return False
    if evaluation:
        choices.append(Choice("evaluation.before_training", before, "as the recipe says", False))
    return before


def plan_run(recipe: Recipe, hw: Hardware, model_shape: ShapeLike = None) -> Plan:
    """Resolve every "auto" setting. ``model_shape``: a :class:`ModelShape` (see
    :func:`finsft.plan.memory.read_model_shape`), or the older (parameters, hidden size, layers), for the memory
    estimate. Raises FinsftError for a pinned setting the model cannot train with (fp16 on Gemma)."""
    train, model = recipe.training, recipe.model
    shape = _shape(model_shape)
    choices = _Choices()

    precision = _choose_precision(recipe, hw, _model_type(recipe, shape), choices)
    prec_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    dtype = choices.choose("model.dtype", model["dtype"], prec_dtype, f"matches precision {precision}")

    auto_pack, pack_why = _auto_packing(recipe, hw)
    will_pack = auto_pack if train["packing"] == "auto" else bool(train["packing"])
    attn = choices.choose("model.attn_implementation", model["attn_implementation"], *_auto_attention(hw, will_pack))
    packing = choices.choose("training.packing", train["packing"], auto_pack, pack_why)
    grouped = choices.choose("training.group_by_length", train["group_by_length"], not packing,
                             "length-grouped batches cut padding" if not packing else "packing already removes padding")

    liger_ok = hw.is_gpu and hw.liger
    will_liger = liger_ok if train["use_liger_kernel"] == "auto" else bool(train["use_liger_kernel"])
    optim_auto = "adamw_torch_fused" if hw.is_gpu else "adamw_torch"
    will_optim = optim_auto if train["optim"] == "auto" else train["optim"]

    # The memory estimate without checkpointing decides "auto" checkpointing; the one with the plan's setting is
    # what the run needs.
    without: MemoryEstimate | None = None
    if shape is not None:
        settings = memory_settings(recipe, precision=precision, gradient_checkpointing=False, packing=packing,
                                   attn_implementation=attn, use_liger_kernel=will_liger, optim=will_optim)
        without = estimate_memory(shape, settings, hw.memory_bytes, FITS_SHARE)
    ckpt = choices.choose("training.gradient_checkpointing", train["gradient_checkpointing"],
                          *_auto_checkpointing(hw, without))
    memory: MemoryEstimate | None = None
    if shape is not None and without is not None:
        planned = replace(settings, gradient_checkpointing=bool(ckpt))
        memory = estimate_memory(shape, planned, hw.memory_bytes, FITS_SHARE)
        memory.without_checkpointing = without.peak
        if hw.memory_bytes and memory.fits is False:
            memory.advice = fitting_overrides(shape, planned, hw.memory_bytes, train["gradient_accumulation_steps"],
                                              FITS_SHARE)

    liger = choices.choose("training.use_liger_kernel", train["use_liger_kernel"], liger_ok,
                           "liger-kernel installed on CUDA: fused norms, GLU and linear cross-entropy" if liger_ok else
                           ("needs CUDA" if not hw.is_gpu else "liger-kernel not installed (pip install finsft[liger])"))
    tf32 = choices.choose("training.tf32", train["tf32"], hw.tf32,
                          "GPU has TF32 tensor cores" if hw.tf32 else "no TF32 on this hardware")
    if tf32 and not hw.tf32:
        choices[-1] = Choice("training.tf32", False, "pinned true, but this hardware has no TF32: not applied", False)
        tf32 = False
    optim = choices.choose("training.optim", train["optim"], optim_auto,
                           "fused AdamW on CUDA" if hw.is_gpu else "plain AdamW on CPU")
    compute_dtype, quant_storage = _choose_quantization(recipe, dtype, choices)
    before = _choose_evaluation_before(recipe, choices)
    return Plan(hardware=hw, dtype=dtype, precision=precision, attn_implementation=attn, packing=packing,
                group_by_length=grouped, gradient_checkpointing=ckpt, use_liger_kernel=liger, tf32=tf32, optim=optim,
                compute_dtype=compute_dtype, quant_storage=quant_storage, choices=list(choices), memory=memory,
                evaluate_before_training=before, model_shape=shape)


def check_fits(plan: Plan) -> None:
    """Raise FinsftError when the plan's memory estimate says the step does not fit on the GPU (before any weight
    is loaded), naming the estimate and the overrides that would fit."""
    mem = plan.memory
    if mem is None or mem.fits is not False or not mem.device_bytes:
        return
    parts = ", ".join(f"{k} {getattr(mem, k) / GiB:.1f}" for k in (
        "weights", "activations", "optimizer", "loss_head") if getattr(mem, k) >= GiB // 10)
    advice = "\n".join(f"  finsft train RECIPE {a}" for a in mem.advice)
    raise FinsftError(
        f"this run does not fit on {plan.hardware.name}: estimated peak {mem.peak / GiB:.1f} GiB ({parts} GiB) > "
        f"{mem.headroom:.0%} of {mem.device_bytes / GiB:.0f} GiB "
        f"(gradient checkpointing {'on' if mem.gradient_checkpointing else 'off'}). Overrides that fit:\n{advice}")


def sharding_engine() -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when accelerate launch set one up (its environment), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "DeepSpeed ZeRO-3"
    return None
