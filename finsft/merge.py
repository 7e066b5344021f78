"""Merge a LoRA adapter into its base model and save a standard model folder (``from_pretrained`` loads it
without PEFT).

A QLoRA adapter was trained on the 4-bit (or 8-bit) base. Its merge target is that base de-quantized into the
compute dtype: the base is loaded quantized exactly as in training and de-quantized right away (bitsandbytes
repacks 4-bit weights for its CPU inference kernel on the first forward pass in eval mode, after which they no
longer de-quantize correctly, so a model that has run is never the one de-quantized), then the adapter's weights
are applied to it and merged.

Checks on a few prompts, before the folder is published: the merged model's logits equal the unmerged adapter
model's (in memory, and again after reloading the saved folder) within a tolerance for the dtype; for a quantized
base, the de-quantized adapter model also stays close to the quantized one it was trained as (bitsandbytes'
kernels round differently from a plain matmul, so that tolerance is looser). A failed check writes nothing. The
folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finsft.errors import FinsftError
from finsft.files import new_folder, write_errors, write_json

VERIFY_TEXTS = (
    "Instruction: What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.\n"
    "Input: The company raised its full-year guidance after record quarterly revenue.\nAnswer:",
    "Shares fell 8% after the bank cut its dividend and warned of higher loan losses.",
    "How should I compare the fees of two index funds before investing?",
)
# Largest allowed |merged - unmerged| logit difference, relative to the largest |logit| (at least 1): float32
# merges are exact up to rounding; 16-bit weights round the merged sum W + BA.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}
# Largest allowed |de-quantized - quantized| logit difference (both with the adapter), relative as above. The
# quantized kernels compute in their own precision (on CPU, bitsandbytes' 4-bit inference kernel is about 1% of
# the logit scale away from a float32 matmul of the de-quantized weights); a wrong de-quantization is off by ~100%.
DEQUANTIZED_TOLERANCE = 0.1


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))


def target_dtype(peft_model: Any) -> Any:
    """The dtype of the merged weights: the 4-bit compute dtype of a QLoRA base, else the base's own dtype."""
    import torch

    base = peft_model.get_base_model()
    quant = getattr(base.config, "quantization_config", None)
    if quant is not None:
        def get(key: str) -> Any:
            return quant.get(key) if isinstance(quant, dict) else getattr(quant, key, None)

        compute = get("bnb_4bit_compute_dtype") if get("load_in_4bit") else None
        dtype = compute or getattr(base.config, "dtype", None) or torch.float32
        return getattr(torch, dtype_name(dtype)) if isinstance(dtype, str) else dtype
    for p in base.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def reload_quantized(base: Any, dtype: Any) -> Any:
    """A fresh copy of a quantized base, loaded as it was (its folder and quantization config)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = base.config.quantization_config
    if isinstance(quant, dict):
        quant = BitsAndBytesConfig.from_dict(quant)
    device = next(base.parameters()).device
    kwargs: dict[str, Any] = {"quantization_config": quant, "dtype": dtype}
    if device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    return AutoModelForCausalLM.from_pretrained(base.config._name_or_path, **kwargs)


def with_adapter(base: Any, peft_model: Any) -> Any:
    """``base`` with the adapter weights of ``peft_model`` applied (unmerged)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    weights = get_peft_model_state_dict(peft_model, adapter_name=name)
    fresh = get_peft_model(base, config, adapter_name=name)
    result = set_peft_model_state_dict(fresh, weights, adapter_name=name)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise FinsftError(f"the adapter's weights did not all load into the de-quantized model: {missing[:3]}")
    return fresh.eval()


def _logits(model: Any, tokenizer: Any) -> list[Any]:
    import torch

    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.inference_mode():
        for text in VERIFY_TEXTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            out.append(model(input_ids=ids).logits.float().cpu())
    return out


def _max_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def check_out(out: Path) -> None:
    """The merged model goes into a new or empty folder only: merge never replaces a file, a folder with anything
    in it (an earlier merge included: it may be in use) or a symbolic link."""
    if out.is_symlink():
        raise FinsftError(f"--out {out} is a symbolic link (to {os.path.realpath(out)}); finsft does not write "
                          "through links: name a new folder for the merged model")
    if out.exists() and not out.is_dir():
        raise FinsftError(f"--out {out} is a file; finsft does not replace it: name a new folder for the merged "
                          "model, e.g. --out runs/NAME-merged")
    if out.exists() and any(out.iterdir()):
        raise FinsftError(f"output folder {out} exists and is not empty; finsft never replaces a folder: choose a "
                          "new folder for the merged model")


