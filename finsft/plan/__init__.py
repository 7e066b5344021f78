"""Stage 2 of a run: recipe -> plan (hardware, automatic choices with reasons, memory estimate, library configs).

Imports only :mod:`finsft.recipe`, :mod:`finsft.templates` and :mod:`finsft.errors`; never the data, model,
training or evaluation stages. Making a plan needs no torch (``finsft plan``); detecting the hardware and the
library configs import it when called.
"""

from finsft.plan.configs import (
    get_model_kwargs,
    get_peft_config,
    get_quantization_config,
    get_sft_config,
    torch_dtype,
)
from finsft.plan.distributed import (
    Parallelism,
    parallelism_from_accelerate_config,
    parallelism_from_environment,
)
from finsft.plan.hardware import (
    PROFILES,
    Hardware,
    detect_hardware,
    flash_attn_usable,
    gpu_with_memory,
    hardware_profile,
)
from finsft.plan.memory import MemoryEstimate, MemorySettings, ModelShape, estimate_memory, read_model_shape
from finsft.plan.plan import (
    Choice,
    Plan,
    check_fits,
    estimate_training_bytes,
    memory_settings,
    plan_run,
    sharding_engine,
)

__all__ = [
    "PROFILES",
    "Choice",
    "Hardware",
    "MemoryEstimate",
    "MemorySettings",
    "ModelShape",
    "Parallelism",
    "Plan",
    "check_fits",
    "detect_hardware",
    "estimate_memory",
    "estimate_training_bytes",
    "flash_attn_usable",
    "get_model_kwargs",
    "get_peft_config",
    "get_quantization_config",
    "get_sft_config",
    "gpu_with_memory",
    "hardware_profile",
    "memory_settings",
    "parallelism_from_accelerate_config",
    "parallelism_from_environment",
    "plan_run",
    "read_model_shape",
    "sharding_engine",
    "torch_dtype",
]
