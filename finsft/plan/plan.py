"""The plan: every ``"auto"`` in the recipe resolved for the hardware, each as a :class:`Choice` with its reason
(printed at start-up and written to the manifest). Pure functions of (recipe, hardware, model shape)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from finsft.errors import FinsftError
from finsft.plan.distributed import Parallelism, parallelism_from_environment
from finsft.plan.hardware import Hardware
from finsft.plan.memory import (
    ALL_LINEAR,
    ALLOCATOR_MARGIN,
    CUDA_CONTEXT_BYTES,
    FP16_UNSAFE_MODEL_TYPES,
    GiB,
    MemoryEstimate,
    MemorySettings,
    ModelShape,
    estimate_memory,
    fit_limit,
    fitting_overrides,
)
from finsft.recipe import Recipe

# "auto" gradient checkpointing turns on when the estimate without it exceeds this share of the GPU's memory.
CHECKPOINTING_SHARE = 0.85
# A plan fits when the estimated peak plus the allocator's margin fits beside the CUDA context
# (finsft.plan.memory.fit_limit).


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
    tf32: bool | None  # None: left to the libraries
    optim: str
    compute_dtype: str | None
    quant_storage: str | None
    choices: list[Choice] = field(default_factory=list)
    memory: MemoryEstimate | None = None  # None when the model's shape is unknown
    evaluate_before_training: bool = False  # evaluation.before_training, unless the plan had to skip it
    model_shape: ModelShape | None = None
    parallel: Parallelism = field(default_factory=lambda: Parallelism("single"))
    # True: TRL's fused LM head scores only the supervised positions on every device; False: every position; None:
    # as TRL decides (the notebook baseline). See finsft.training.trainer.lm_head_positions.
    supervised_lm_head: bool | None = None

    def choice(self, setting: str) -> Choice:
        return next(c for c in self.choices if c.setting == setting)


ShapeLike = ModelShape | tuple[int, int, int] | None


def _shape(model_shape: ShapeLike) -> ModelShape | None:
    if model_shape is None or isinstance(model_shape, ModelShape):
        return model_shape
    return ModelShape.from_legacy(model_shape)


def memory_settings(recipe: Recipe, *, precision: str, gradient_checkpointing: bool, packing: bool,
                    attn_implementation: str, use_liger_kernel: bool, optim: str,
                    parallel: Parallelism | None = None) -> MemorySettings:
    """The recipe's settings that the memory estimate depends on (per GPU under ``parallel``)."""
    par = parallel or Parallelism("single")
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
        processes=par.processes, shard_weights=par.shard_weights, shard_gradients=par.shard_gradients,
        shard_optimizer=par.shard_optimizer,
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


# GPUs whose Triton kernels may use >= ~160 KiB of shared memory per block (A100, Jetson Orin, H100/H200,
# B200/B300). FlexAttention's backward at head_dim > 128 needs ~112-128 KiB (torch's default tile): it fails to
# compile ("out of resource: shared memory") on the ~99 KiB parts (sm_8.6/8.9: RTX 30xx/40xx, A10G, L4, L40;
# sm_12.x) and on Turing/Volta. pytorch/pytorch#133254 (fits on H100), #180278 (sm_8.6), #198224 (sm_12.x).
LARGE_SHARED_MEMORY_CC = ((8, 0), (8, 7), (9, 0), (10, 0), (10, 3))
FLEX_SMALL_HEAD_DIM = 128  # head dims up to this fit FlexAttention's backward on every Ampere-or-newer GPU


def _flex_fits(hw: Hardware, shape: ModelShape | None) -> tuple[bool, str]:
    """(FlexAttention can train here, why not)."""
    cc = hw.compute_capability
    if not hw.flex_attn:
        return False, "FlexAttention needs torch's CUDA build with Triton (not found)"
    if (cc is None and not hw.bf16) or (cc is not None and cc < (8, 0)):
        return False, "FlexAttention's Triton kernels need compute capability >= 8.0"
    if cc in LARGE_SHARED_MEMORY_CC:
        return True, ""
    gpu = f"compute capability {cc[0]}.{cc[1]}" if cc else "compute capability unknown"
    if shape is None:
        return False, (f"the model's head_dim is unknown and FlexAttention's backward at head_dim > "
                       f"{FLEX_SMALL_HEAD_DIM} may not fit this GPU's shared memory ({gpu})")
    if shape.head_dim > FLEX_SMALL_HEAD_DIM:
        return False, (f"FlexAttention's backward at head_dim {shape.head_dim} > {FLEX_SMALL_HEAD_DIM} needs more "
                       f"than the ~99 KiB of shared memory per block of GPUs other than A100/H100/B200 ({gpu}; "
                       "pytorch#180278)")
    return True, ""