def merge_and_save(peft_model: Any, tokenizer: Any, out: str | Path, *, dtype: Any = None,
                   load_quantized: Callable[[], Any] | None = None, log: Any = print) -> dict[str, Any]:
    """Merge, verify against the unmerged model, save to a temporary folder and rename it to ``out``.

    A model on a plain base is merged in place (do not use ``peft_model`` afterwards). For a quantized base,
    ``load_quantized()`` gives a fresh copy of the base to de-quantize (default: reloaded from its folder with its
    quantization config). Returns the verification report, also saved as ``finsft_merge.json``.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out).absolute()
    check_out(out)
    dtype = dtype or target_dtype(peft_model)
    base = peft_model.get_base_model()
    quantized = _is_quantized(base)
    trained = _logits(peft_model, tokenizer)  # the model as trained: on the quantized base for QLoRA
    scale = max(1.0, *(float(t.abs().max()) for t in trained))
    tolerance = RELATIVE_TOLERANCE.get(dtype_name(dtype), 1e-2) * scale
    report: dict[str, Any] = {"dtype": dtype_name(dtype), "dequantized_base": quantized,
                              "prompts": len(VERIFY_TEXTS), "tolerance": tolerance}
    if quantized:
        fresh = load_quantized() if load_quantized else reload_quantized(base, dtype)
        unmerged = with_adapter(fresh.dequantize(dtype=dtype).to(dtype), peft_model)
        reference = _logits(unmerged, tokenizer)
        dequantized, loose = _max_diff(trained, reference), DEQUANTIZED_TOLERANCE * scale
        report["dequantized_vs_quantized"] = {"max_abs_logit_diff": dequantized, "tolerance": loose}
        if dequantized > loose:
            raise FinsftError(f"the de-quantized model disagrees with the quantized one it was trained as: max "
                              f"|logit difference| {dequantized:.3g} > {loose:.3g}; nothing was written")
        merged = unmerged.merge_and_unload().to(dtype)
    else:
        reference = trained
        merged = peft_model.merge_and_unload().to(dtype)
    in_memory = _max_diff(reference, _logits(merged, tokenizer))
    if in_memory > tolerance:
        raise FinsftError(f"the merged model disagrees with the adapter model: max |logit difference| "
                          f"{in_memory:.3g} > tolerance {tolerance:.3g} ({dtype_name(dtype)}); nothing was written")
    check_out(out)
    kept = "nothing was written (the adapter and the base model are unchanged)"
    then = "merge again"
    with new_folder(out, kept, then) as tmp:  # written under a temporary name, renamed into place when whole
        with write_errors(out, kept, then):
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del merged
        saved = _max_diff(reference, _logits(AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype), tokenizer))
        if saved > tolerance:
            raise FinsftError(f"the saved merged model disagrees with the adapter model: max |logit difference| "
                              f"{saved:.3g} > tolerance {tolerance:.3g} ({dtype_name(dtype)}); nothing was written")
        report["max_abs_logit_diff"] = {"in_memory": in_memory, "saved": saved}
        write_json(tmp / "finsft_merge.json", report, replace=False, kept=kept, then=then)
        check_out(out)
    note = ""
    if quantized:
        note = f"; de-quantized vs quantized: {report['dequantized_vs_quantized']['max_abs_logit_diff']:.2e}"
    log(f"merged model saved to {out} ({dtype_name(dtype)}{', de-quantized base' if quantized else ''}); "
        f"max |logit difference| vs the adapter model on {len(VERIFY_TEXTS)} prompts: {in_memory:.2e} in memory, "
        f"{saved:.2e} after reloading (tolerance {tolerance:.2e}){note}")
    return report


def merge_into(model: Any, tokenizer: Any, path: str | Path) -> dict[str, Any]:
    """After training (``output.save_merged``): merge the trained PEFT model into ``path``. A model on a plain
    base is merged in place: do not use it afterwards."""
    from finsft.progress import console

    return merge_and_save(model, tokenizer, path, log=console().print)
