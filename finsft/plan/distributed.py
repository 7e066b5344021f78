"""How a run is spread over processes, and what each process holds: DDP replicates everything; DeepSpeed ZeRO-1/2
shard the optimizer state (and the gradients); FSDP FULL_SHARD and ZeRO-3 shard the weights too.

Read from the environment ``accelerate launch`` gives every training process, or, for ``finsft plan
--accelerate-config FILE``, from the same YAML file (PyYAML only: no torch, no accelerate import).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finsft.errors import FinsftError
from finsft.files import MAX_RECIPE_BYTES, UnreadableFile, read_text

# FSDP v1 sharding strategies by name and by accelerate's 1-based number.
_FSDP_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")


@dataclass(frozen=True)
class Parallelism:
    """The engine and what it shards across ``processes`` (one process per GPU)."""

    engine: str  # "single" | "DDP" | "FSDP" | "DeepSpeed ZeRO-0..3"
    processes: int = 1
    shard_weights: bool = False
    shard_gradients: bool = False
    shard_optimizer: bool = False
    detail: str = ""  # e.g. the FSDP sharding strategy

    @property
    def sharding_engine(self) -> str | None:
        """"FSDP" or "DeepSpeed ZeRO-3" when the engine flattens and shards the weights themselves (4-bit weights
        then need a storage dtype it can shard), else None."""
        if self.engine == "FSDP":
            return "FSDP"
        return self.engine if self.engine == "DeepSpeed ZeRO-3" else None

    def describe(self) -> str:
        if self.engine == "single":
            return "one process"
        parts = [p for p, on in (("weights", self.shard_weights), ("gradients", self.shard_gradients),
                                 ("optimizer state", self.shard_optimizer)) if on]
        what = f"shards {', '.join(parts)} across {self.processes} GPUs" if parts else "replicates the model"
        n = f"{self.processes} process{'es' if self.processes > 1 else ''}"
        return f"{self.engine}{f' {self.detail}' if self.detail else ''} on {n}: {what}"


SINGLE = Parallelism("single")


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _fsdp(processes: int, version: str, strategy: Any, reshard: Any) -> Parallelism:
    if str(version) == "2":  # FSDP2 always shards; reshard_after_forward false keeps the weights between passes
        full = reshard is None or _truthy(reshard)
        return Parallelism("FSDP", processes, full, True, True, "v2" + ("" if full else " (no reshard)"))
    name = str(strategy or "FULL_SHARD").strip().upper()
    if name.isdigit() and 1 <= int(name) <= len(_FSDP_STRATEGIES):
        name = _FSDP_STRATEGIES[int(name) - 1]
    if name == "NO_SHARD":
        return Parallelism("FSDP", processes, False, False, False, name)
    if name in ("SHARD_GRAD_OP", "HYBRID_SHARD_ZERO2"):
        return Parallelism("FSDP", processes, False, True, True, name)
    return Parallelism("FSDP", processes, True, True, True, name)


def _zero(processes: int, stage: int) -> Parallelism:
    return Parallelism(f"DeepSpeed ZeRO-{stage}", processes, stage >= 3, stage >= 2, stage >= 1)


def _processes(value: Any) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


def _stage(value: Any) -> int:
    """A ZeRO stage; accelerate's default is 2."""
    try:
        return min(3, max(0, int(value)))
    except (TypeError, ValueError):
        return 2


def parallelism_from_environment() -> Parallelism:
    """What this process's launcher set up (accelerate launch's ACCELERATE_*/FSDP_* variables, WORLD_SIZE)."""
    env = os.environ
    world = _processes(env.get("WORLD_SIZE", "1"))
    if _truthy(env.get("ACCELERATE_USE_FSDP", "")):
        return _fsdp(world, env.get("FSDP_VERSION", "1"), env.get("FSDP_SHARDING_STRATEGY"),
                     env.get("FSDP_RESHARD_AFTER_FORWARD"))
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED", "")):
        return _zero(world, _stage(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")))
    return Parallelism("DDP", world) if world > 1 else SINGLE


def parallelism_from_accelerate_config(path: str | Path, num_processes: int | None = None) -> Parallelism:
    """The engine an ``accelerate launch --config_file PATH [--num_processes N]`` run would use."""
    import yaml

    p = Path(path)
    try:  # through the reading gate: a regular file of at most 10 MiB, UTF-8 (a FIFO or a device is refused)
        config = yaml.safe_load(read_text(p, "--accelerate-config", limit=MAX_RECIPE_BYTES))
    except UnreadableFile as exc:
        raise FinsftError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise FinsftError(f"--accelerate-config {path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise FinsftError(f"--accelerate-config {path}: expected a mapping of accelerate settings "
                          "(as `accelerate config` writes it)")
    processes = num_processes if num_processes is not None else _processes(config.get("num_processes", 1))
    if processes < 1:
        raise FinsftError(f"--num-processes must be at least 1, got {processes}")
    raw = config.get("distributed_type", "NO")
    kind = "NO" if raw is False or raw is None else str(raw).upper()  # YAML 1.1 reads an unquoted NO as false
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        return _fsdp(processes, str(fsdp.get("fsdp_version", 1)), fsdp.get("fsdp_sharding_strategy"),
                     fsdp.get("fsdp_reshard_after_forward"))
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            raise FinsftError(f"--accelerate-config {path}: deepspeed_config_file is not read by finsft plan; give "
                              "zero_stage in deepspeed_config instead (as recipes/accelerate/deepspeed_zero3.yaml)")
        return _zero(processes, _stage(ds.get("zero_stage")))
    if kind in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_SDAA",
                "MULTI_HPU"):
        return Parallelism("DDP", processes) if processes > 1 else SINGLE
    raise FinsftError(f"--accelerate-config {path}: distributed_type '{config.get('distributed_type')}' is not "
                      "planned by finsft; allowed: NO, MULTI_GPU, FSDP, DEEPSPEED")