def _auto_attention(hw: Hardware, will_pack: bool, precision: str = "bf16",
                    shape: ModelShape | None = None) -> tuple[str, str]:
    """(attn_implementation, reason) for "auto". Packed (padding-free) rows need attention that keeps the
    examples apart without work across them: flash-attn's variable-length kernel (no mask at all), else
    FlexAttention (transformers turns the packed position_ids into a BlockMask; the blocks between examples are
    skipped), else SDPA under a dense block-diagonal [T, T] mask over the whole packed row (attention over all
    T^2 pairs: ~ the number of examples per row times the work, and no flash kernel)."""
    if not hw.is_gpu:
        return "sdpa", ("PyTorch SDPA (CPU): FlexAttention has no backward on the CPU (torch 2.13)"
                        + ("; packed rows run under a dense block-diagonal mask" if will_pack else ""))
    cc = hw.compute_capability
    half = precision in ("bf16", "fp16")
    if hw.flash_attn and half and (cc is None or cc >= (8, 0)):
        return "flash_attention_2", ("flash-attn is installed and imports: its variable-length kernel keeps packed "
                                     "examples apart without a mask (fastest, least memory)" if will_pack else
                                     "flash-attn is installed and imports (fastest, least memory)")
    if not will_pack:
        why = "PyTorch SDPA: rows are padded, not packed (SDPA's flash/memory-efficient kernels)"
        return "sdpa", why
    no_flash = ("flash-attn is not installed (pip install flash-attn, Ampere or newer, for its variable-length "
                "kernel)" if not hw.flash_attn else f"flash-attn needs bf16/fp16 (the plan computes in {precision})")
    flex_ok, flex_why = _flex_fits(hw, shape)
    if flex_ok and half:
        return "flex_attention", (
            "FlexAttention (PyTorch's own): transformers turns the packed position_ids into a block mask, so the "
            "kernel skips the blocks between examples, where SDPA computes every pair of the packed row under a "
            "dense mask; transformers compiles only this kernel (Triton, once per run), not the model; "
            + no_flash)
    if not half:
        flex_why = f"FlexAttention and flash-attn are chosen for bf16/fp16 runs (the plan computes in {precision})"
    return "sdpa", ("PyTorch SDPA: packed examples are kept apart by a dense block-diagonal mask built from "
                    "position_ids (SDPA's memory-efficient kernel; k/v expanded to all heads); " + no_flash + "; "
                    + flex_why)


# benchmarks/cpu_speed.py, 2026-12-05: finsft bench with it vs 0440638 (every position), one shared core, 2
# alternating pairs per recipe, same first logged loss.
SUPERVISED_HEAD_GAIN = ("1.26x tokens per CPU-second on recipes/quickstart.json, 1.28x on recipes/tfns_smollm2.json, "
                        "same loss")


def _auto_supervised_lm_head(hw: Hardware) -> tuple[bool, str]:
    if hw.device in ("cuda", "xpu"):
        return True, ("TRL's fused LM head already projects only the supervised positions on Triton devices; "
                      "finsft keeps it")
    return True, (f"{hw.device.upper()}: TRL's fused LM head would project every position through the vocabulary; "
                  f"only the supervised (completion) positions are projected ({SUPERVISED_HEAD_GAIN})")


def _auto_checkpointing(hw: Hardware, without: MemoryEstimate | None) -> tuple[bool, str]:
    if not hw.is_gpu:
        return False, "CPU: memory is not the limit; recomputation only costs time"
    if without is None or not hw.memory_bytes:
        return True, "model size unknown: saving memory is the safe side"
    ckpt = without.peak > CHECKPOINTING_SHARE * hw.memory_bytes
    return ckpt, (f"estimated peak without it {without.peak / GiB:.1f} GiB {'>' if ckpt else '<='} "
                  f"{CHECKPOINTING_SHARE:.0%} of {hw.memory_bytes / GiB:.0f} GiB on the GPU")


def _unshardable_optimizer(optim: str) -> bool:
    """bitsandbytes' 8-bit and paged optimizers: their state (quantized blocks with per-block scales, or paged
    CUDA unified memory) is not shaped like the parameters, so FSDP/ZeRO-3 cannot shard or gather it."""
    return "8bit" in optim or optim.startswith("paged_")


