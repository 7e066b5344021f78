"""PyTorch's CUDA caching allocator, configured before CUDA initialises: expandable segments, unless the user set
the variable. Imports nothing heavy (no torch): the CLI calls :func:`configure_allocator` before any command that
may touch CUDA (train, eval, predict, merge, bench) imports torch.

Why: packed batches vary in length from step to step and fragment the caching allocator's fixed-size segments.
On one H100 (Gemma-2B QLoRA, batch 8 x 512, packed; ../shared/GPU.md, 2026-12-05) reserved memory was 33.9 GiB
for 14.4 GiB allocated, for finsft and the hand-written TRL script alike; with ``expandable_segments:True`` it was
14.5 GiB at the same speed (14,969 vs 15,009 tokens/s). An out-of-memory error comes when *reserved* memory
reaches the card, so without it a 24 GB card would fail a run the plan says needs 15.6 GiB. torchtune, Axolotl
and Unsloth set it by default too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from importlib import metadata

# torch >= 2.9 reads PYTORCH_ALLOC_CONF (for every accelerator); the CUDA-only name before it still works there.
VARIABLE = "PYTORCH_ALLOC_CONF"
LEGACY_VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
VALUE = "expandable_segments:True"
REASON = ("packed batches of varying length fragment the caching allocator: reserved 33.9 -> 14.5 GiB for 14.4 "
          "GiB allocated at the same speed (H100, Gemma-2B QLoRA, batch 8 x 512)")


def _torch_reads_new_name() -> bool:
    """torch >= 2.9 (from its installed metadata: torch is not imported here)."""
    try:
        major, minor = (int(p) for p in metadata.version("torch").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return True
    return (major, minor) >= (2, 9)


def user_setting(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(variable, value) when the environment already names an allocator configuration, else None."""
    env = os.environ if environ is None else environ
    for name in (VARIABLE, LEGACY_VARIABLE):
        if env.get(name):
            return name, env[name]
    return None


def configure_allocator(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set expandable segments unless the user configured the allocator. Returns the variable set (None when the
    user's setting was kept). Call it before torch initialises CUDA (the CLI does, before importing torch)."""
    env = os.environ if environ is None else environ
    if user_setting(env) is not None:
        return None
    name = VARIABLE if _torch_reads_new_name() else LEGACY_VARIABLE
    env[name] = VALUE
    return name


def allocator_choice(environ: Mapping[str, str] | None = None) -> tuple[str, str, bool]:
    """(value, reason, automatic) for the plan table: what a CUDA run of finsft uses."""
    found = user_setting(environ)
    if found is None or found[1] == VALUE:
        return VALUE, f"set by finsft before CUDA starts, unless {VARIABLE} is set: {REASON}", True
    name, value = found
    return value, f"{name} set in the environment: kept as it is (finsft's default is {VALUE}: {REASON})", False
