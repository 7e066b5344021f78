"""What a run executes on: device, memory, bf16/tf32 support, installed kernels; and named GPU profiles, so a
plan can be made for a GPU this machine does not have (``finsft plan --hardware a100-40gb``)."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

from finsft.errors import FinsftError

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    """What the run executes on."""

    device: str  # "cuda", "mps" or "cpu"
    name: str
    bf16: bool  # native bf16 units (compute capability >= 8.0); emulated bf16 does not count
    tf32: bool  # Ampere or newer
    memory_bytes: int | None  # per-device accelerator memory
    flash_attn: bool  # flash_attn installed, importable and usable on this GPU
    liger: bool  # liger-kernel installed
    world_size: int = 1
    compute_capability: tuple[int, int] | None = None
    # torch's FlexAttention can run here: a CUDA build of torch with Triton (PyTorch's Linux CUDA wheels ship it).
    # transformers compiles only the attention kernel with it, not the model.
    flex_attn: bool = True

    @property
    def is_gpu(self) -> bool:
        return self.device == "cuda"


def _gpu(name: str, gib: float, cc: tuple[int, int]) -> Hardware:
    ampere = cc >= (8, 0)
    return Hardware(device="cuda", name=name, bf16=ampere, tf32=ampere, memory_bytes=int(gib * GiB),
                    flash_attn=False, liger=False, compute_capability=cc, flex_attn=True)


# Memory as torch.cuda.get_device_properties().total_memory reports it (a little under the marketed GB). The
# profiles describe a plain `pip install finsft`: no flash-attn, no liger-kernel (the attention and Liger
# choices say what installing them changes); FlexAttention comes with torch's CUDA wheels (Triton).
PROFILES: dict[str, Hardware] = {
    "t4-16gb": _gpu("NVIDIA Tesla T4", 14.7, (7, 5)),
    "v100-16gb": _gpu("NVIDIA Tesla V100-SXM2-16GB", 15.8, (7, 0)),
    "l4-24gb": _gpu("NVIDIA L4", 22.0, (8, 9)),
    "a10g-24gb": _gpu("NVIDIA A10G", 22.0, (8, 6)),
    "rtx4090-24gb": _gpu("NVIDIA GeForce RTX 4090", 23.6, (8, 9)),
    "a100-40gb": _gpu("NVIDIA A100-SXM4-40GB", 39.4, (8, 0)),
    "a100-80gb": _gpu("NVIDIA A100-SXM4-80GB", 79.2, (8, 0)),
    "h100-80gb": _gpu("NVIDIA H100 80GB HBM3", 79.1, (9, 0)),
    "h200-141gb": _gpu("NVIDIA H200", 139.8, (9, 0)),
}


def hardware_profile(name: str) -> Hardware:
    """A named GPU profile (see ``PROFILES``)."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        from finsft.errors import did_you_mean

        raise FinsftError(f"unknown hardware profile '{name}'.{did_you_mean(name.lower(), PROFILES)} "
                          f"Known: {', '.join(PROFILES)}; or give --gpu-memory GIB") from None


MAX_GPU_GIB = 1024.0  # --gpu-memory's upper bound: 5x the largest GPU sold (192 GB); 1e308 GiB overflows the bytes


def gpu_with_memory(gib: float) -> Hardware:
    """An Ampere-or-newer GPU with ``gib`` GiB (``--gpu-memory``)."""
    if not math.isfinite(gib) or not 0 < gib <= MAX_GPU_GIB:
        raise FinsftError(f"--gpu-memory must be a number of GiB above 0 and at most {MAX_GPU_GIB:g}, got {gib:g}")
    return _gpu(f"GPU with {gib:g} GiB", gib, (8, 0))


def flash_attn_usable() -> bool:
    """flash-attn as transformers sees it (installed, a version it supports, CUDA) and importable: a wheel built
    for another torch or CUDA fails at import with an undefined symbol, which find_spec alone does not see."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return False
        from flash_attn import flash_attn_varlen_func  # noqa: F401  (loads the compiled extension)
    except Exception:  # ImportError, OSError (undefined symbol), RuntimeError: all mean "not usable"
        return False
    return True


def flex_attention_usable() -> bool:
    """torch's FlexAttention on CUDA: transformers compiles the kernel with Triton (bundled with PyTorch's CUDA
    wheels on Linux; a build without it cannot compile the kernel)."""
    try:
        from transformers.utils import is_torch_flex_attn_available
    except ImportError:
        return False
    return is_torch_flex_attn_available() and importlib.util.find_spec("triton") is not None


def detect_hardware() -> Hardware:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not cpu_forced:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        cc = (props.major, props.minor)
        # including_emulation=False: pre-Ampere cards (T4, V100) emulate bf16 slowly; they train in fp16
        bf16 = cc >= (8, 0) and torch.cuda.is_bf16_supported(including_emulation=False)
        return Hardware(
            # TF32 is an NVIDIA (CUDA >= 11, Ampere+) mode: transformers refuses tf32=True on ROCm
            device="cuda", name=props.name, bf16=bf16, tf32=cc >= (8, 0) and torch.version.cuda is not None,
            memory_bytes=int(props.total_memory),
            flash_attn=cc >= (8, 0) and flash_attn_usable(),
            liger=importlib.util.find_spec("liger_kernel") is not None, world_size=world, compute_capability=cc,
            flex_attn=flex_attention_usable(),
        )
    import platform

    return Hardware(device="cpu", name=platform.processor() or platform.machine(), bf16=False, tf32=False,
                    memory_bytes=None, flash_attn=False, liger=False, world_size=world, flex_attn=False)
