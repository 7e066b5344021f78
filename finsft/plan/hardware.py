"""What a run executes on: device, memory, bf16/tf32 support, installed kernels."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass


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