# "auto" optimizer on a GPU: fused AdamW while its state is at most this share of the memory a step may use
# (finsft.plan.memory.fit_limit). bitsandbytes' 8-bit state saves 3/4 of it: below 5% that is under 4% of the
# memory, for paging and 8-bit (de)quantization in every step (Gemma-2B QLoRA: 0.15 GiB of bf16 AdamW state).
OPTIMIZER_STATE_SHARE = 0.05
FUSED = "adamw_torch_fused"
PAGED_8BIT = "paged_adamw_8bit"
# torch >= 2.4 fuses AdamW on the CPU too: 48 vs 127 ms per step for SmolLM2-135M's 4.9M LoRA parameters (r16, all
# 7 projections), the same weights to 4e-9 after 23 steps (torch 2.13, one shared core, 2026-12-05).
CPU_FUSED_REASON = ("fused AdamW, also on the CPU (torch >= 2.4): 48 vs 127 ms per optimizer step for 4.9M LoRA "
                    "parameters, same updates")


def _auto_optimizer(recipe: Recipe, hw: Hardware, engine: str | None,
                    estimate: Callable[[str], MemoryEstimate | None] | None = None) -> tuple[str, str]:
    """(optimizer, reason) for "auto", by what the optimizer costs. ``estimate(optim)``: the plan's memory estimate
    of a step with that optimizer (None when the model's shape is unknown)."""
    if not hw.is_gpu:
        return FUSED, CPU_FUSED_REASON
    if engine:
        return FUSED, (f"fused AdamW: {engine} shards its state; bitsandbytes' paged 8-bit state "
                       "cannot be gathered by FSDP (bitsandbytes#89)")
    what = "adapters'" if recipe.lora else "full fine-tune's"
    fused = estimate(FUSED) if estimate is not None else None
    if fused is None or not hw.memory_bytes:
        if recipe.quantization or not recipe.lora:
            return PAGED_8BIT, ("model size unknown: paged 8-bit AdamW (8-bit state, paged to CPU memory under "
                                "spikes), the safe side for QLoRA and full fine-tuning")
        return FUSED, "fused AdamW on CUDA (model size unknown; LoRA adapters keep a small state)"
    usable = fit_limit(hw.memory_bytes)
    state = fused.optimizer
    paged = estimate(PAGED_8BIT) if estimate is not None else None
    state_8bit = paged.optimizer if paged is not None else state // 4
    share = state / usable
    numbers = f"AdamW state of the {what} {state / GiB:.2f} GiB = {share:.1%} of the {usable / GiB:.1f} GiB a step may use"
    if share > OPTIMIZER_STATE_SHARE:
        return PAGED_8BIT, (f"{numbers} (> {OPTIMIZER_STATE_SHARE:.0%}): paged 8-bit AdamW keeps it in "
                            f"{state_8bit / GiB:.2f} GiB, paged to CPU memory under spikes")
    if fused.peak > usable and paged is not None and paged.peak <= usable:
        return PAGED_8BIT, (f"memory is short: with fused AdamW the step needs {fused.peak / GiB:.1f} GiB > "
                            f"{usable / GiB:.1f} GiB; paged 8-bit AdamW fits ({paged.peak / GiB:.1f} GiB)")
    return FUSED, (f"{numbers} (<= {OPTIMIZER_STATE_SHARE:.0%}): fused AdamW, one kernel per step; 8-bit state "
                   f"would save {(state - state_8bit) / GiB:.2f} GiB for paging and (de)quantization every step")


def _choose_optimizer(recipe: Recipe, hw: Hardware, engine: str | None,
                      estimate: Callable[[str], MemoryEstimate | None] | None = None) -> tuple[str, str]:
    """(optimizer, reason) for "auto"; a pinned bitsandbytes 8-bit/paged optimizer under FSDP/ZeRO-3 is refused."""
    pinned = str(recipe.training["optim"])
    if pinned != "auto" and engine and _unshardable_optimizer(pinned):
        raise FinsftError(
            f"{recipe.source}: $.training.optim: {pinned} keeps bitsandbytes' 8-bit/paged optimizer state, which "
            f"{engine} cannot shard or gather (the run would fail at its first checkpoint, bitsandbytes#89). Use "
            f"\"auto\" (fused AdamW under {engine}), \"adamw_torch_fused\" or \"adamw_torch\": "
            "training.optim=auto")
    if pinned != "auto":  # the plan reports it as pinned; no estimate needed
        return pinned, "pinned by the recipe"
    return _auto_optimizer(recipe, hw, engine, estimate)


