"""Stage 2 of a run: recipe -> plan (hardware, automatic choices with reasons, library configs).

Imports only :mod:`finsft.recipe`, :mod:`finsft.templates` and :mod:`finsft.errors`; never the data, model,
training or evaluation stages.
"""

from finsft.plan.configs import (
    get_model_kwargs,
    get_peft_config,
    get_quantization_config,
    get_sft_config,
    torch_dtype,
)
from finsft.plan.hardware import Hardware, detect_hardware
from finsft.plan.plan import Choice, Plan, estimate_training_bytes, plan_run, sharding_engine

__all__ = [
    "Choice", "Hardware", "Plan", "detect_hardware", "estimate_training_bytes", "get_model_kwargs",
    "get_peft_config", "get_quantization_config", "get_sft_config", "plan_run", "sharding_engine", "torch_dtype",
]
