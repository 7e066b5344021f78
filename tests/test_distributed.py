"""Distributed training through accelerate: a real 2-process run on CPU (gloo DDP) that must match one process with
the same effective batch, the world-size checks, and the shipped DDP/FSDP/DeepSpeed configs as accelerate reads
them (FSDP needs an accelerator and DeepSpeed is not installed here, so those are checked up to the environment
accelerate launch gives each process, the plugin accelerate builds from it, and finsft's plan under it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from _runs import BIN, adapter, loss_steps, max_abs_diff, metrics, subprocess_env

from finsft.cli import main as cli
from finsft.errors import FinsftError
from finsft.plan import (
    Hardware,
    get_model_kwargs,
    get_quantization_config,
    parallelism_from_accelerate_config,
    parallelism_from_environment,
    plan_run,
    sharding_engine,
)
from finsft.recipe import load_recipe
from finsft.training.launch import WORKING_CPU_LAUNCH, check_world_size, launcher_warning

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "recipes" / "accelerate"
ENGINE_ENV = ("ACCELERATE_", "FSDP_")


def _launch_args(argv: list[str]) -> Any:
    """accelerate launch's own parsing and config-file merge, without starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before starting DeepSpeed
        fields = [*(defaults.deepspeed_config if defaults else {}), *(["mixed_precision"] if mp_from_config else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args


def _process_env(args: Any) -> dict[str, str]:
    """The ACCELERATE_*/FSDP_* variables accelerate launch gives every training process."""
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    if args.use_deepspeed:
        env = prepare_deepspeed_cmd_env(args)[1]
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    return {k: v for k, v in env.items() if k.startswith(ENGINE_ENV) or k in ("MASTER_ADDR", "MASTER_PORT")}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith(ENGINE_ENV) or key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "RANK"):
            monkeypatch.delenv(key)
    return monkeypatch


# --------------------------------------------------------------------------------------------- world size


def test_a_world_size_mismatch_is_refused() -> None:
    check_world_size(2, 2, "MULTI_CPU")
    check_world_size(1, 1, "NO")
    with pytest.raises(FinsftError) as err:
        check_world_size(2, 1, "NO")  # e.g. `--multi_gpu` on CPU without use_cpu: two lone trainings
    text = str(err.value)
    assert "started 2 processes (WORLD_SIZE=2) but the distributed state has 1 (NO)" in text
    assert "would all write the same output" in text and WORKING_CPU_LAUNCH in text


def test_accelerate_cpu_flag_runs_one_process_and_finsft_says_so(clean_env: pytest.MonkeyPatch) -> None:
    # exactly the environment `accelerate launch --cpu --num_processes 2` gives its single process
    env = _process_env(_launch_args(["--cpu", "--num_processes", "2", "-m", "finsft", "r.json"]))
    assert "WORLD_SIZE" not in env  # one process: nothing tells it about a second one
    for k, v in env.items():
        clean_env.setenv(k, v)
    warning = launcher_warning()
    assert warning is not None and "single process" in warning and WORKING_CPU_LAUNCH in warning

    clean_env.delenv("MASTER_ADDR")  # `accelerate launch --cpu` alone: one process was asked for
    assert launcher_warning() is None


# ---------------------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_accepts_the_shipped_config(name: str, kind: str, clean_env: pytest.MonkeyPatch) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("#") and f"accelerate launch --config_file recipes/accelerate/{name}.yaml -m finsft" in text
    config = load_config_from_file(str(path))  # unknown keys or bad values raise here
    assert isinstance(config, ClusterConfig) and config.distributed_type.value == kind
    assert config.num_processes == 2 and config.mixed_precision == "no" and not config.use_cpu

    args = _launch_args(["--config_file", str(path), "-m", "finsft", "recipes/gemma_qlora.json"])
    assert args.num_processes == 2 and args.module and args.training_script == "finsft"
    env = _process_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the recipe's training.precision decides
    if kind == "FSDP":
        assert env["ACCELERATE_USE_FSDP"] == "true"  # what plan.plan_run reads
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert env["FSDP_USE_ORIG_PARAMS"] == "false" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
        assert env["FSDP_SYNC_MODULE_STATES"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    elif kind == "DEEPSPEED":
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        from accelerate.utils import DeepSpeedPlugin

        for k, v in env.items():
            clean_env.setenv(k, v)
        plugin = DeepSpeedPlugin()  # builds the DeepSpeed config from that environment (deepspeed not needed)
        stage = 3 if name.endswith("3") else 2
        assert plugin.zero_stage == stage
        ds = plugin.deepspeed_config
        # batch, accumulation and clipping are left to the trainer, which fills them from the recipe
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
        assert ds["gradient_clipping"] == "auto"
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    else:
        assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


GPU = Hardware(device="cuda", name="NVIDIA H100 80GB HBM3", bf16=True, tf32=True, memory_bytes=80 * 2**30,
               flash_attn=False, liger=False, world_size=2)


@pytest.mark.parametrize("name, storage, engine", [("ddp", "uint8", None), ("fsdp", "bfloat16", "FSDP"),
                                                   ("deepspeed_zero2", "uint8", None),
                                                   ("deepspeed_zero3", "bfloat16", "DeepSpeed ZeRO-3")])
def test_qlora_plan_under_each_engine(name: str, storage: str, engine: str | None,
                                      clean_env: pytest.MonkeyPatch) -> None:
    """gemma_qlora under each shipped config, in the environment accelerate gives rank 1 of 2."""
    import torch

    for k, v in _process_env(_launch_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "finsft",
                                           "r.json"])).items():
        clean_env.setenv(k, v)
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")  # set by the torch launcher accelerate starts
    recipe = load_recipe(str(REPO / "recipes" / "gemma_qlora.json"))
    plan = plan_run(recipe, GPU)
    assert plan.dtype == plan.compute_dtype == "bfloat16"
    assert plan.quant_storage == storage
    quant = get_quantization_config(recipe, plan)
    assert quant.bnb_4bit_quant_storage == getattr(torch, storage)
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    if engine is None:  # each rank loads its quantized copy on its own GPU
        assert get_model_kwargs(recipe, plan)["device_map"] == {"": 1}
        assert plan.optim == "paged_adamw_8bit"  # QLoRA's optimizer where nothing shards it
    else:  # as PEFT's FSDP/ZeRO-3 + QLoRA examples: no device_map; the quantizer uses the rank's current device
        assert "device_map" not in get_model_kwargs(recipe, plan)
        # bitsandbytes' paged 8-bit state cannot be sharded or gathered (bitsandbytes#89): replaced, with the reason
        assert plan.optim == "adamw_torch_fused" and "bitsandbytes#89" in plan.choice("training.optim").reason
        with pytest.raises(FinsftError) as err:
            plan_run(load_recipe(str(REPO / "recipes" / "gemma_qlora.json"), ["training.optim=paged_adamw_8bit"]), GPU)
        assert "$.training.optim: paged_adamw_8bit" in str(err.value) and "training.optim=auto" in str(err.value)
    assert sharding_engine() == engine  # finsft skips prepare_model_for_kbit_training's float32 upcast then
    # `finsft plan --accelerate-config` reads the same engine from the YAML that accelerate gives the processes
    assert parallelism_from_accelerate_config(CONFIGS / f"{name}.yaml") == parallelism_from_environment()