def _choose_tf32(train: Any, hw: Hardware, precision: str, choices: _Choices) -> bool | None:
    """TF32 only where it is set: on CUDA GPUs that have it (transformers refuses tf32 elsewhere, ROCm included).
    Under bf16/fp16 "auto" leaves it to the libraries: the matmuls run in 16 bits, and with torch >= 2.9
    transformers sets TF32 through torch's precision API (mixing it with the legacy allow_tf32 flags raises)."""
    pinned = train["tf32"]
    if pinned == "auto":
        if not hw.tf32:
            choices.append(Choice("training.tf32", None, "not set: no TF32 on this hardware", True))
            return None
        if precision != "fp32":
            choices.append(Choice("training.tf32", None, f"left to the libraries: {precision} matmuls do not use "
                                  "TF32", True))
            return None
        choices.append(Choice("training.tf32", True, "fp32 on a GPU with TF32 tensor cores", True))
        return True
    if not hw.tf32:
        choices.append(Choice("training.tf32", None, f"pinned {str(pinned).lower()}, but this hardware has no TF32: "
                              "not applied", False))
        return None
    choices.append(Choice("training.tf32", bool(pinned), "pinned by the recipe", False))
    return bool(pinned)


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


def _choose_quantization(recipe: Recipe, dtype: str, choices: _Choices,
                         engine: str | None) -> tuple[str | None, str | None]:
    """(compute dtype, storage dtype) of a 4-bit model."""
    quant = recipe.quantization
    if not (quant and quant["load_in_4bit"]):
        return None, None
    compute_dtype = choices.choose("quantization.bnb_4bit_compute_dtype", quant["bnb_4bit_compute_dtype"], dtype,
                                   "the model dtype")
    # FSDP and DeepSpeed ZeRO-3 shard the weights (PEFT's FSDP/ZeRO-3 + QLoRA recipes).
    quant_storage = choices.choose("quantization.bnb_4bit_quant_storage", quant["bnb_4bit_quant_storage"],
                                   dtype if engine else "uint8",
                                   f"{engine} shards the 4-bit weights in the compute dtype" if engine
                                   else "bitsandbytes' packing")
    return compute_dtype, quant_storage


def _choose_evaluation_before(recipe: Recipe, choices: _Choices, engine: str | None) -> bool:
    evaluation = recipe.evaluation
    before = bool(evaluation and evaluation["before_training"])
    if before and engine and not recipe.quantization:
        choices.append(Choice("evaluation.before_training", False,
                              f"skipped: {engine} shards the unquantized model across ranks; generating on rank 0 "
                              "alone would leave the other ranks waiting at a barrier (30-minute timeout)", False))
        return False
    if evaluation:
        choices.append(Choice("evaluation.before_training", before, "as the recipe says", False))
    return before


