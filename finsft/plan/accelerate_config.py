"""``finsft plan --accelerate-config FILE``: the file read and checked as ``accelerate launch`` and DeepSpeed read
it, every problem reported at once, one line per key (the file, the key, the value, what is allowed).

What accelerate 1.x accepts (accelerate/commands/config/config_args.py and utils/dataclasses.py of the installed
version; ``tests/test_faults_round3_surface.py`` compares the key list with the installed ``ClusterConfig``):

- the file is a mapping; ``deepspeed_config`` and ``fsdp_config`` are mappings too;
- ``distributed_type`` is one of ``DistributedType``'s names (YAML 1.1 reads an unquoted ``NO`` as false: that is
  ``NO``); finsft plans ``NO``, the ``MULTI_*`` types (DDP), ``FSDP`` and ``DEEPSPEED``;
- ``num_processes`` and ``num_machines`` are whole numbers of at least 1;
- ``deepspeed_config.zero_stage`` is 0, 1, 2 or 3 (DeepSpeed's stages); ``fsdp_config.fsdp_version`` is 1 or 2;
  ``fsdp_config.fsdp_sharding_strategy`` a strategy name or its number 1-5;
- ``mixed_precision`` is no, fp16, bf16 or fp8;
- any other top-level key makes ``accelerate launch`` refuse the file ("had unknown keys").

A DeepSpeed JSON (``zero_optimization``, ``train_micro_batch_size_per_gpu``...) given as the accelerate config is
refused with the fix: ``accelerate launch --config_file ds.json`` refuses it too (unknown keys), so planning it as
one process would plan a run that cannot start. The accelerate YAML that points at it with
``deepspeed_config.deepspeed_config_file`` is planned: its ``zero_optimization.stage`` is read from the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finsft.errors import FinsftError, did_you_mean

# accelerate's DistributedType names (accelerate/utils/dataclasses.py)
DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
                     "DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM", "MULTI_HPU", "MULTI_NEURON")
PLANNED_TYPES = tuple(t for t in DISTRIBUTED_TYPES if t not in ("XLA", "MEGATRON_LM"))
# ClusterConfig's fields (a local machine's config), plus the legacy keys process_config converts
CONFIG_KEYS = ("command_file", "commands", "compute_environment", "debug", "deepspeed_config", "distributed_type",
               "downcast_bf16", "dynamo_config", "enable_cpu_affinity", "fp8_config", "fsdp_config", "gpu_ids",
               "machine_rank", "main_process_ip", "main_process_port", "main_training_function", "megatron_lm_config",
               "mixed_precision", "mpirun_config", "num_machines", "num_processes", "parallelism_config",
               "rdzv_backend", "same_network", "tpu_env", "tpu_name", "tpu_use_cluster", "tpu_use_sudo", "tpu_vm",
               "tpu_zone", "use_cpu")
LEGACY_KEYS = ("fp16", "dynamo_backend")
FSDP_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
# Top-level keys of a DeepSpeed configuration JSON (deepspeed.runtime.config), none of which accelerate's file has.
DEEPSPEED_KEYS = ("zero_optimization", "train_batch_size", "train_micro_batch_size_per_gpu",
                  "gradient_accumulation_steps", "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16",
                  "zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown")
MAX_CONFIG_BYTES = 1 * 2**20


def read_config_text(path: str | Path) -> str:
    """The text of a configuration file the user names: THE one place this module reads a file (finsft/files.py's
    gate for small text files)."""
    from finsft.files import read_small_text

    return read_small_text(path, MAX_CONFIG_BYTES)


def _load(path: str | Path, what: str) -> Any:
    """The parsed YAML (or JSON, which is YAML) of ``path``; FinsftError naming ``what`` (the option) when it
    cannot be read."""
    import yaml

    from finsft.files import NotASmallFile

    try:
        text = read_config_text(path)
    except FileNotFoundError:
        raise FinsftError(f"{what} {path}: the file does not exist (give the YAML that `accelerate config` wrote, "
                          "e.g. recipes/accelerate/ddp.yaml)") from None
    except NotASmallFile as exc:
        raise FinsftError(f"{what} {path}: {exc}; give an accelerate YAML file") from None
    except UnicodeDecodeError as exc:
        raise FinsftError(f"{what} {path}: not UTF-8 text (byte {exc.start}); give an accelerate YAML file") from None
    except OSError as exc:
        raise FinsftError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FinsftError(f"{what} {path}: not valid YAML ({' '.join(str(exc).split())})") from None


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else repr(value)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", int: "a number",
            float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)


def _whole(value: Any, low: int, high: int | None = None) -> int | None:
    """``value`` as a whole number in [low, high] (a number, or digits in a string as accelerate's environment
    variables carry them), else None. true/false are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value < low or (high is not None and value > high):
        return None
    return value