@pytest.mark.parametrize("yaml_text, expected", [
    ("distributed_type: MULTI_GPU\nnum_processes: 4", ("DDP", 4, False, False, False)),
    ("distributed_type: NO\nnum_processes: 1", ("single", 1, False, False, False)),
    ("distributed_type: FSDP\nnum_processes: 4\nfsdp_config: {fsdp_sharding_strategy: SHARD_GRAD_OP}",
     ("FSDP", 4, False, True, True)),
    ("distributed_type: FSDP\nnum_processes: 4\nfsdp_config: {fsdp_sharding_strategy: 1}", ("FSDP", 4, True, True, True)),
    ("distributed_type: FSDP\nnum_processes: 4\nfsdp_config: {fsdp_version: 2, fsdp_reshard_after_forward: true}",
     ("FSDP", 4, True, True, True)),
    ("distributed_type: DEEPSPEED\nnum_processes: 8\ndeepspeed_config: {zero_stage: 1}",
     ("DeepSpeed ZeRO-1", 8, False, False, True)),
])
def test_parallelism_read_from_an_accelerate_yaml(yaml_text: str, expected: tuple[Any, ...], tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(yaml_text)
    p = parallelism_from_accelerate_config(path)
    assert (p.engine, p.processes, p.shard_weights, p.shard_gradients, p.shard_optimizer) == expected
    assert parallelism_from_accelerate_config(path, 2).processes == 2  # --num-processes wins
    path.write_text("distributed_type: TPU")
    with pytest.raises(FinsftError, match="distributed_type 'TPU' is not planned"):
        parallelism_from_accelerate_config(path)


# ---------------------------------------------------------------------------------------- real 2-process run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_on_cpu_match_one_process_with_the_same_effective_batch(make_recipe: Any,
                                                                              tmp_path: Path) -> None:
    """2 processes x batch 2 (gloo DDP) against 1 process x batch 4, 4 steps.

    Both runs draw the same seeded permutation: accelerate hands consecutive per-device batches of it to the ranks,
    so step k of the DDP run sees exactly the 4 rows of step k of the single run. With the Trainer's default
    average_tokens_across_devices the DDP gradient is the token mean over those 4 rows, the single run's gradient,
    so the two adapters differ only by float summation order (measured: max abs difference 1.5e-8 on weights of
    size ~0.1 after 4 AdamW steps at lr 1e-3). The tolerance 1e-5 is 0.25% of the largest possible move (4 x lr),
    far below any real divergence (a different batch moves weights by ~lr per step). group_by_length is off: the
    length-grouped sampler's mega-batches depend on the per-device batch size, so orders would differ."""
    training = {"max_steps": 4, "group_by_length": False, "logging_steps": 1, "save_steps": 100}
    ddp_recipe = make_recipe("ddp", training={**training, "per_device_train_batch_size": 2})
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
              "-m", "finsft", str(ddp_recipe)]
    proc = subprocess.run(launch, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "distributed: world size 2 (MULTI_CPU, launcher WORLD_SIZE=2; DDP on 2 processes" in proc.stdout
    assert "effective batch" in proc.stdout and "2 per device x 1 accumulation x 2 processes = 4" in proc.stdout
    # only rank 0 prints: one plan, one progress line per report, one summary
    assert proc.stdout.count("finsft: done") == 1 and proc.stdout.count("step 4/4") == 1
    assert proc.stdout.count("finsft: tiny") == 1

    ddp = tmp_path / "ddp-out"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ddp-out")) == ["ddp-out"]
    assert loss_steps(ddp) == [1, 2, 3, 4]  # one record per step: no rank wrote a second log
    assert sum(1 for r in metrics(ddp) if "train_loss" in r) == 1
    manifest = json.loads((ddp / "manifest.json").read_text())
    assert manifest["hardware"]["world_size"] == 2 and manifest["hardware"]["distributed_type"] == "MULTI_CPU"
    assert manifest["train"]["effective_batch"] == 4 and manifest["train"]["global_step"] == 4
    ckpts = list((ddp / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-4"]
    assert sorted(p.name for p in ckpts[0].glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    single_recipe = make_recipe("single", training={**training, "per_device_train_batch_size": 4})
    assert cli([str(single_recipe)]) == 0
    single = tmp_path / "single-out"
    diff = max_abs_diff(adapter(ddp), adapter(single))
    print(f"2 procs x 2 vs 1 proc x 4: max |adapter difference| = {diff:.3g}")
    assert diff < 1e-5
    assert max(float(t.abs().max()) for t in adapter(ddp).values()) > 1e-3  # the adapters did train
    ddp_loss = [r["loss"] for r in metrics(ddp) if "loss" in r]
    single_loss = [r["loss"] for r in metrics(single) if "loss" in r]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-4)


@pytest.mark.slow
def test_two_machine_ranks_on_one_host_train_one_run(make_recipe: Any, tmp_path: Path) -> None:
    """Two `accelerate launch --num_machines 2 --machine_rank 0/1` processes on 127.0.0.1 (gloo), as two nodes of a
    cluster would start: one run, written once, by the main process of machine rank 0."""
    recipe = make_recipe("nodes", training={"max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 100})
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
                  "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                  "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finsft", str(recipe)]
        procs.append(subprocess.Popen(launch, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(logs)
    assert "distributed: world size 2" in logs[0] and "finsft: done" in logs[0]
    assert "finsft: done" not in logs[1]  # only the main process (machine rank 0) prints and writes
    out = tmp_path / "nodes-out"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("nodes-out")) == ["nodes-out"]
    assert loss_steps(out) == [1, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hardware"]["world_size"] == 2 and manifest["train"]["effective_batch"] == 4


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_train_on_two_cpu_ranks(make_recipe: Any, tmp_path: Path) -> None:
    """The shipped DeepSpeed configs, unchanged, on two CPU processes through DeepSpeed's CPU accelerator (gloo):
    2 steps each. ZeRO-2 and ZeRO-3 compute the same steps, so their adapters agree to float rounding."""
    pytest.importorskip("deepspeed")
    adapters = {}
    for stage in (2, 3):
        recipe = make_recipe(f"zero{stage}", training={"max_steps": 2, "per_device_train_batch_size": 2,
                                                       "group_by_length": False, "save_steps": 100})
        launch = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / f"deepspeed_zero{stage}.yaml"),
                  "--main_process_port", str(_free_port()), "-m", "finsft", str(recipe)]
        proc = subprocess.run(launch, cwd=tmp_path, env={**subprocess_env(), "DS_ACCELERATOR": "cpu"},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = tmp_path / f"zero{stage}-out"
        assert loss_steps(out) == [1, 2] and proc.stdout.count("finsft: done") == 1
        assert f"DeepSpeed ZeRO-{stage} on 2 processes" in proc.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["hardware"]["distributed_type"] == "DEEPSPEED" and manifest["hardware"]["world_size"] == 2
        adapters[stage] = adapter(out)
    assert max(float(t.abs().max()) for t in adapters[3].values()) > 1e-4  # the adapters did train
    assert max_abs_diff(adapters[2], adapters[3]) < 1e-5
