"""``finsft merge``: load the recipe's base as it was trained, apply the adapter, merge, verify and save."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from finsft.errors import FinsftError
from finsft.files import run_lock
from finsft.gguf_export import (
    check_architecture,
    check_disk,
    estimate_bytes,
    source_gguf_path,
    weight_shapes,
    write_exports,
)
from finsft.merge import check_out, dtype_name, merge_and_save
from finsft.models import (
    ModelSource,
    adapter_tokenizer_source,
    apply_adapter,
    check_adapter,
    load_model,
    load_tokenizer,
    model_shape,
    resolve_model,
)
from finsft.plan import detect_hardware, get_model_kwargs, plan_run, torch_dtype
from finsft.progress import console
from finsft.publish import read_run, write_model_card
from finsft.recipe import Recipe
from finsft.templates import template_from_recipe
from finsft.training.output import made_by_finsft


def merge_command(recipe: Recipe, *, adapter: str, out: str, gguf: list[str] | None = None) -> dict[str, Any]:
    """Merge the adapter into the recipe's base and save the folder; with ``gguf`` (types such as q8_0), also
    export it to GGUF with an Ollama Modelfile. A full fine-tuned model (a run with ``lora: null``) is exported
    directly: there is nothing to merge."""
    con = console()
    out_dir = Path(out).expanduser().absolute()
    check_out(out_dir)
    path = check_adapter(adapter)
    assert path is not None
    if not made_by_finsft(path):
        return _merge(recipe, path, out_dir, con, gguf)
    with run_lock(path, "finsft merge"):  # a training of that folder (--overwrite) must not replace the adapter now
        return _merge(recipe, path, out_dir, con, gguf)


def _merge(recipe: Recipe, path: Path, out_dir: Path, con: Any, gguf: list[str] | None) -> dict[str, Any]:
    adapter = str(path)
    full = not (path / "adapter_config.json").exists()
    if full and not gguf:
        raise FinsftError(f"'{adapter}' holds a full model, not a LoRA adapter: there is nothing to merge, the folder "
                          "already loads with from_pretrained (add --gguf TYPE to export it to GGUF)")
    source = resolve_model(recipe, log=con.print)
    if gguf:
        _check_export(out_dir, path if full else Path(source.path), source, gguf, merged=not full,
                      trust_remote_code=recipe.model["trust_remote_code"])
    if full:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(ModelSource(str(path), True, str(path)), recipe)
        return write_exports(path, out_dir, gguf or [], tokenizer=tokenizer, name=recipe.name,
                             template=template_from_recipe(recipe.template), source_gguf=source_gguf_path(recipe),
                             log=con.print)
    plan = plan_run(recipe, detect_hardware(), model_shape(source, recipe.model["trust_remote_code"]))
    dtype = torch_dtype(plan.compute_dtype or plan.dtype)
    kwargs = get_model_kwargs(recipe, plan, inference=True)
    tokenizer = load_tokenizer(adapter_tokenizer_source(path, source), recipe)
    peft_model = apply_adapter(load_model(source, kwargs), path, source, con.print)
    con.print(f"merging {path} into {source.description}"
              + (f" (loaded quantized as in training, de-quantized to {dtype_name(dtype)})"
                 if recipe.quantization else ""))
    report = merge_and_save(peft_model, tokenizer, out_dir, dtype=dtype, log=con.print,
                            load_quantized=lambda: load_model(source, kwargs))
    write_merged_card(out_dir, path, recipe, source, con.print)
    if gguf:
        report["gguf"] = write_exports(out_dir, out_dir, gguf, tokenizer=tokenizer, name=recipe.name,
                                       template=template_from_recipe(recipe.template),
                                       source_gguf=source_gguf_path(recipe), log=con.print)["gguf"]
    return report


def _check_export(out_dir: Path, weights: Path, source: ModelSource, types: list[str], *, merged: bool,
                  trust_remote_code: bool) -> None:
    """Before any weights load: the architecture exports, and the disk holds the merged folder (when there is
    one) and every GGUF file."""
    config_path = weights / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        where = str(config_path)
    else:  # a hub id: its config (cached by transformers)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code).to_dict()
        except (OSError, ValueError):
            return  # loading the model reports why it cannot be read, with its own message
        where = source.description
    check_architecture(config, where)
    sizes = {t: estimate_bytes(config, t) for t in types}
    needed = sum(sizes.values())
    if merged:  # the merged folder in float32 at most (the estimate errs high for 16-bit merges)
        needed += int(sum(math.prod(s) for s in weight_shapes(config).values()) * 4)
    files = ", ".join(f"{t} (~{n / 2**20:,.0f} MiB)" for t, n in sizes.items())
    check_disk(out_dir, needed, f"the merged model and {files}" if merged else files)


def write_merged_card(out_dir: Path, adapter: Path, recipe: Recipe, source: Any, log: Any) -> None:
    """The merged folder's model card: from the run folder's records when the adapter is a finsft run (its
    numbers, data and evaluation), else from the recipe alone."""
    if (adapter / "recipe.json").is_file() and (adapter / "manifest.json").is_file():
        run_recipe, manifest, report = read_run(adapter)
    else:
        run_recipe, report = recipe.config, None
        manifest = {"recipe": recipe.name, "recipe_files": recipe.files,
                    "base_model": {"name_or_path": recipe.model["name_or_path"], "hub_id": source.hub_id,
                                   "hub_id_reason": source.hub_id_reason}}
    try:
        write_model_card(out_dir, manifest, run_recipe, report)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # the merged model is saved: a card must not cost it
        log(f"[yellow]warning:[/] the model card {out_dir / 'README.md'} was not written: {exc}")