def _mapping(config: dict[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        example = "{zero_stage: 2}" if key == "deepspeed_config" else "{fsdp_version: 2}"
        problems.append(f"{key}: {_kind(value)} ({_show(value)[:80]}); allowed: a mapping of settings, e.g. "
                        f"`{key}: {example}`")
        return {}
    return value


def distributed_type(config: dict[str, Any]) -> str:
    raw = config.get("distributed_type", "NO")
    return "NO" if raw is False or raw is None else str(raw).strip().upper()


def check_accelerate_config(config: Any, num_processes: int | None = None,
                            deepspeed_file: Any = None) -> list[str]:
    """Every problem of a parsed accelerate config, one line per key (without the file name)."""
    if isinstance(config, dict) and any(k in config for k in DEEPSPEED_KEYS) and "distributed_type" not in config:
        keys = ", ".join(k for k in DEEPSPEED_KEYS if k in config)
        return [f"this is a DeepSpeed configuration ({keys}), not an accelerate config; accelerate launch refuses it "
                "as --config_file too. Point an accelerate YAML at it: `distributed_type: DEEPSPEED` with "
                "`deepspeed_config: {deepspeed_config_file: THIS_FILE}` (see recipes/accelerate/deepspeed_zero3.yaml), "
                "and give that YAML to --accelerate-config and to accelerate launch --config_file"]
    if not isinstance(config, dict):
        return [f"the file holds {_kind(config)} ({_show(config)[:80]}); allowed: a mapping of accelerate settings as "
                "`accelerate config` writes it (distributed_type, num_processes, ...)"]
    problems: list[str] = []
    bad_keys = [k for k in config if not isinstance(k, str)]
    sagemaker = str(config.get("compute_environment", "")).upper() == "AMAZON_SAGEMAKER"
    for key in config:
        if isinstance(key, str) and not sagemaker and key not in CONFIG_KEYS + LEGACY_KEYS:
            problems.append(f"{key}: not a setting accelerate knows (accelerate launch refuses the file: \"unknown "
                            f"keys\").{did_you_mean(key, CONFIG_KEYS)}")
    for key in bad_keys:
        problems.append(f"{_show(key)}: a key must be a setting's name, not {_kind(key)}")
    kind = distributed_type(config)
    if kind not in DISTRIBUTED_TYPES:
        problems.append(f"distributed_type '{config.get('distributed_type')}' is not planned by finsft: accelerate "
                        f"knows no such type.{did_you_mean(kind, DISTRIBUTED_TYPES)} Allowed: "
                        f"{', '.join(DISTRIBUTED_TYPES)}")
    elif kind not in PLANNED_TYPES:
        problems.append(f"distributed_type '{kind}' is not planned by finsft (it plans NO, MULTI_GPU and the other "
                        "MULTI_* types, FSDP and DEEPSPEED)")
    for key in ("num_processes", "num_machines"):
        if key in config and _whole(config[key], 1) is None:
            problems.append(f"{key}: {_show(config[key])}; allowed: a whole number of at least 1")
    if num_processes is not None and num_processes < 1:
        problems.append(f"--num-processes {num_processes}; allowed: a whole number of at least 1")
    if "mixed_precision" in config:
        mp = config["mixed_precision"]
        mp = "no" if mp is False or mp is None else mp
        if str(mp).lower() not in MIXED_PRECISION:
            problems.append(f"mixed_precision: {_show(config['mixed_precision'])}; allowed: "
                            f"{', '.join(MIXED_PRECISION)} (quote 'no' in YAML)")
    ds = _mapping(config, "deepspeed_config", problems)
    fsdp = _mapping(config, "fsdp_config", problems)
    if "zero_stage" in ds and _whole(ds["zero_stage"], 0, 3) is None:
        problems.append(f"deepspeed_config.zero_stage: {_show(ds['zero_stage'])}; allowed: 0, 1, 2 or 3 "
                        "(DeepSpeed's ZeRO stages; 3 shards the weights too)")
    if kind == "DEEPSPEED" and isinstance(deepspeed_file, dict):
        zero = deepspeed_file.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if _whole(stage, 0, 3) is None:
            problems.append(f"deepspeed_config.deepspeed_config_file: zero_optimization.stage {_show(stage)}; "
                            "allowed: 0, 1, 2 or 3")
    if "fsdp_version" in fsdp and _whole(fsdp["fsdp_version"], 1, 2) is None:
        problems.append(f"fsdp_config.fsdp_version: {_show(fsdp['fsdp_version'])}; allowed: 1 or 2")
    strategy = fsdp.get("fsdp_sharding_strategy")
    if strategy is not None and str(strategy).strip().upper() not in FSDP_STRATEGIES \
            and _whole(strategy, 1, len(FSDP_STRATEGIES)) is None:
        problems.append(f"fsdp_config.fsdp_sharding_strategy: {_show(strategy)}; allowed: "
                        f"{', '.join(FSDP_STRATEGIES)} (or their numbers 1-{len(FSDP_STRATEGIES)})")
    return problems


def read_accelerate_config(path: str | Path, num_processes: int | None = None) -> tuple[dict[str, Any], Any]:
    """(the accelerate config, the DeepSpeed JSON its ``deepspeed_config_file`` names or None), checked; one
    FinsftError listing every problem, each with the file and the key."""
    what = "--accelerate-config"
    config = _load(path, what)
    deepspeed_file = None
    ds = config.get("deepspeed_config") if isinstance(config, dict) else None
    ref = ds.get("deepspeed_config_file") if isinstance(ds, dict) else None
    if isinstance(config, dict) and distributed_type(config) == "DEEPSPEED" and ref:
        # accelerate hands the path to DeepSpeed as written: relative to the folder accelerate launch runs in
        deepspeed_file = _load(str(ref), f"{what} {path}: deepspeed_config.deepspeed_config_file")
        if not isinstance(deepspeed_file, dict):
            raise FinsftError(f"{what} {path}: deepspeed_config.deepspeed_config_file {ref}: holds "
                              f"{_kind(deepspeed_file)}; allowed: a DeepSpeed JSON object (zero_optimization, ...)")
    problems = check_accelerate_config(config, num_processes, deepspeed_file)
    if len(problems) == 1:
        raise FinsftError(f"{what} {path}: {problems[0]}")
    if problems:
        raise FinsftError(f"{what} {path}: {len(problems)} problems:\n" + "\n".join(f"- {p}" for p in problems))
    return config, deepspeed_file
