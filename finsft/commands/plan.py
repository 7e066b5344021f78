"""``finsft plan RECIPE [key.path=value ...] [--hardware PROFILE | --gpu-memory GIB] [--accelerate-config FILE]
[--num-processes N] [--format json]``: every resolved choice with its reason, and the memory estimate per GPU, for
this machine or a named GPU, on one process or under DDP, FSDP or DeepSpeed ZeRO (read from the accelerate YAML).

No weights, no hub, no GPU: the model's shapes come from the config finsft ships for a hub id
(finsft/model_configs) or from a local model folder's config.json. torch is imported only to detect this machine's
hardware (no ``--hardware``/``--gpu-memory``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from finsft.plan.distributed import SINGLE, Parallelism, parallelism_from_accelerate_config
from finsft.plan.hardware import PROFILES, Hardware, gpu_with_memory, hardware_profile
from finsft.plan.memory import (
    ALLOCATOR_MARGIN,
    COMPONENTS,
    CUDA_CONTEXT_BYTES,
    GiB,
    ModelShape,
    read_model_shape,
)
from finsft.plan.plan import Plan, plan_run
from finsft.recipe import PACKAGE_PREFIX, Recipe


def recipe_model_shape(recipe: Recipe) -> tuple[ModelShape | None, str]:
    """(shape, where it came from) for the recipe's model, without torch or the hub."""
    ref = str(recipe.model["name_or_path"])
    if recipe.model["gguf_file"] or ref.startswith(PACKAGE_PREFIX):
        return None, "a GGUF model: its shape is read when the model loads"
    if os.path.isdir(ref):
        shape = read_model_shape(ref)
        return shape, f"{ref}/config.json" if shape else f"{ref} has no readable config.json"
    from finsft.models import shipped_config

    shipped = shipped_config(ref)
    if shipped is not None:
        return read_model_shape(shipped), f"config shipped with finsft ({shipped.name})"
    return None, f"'{ref}' is neither a local folder nor a model whose config finsft ships"


def parallelism(accelerate_config: str | None, num_processes: int | None) -> Parallelism:
    """The engine from an accelerate YAML (its num_processes unless ``num_processes``); without one, DDP over
    ``num_processes`` (or one process)."""
    if accelerate_config:
        return parallelism_from_accelerate_config(accelerate_config, num_processes)
    if num_processes is not None and num_processes < 1:
        from finsft.errors import FinsftError

        raise FinsftError(f"--num-processes must be at least 1, got {num_processes}")
    return Parallelism("DDP", num_processes) if num_processes and num_processes > 1 else SINGLE


def make_plan(recipe: Recipe, hardware: str | None = None, gpu_memory: float | None = None,
              accelerate_config: str | None = None, num_processes: int | None = None) -> tuple[Plan, str]:
    par = parallelism(accelerate_config, num_processes)
    hw: Hardware
    if hardware is not None and gpu_memory is not None:
        from finsft.errors import FinsftError

        raise FinsftError("give --hardware or --gpu-memory, not both")
    if hardware is not None:
        hw = hardware_profile(hardware)
    elif gpu_memory is not None:
        hw = gpu_with_memory(gpu_memory)
    else:
        from finsft.plan.hardware import detect_hardware

        hw = detect_hardware()
    shape, where = recipe_model_shape(recipe)
    return plan_run(recipe, hw, shape, par), where


def plan_dict(plan: Plan, shape_source: str) -> dict[str, Any]:
    hw = plan.hardware
    mem = plan.memory
    return {
        "hardware": {"name": hw.name, "device": hw.device, "memory_bytes": hw.memory_bytes, "bf16": hw.bf16,
                     "tf32": hw.tf32, "flash_attn": hw.flash_attn, "flex_attn": hw.flex_attn, "liger": hw.liger,
                     "compute_capability": list(hw.compute_capability) if hw.compute_capability else None},
        "model": {"shape": None if plan.model_shape is None else vars(plan.model_shape), "source": shape_source},
        "choices": {c.setting: {"value": c.value, "reason": c.reason, "automatic": c.automatic}
                    for c in plan.choices},
        "distributed": {"engine": plan.parallel.engine, "processes": plan.parallel.processes,
                        "shard_weights": plan.parallel.shard_weights,
                        "shard_gradients": plan.parallel.shard_gradients,
                        "shard_optimizer": plan.parallel.shard_optimizer, "detail": plan.parallel.detail},
        "memory": None if mem is None else {**mem.as_dict(), "device_bytes": hw.memory_bytes},
    }


def _fmt_gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def render_text(plan: Plan, shape_source: str, out: TextIO) -> None:
    hw = plan.hardware
    mem = plan.memory
    print(f"hardware: {hw.name} ({hw.device}, {_fmt_gib(hw.memory_bytes)}, bf16 {'yes' if hw.bf16 else 'no'}, "
          f"tf32 {'yes' if hw.tf32 else 'no'})", file=out)
    print(f"model shape: {shape_source}", file=out)
    print(f"distributed: {plan.parallel.describe()}", file=out)
    width = max(len(c.setting) for c in plan.choices)
    vwidth = max(len(json.dumps(c.value)) for c in plan.choices)
    for c in plan.choices:
        tag = "auto  " if c.automatic else "pinned"
        print(f"  {c.setting:<{width}}  {json.dumps(c.value):<{vwidth}}  {tag}  {c.reason}", file=out)
    if mem is None:
        print("memory: unknown (no model shape)", file=out)
        return
    print(f"memory per GPU for {mem.tokens:,} tokens a step (batch x max_length; gradient checkpointing "
          f"{'on' if mem.gradient_checkpointing else 'off'}):", file=out)
    for k in COMPONENTS:
        print(f"  {k:<19} {getattr(mem, k) / GiB:8.2f} GiB", file=out)
    print(f"  {'estimated peak':<19} {mem.peak / GiB:8.2f} GiB"
          + (f"   (without checkpointing {mem.without_checkpointing / GiB:.1f} GiB)"
             if mem.without_checkpointing and mem.gradient_checkpointing else ""), file=out)
    if mem.fits is None:
        print("  fits: unknown (no GPU memory to compare with; try --hardware or --gpu-memory)", file=out)
    else:
        print(f"  fits: {'yes' if mem.fits else 'NO'} (peak + {ALLOCATOR_MARGIN:.0%} allocator margin (reserved over "
              f"allocated) <= {_fmt_gib(mem.device_bytes)} - {CUDA_CONTEXT_BYTES / GiB:.1f} GiB CUDA context: "
              f"peak up to {_fmt_gib(mem.usable)})", file=out)
    for a in mem.advice:
        print(f"  would fit: {a}", file=out)


def plan_command(recipe: Recipe, hardware: str | None = None, gpu_memory: float | None = None,
                 fmt: str = "text", out: TextIO | None = None, accelerate_config: str | None = None,
                 num_processes: int | None = None) -> int:
    """Print the plan; returns 0 when it fits (or fit is unknown), 1 when the estimate does not fit."""
    out = out or sys.stdout
    plan, where = make_plan(recipe, hardware, gpu_memory, accelerate_config, num_processes)
    if fmt == "json":
        print(json.dumps(plan_dict(plan, where), indent=2, default=str), file=out)
    else:
        render_text(plan, where, out)
    return 1 if plan.memory is not None and plan.memory.fits is False else 0


def profile_names() -> list[str]:
    return list(PROFILES)