def plan_run(recipe: Recipe, hw: Hardware, model_shape: ShapeLike = None, parallel: Parallelism | None = None,
             environ: Mapping[str, str] | None = None) -> Plan:
    """Resolve every "auto" setting. ``model_shape``: a :class:`ModelShape` (see
    :func:`finsft.plan.memory.read_model_shape`), or the older (parameters, hidden size, layers), for the memory
    estimate. ``parallel``: the engine and process count (default: what the launcher set up in this process's
    environment); the memory estimate is per GPU. ``environ`` (default: this process's): the CUDA allocator
    variable the user may have set (finsft.allocator). Raises FinsftError for a pinned setting the model or the engine
    cannot train with (fp16 on Gemma, a paged 8-bit optimizer under FSDP)."""
    train, model = recipe.training, recipe.model
    shape = _shape(model_shape)
    choices = _Choices()
    par = parallel if parallel is not None else parallelism_from_environment()
    engine = par.sharding_engine

    precision = _choose_precision(recipe, hw, _model_type(recipe, shape), choices)
    prec_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    dtype = choices.choose("model.dtype", model["dtype"], prec_dtype, f"matches precision {precision}")

    auto_pack, pack_why = _auto_packing(recipe, hw)
    will_pack = auto_pack if train["packing"] == "auto" else bool(train["packing"])
    attn = choices.choose("model.attn_implementation", model["attn_implementation"],
                          *_auto_attention(hw, will_pack, precision, shape))
    packing = choices.choose("training.packing", train["packing"], auto_pack, pack_why)
    grouped = choices.choose("training.group_by_length", train["group_by_length"], not packing,
                             "length-grouped batches cut padding" if not packing else "packing already removes padding")

    liger_ok = hw.is_gpu and hw.liger
    will_liger = liger_ok if train["use_liger_kernel"] == "auto" else bool(train["use_liger_kernel"])

    def estimate_with(optim: str) -> MemoryEstimate | None:
        """The step's estimate with ``optim``, under the recipe's checkpointing (on where "auto" could turn it
        on: the optimizer is chosen for the run that fits)."""
        if shape is None:
            return None
        ckpt_pin = train["gradient_checkpointing"]
        return estimate_memory(shape, memory_settings(
            recipe, precision=precision, gradient_checkpointing=True if ckpt_pin == "auto" else bool(ckpt_pin),
            packing=packing, attn_implementation=attn, use_liger_kernel=will_liger, optim=optim, parallel=par),
            hw.memory_bytes)

    optim_auto, optim_why = _choose_optimizer(recipe, hw, engine, estimate_with)
    will_optim = optim_auto

    # The memory estimate without checkpointing decides "auto" checkpointing; the one with the plan's setting is
    # what the run needs.
    without: MemoryEstimate | None = None
    if shape is not None:
        settings = memory_settings(recipe, precision=precision, gradient_checkpointing=False, packing=packing,
                                   attn_implementation=attn, use_liger_kernel=will_liger, optim=will_optim,
                                   parallel=par)
        without = estimate_memory(shape, settings, hw.memory_bytes)
    ckpt = choices.choose("training.gradient_checkpointing", train["gradient_checkpointing"],
                          *_auto_checkpointing(hw, without))
    memory: MemoryEstimate | None = None
    if shape is not None and without is not None:
        planned = replace(settings, gradient_checkpointing=bool(ckpt))
        memory = estimate_memory(shape, planned, hw.memory_bytes)
        memory.without_checkpointing = without.peak
        if hw.memory_bytes and memory.fits is False:
            memory.advice = fitting_overrides(shape, planned, hw.memory_bytes, train["gradient_accumulation_steps"])

    liger = choices.choose("training.use_liger_kernel", train["use_liger_kernel"], liger_ok,
                           "liger-kernel installed on CUDA: fused norms, GLU and linear cross-entropy" if liger_ok else
                           ("needs CUDA" if not hw.is_gpu else "liger-kernel not installed (pip install finsft[liger])"))
    supervised_head = choices.choose("training.supervised_lm_head", train["supervised_lm_head"],
                                     *_auto_supervised_lm_head(hw))
    tf32 = _choose_tf32(train, hw, precision, choices)
    optim = choices.choose("training.optim", train["optim"], optim_auto, optim_why)
    compute_dtype, quant_storage = _choose_quantization(recipe, dtype, choices, engine)
    if hw.is_gpu:
        from finsft.allocator import VARIABLE, allocator_choice

        choices.append(Choice(f"env.{VARIABLE}", *allocator_choice(environ)))
    before = _choose_evaluation_before(recipe, choices, engine)
    return Plan(hardware=hw, dtype=dtype, precision=precision, attn_implementation=attn, packing=packing,
                group_by_length=grouped, gradient_checkpointing=ckpt, use_liger_kernel=liger, tf32=tf32, optim=optim,
                compute_dtype=compute_dtype, quant_storage=quant_storage, choices=list(choices), memory=memory,
                evaluate_before_training=before, model_shape=shape, parallel=par,
                supervised_lm_head=bool(supervised_head))


def check_fits(plan: Plan) -> None:
    """Raise FinsftError when the plan's memory estimate says the step does not fit on the GPU (before any weight
    is loaded), naming the estimate and the overrides that would fit."""
    mem = plan.memory
    if mem is None or mem.fits is not False or not mem.device_bytes:
        return
    parts = ", ".join(f"{k} {getattr(mem, k) / GiB:.1f}" for k in (
        "weights", "gathered", "activations", "attention_mask", "optimizer", "loss_head") if getattr(mem, k) >= GiB // 10)
    advice = "\n".join(f"  finsft train RECIPE {a}" for a in mem.advice)
    per = f" per GPU ({plan.parallel.describe()})" if plan.parallel.processes > 1 else ""
    raise FinsftError(
        f"this run does not fit on {plan.hardware.name}: estimated peak{per} {mem.peak / GiB:.1f} GiB ({parts} GiB) "
        f"+ {ALLOCATOR_MARGIN:.0%} allocator margin > {mem.device_bytes / GiB:.0f} GiB less "
        f"{CUDA_CONTEXT_BYTES / GiB:.1f} GiB CUDA context "
        f"(gradient checkpointing {'on' if mem.gradient_checkpointing else 'off'}). Overrides that fit:\n{advice}")


def sharding_engine() -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when accelerate launch set one up (its environment), else None."""
    return parallelism_from_environment().sharding_engine
