"""``finsft merge``: load the recipe's base as it was trained, apply the adapter, merge, verify and save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finsft.errors import FinsftError
from finsft.files import run_lock
from finsft.merge import check_out, dtype_name, merge_and_save
from finsft.models import (
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
from finsft.training.output import made_by_finsft


def merge_command(recipe: Recipe, *, adapter: str, out: str) -> dict[str, Any]:
    con = console()
    out_dir = Path(out).expanduser().absolute()
    check_out(out_dir)
    path = check_adapter(adapter)
    assert path is not None
    if not (path / "adapter_config.json").exists():
        raise FinsftError(f"'{adapter}' holds a full model, not a LoRA adapter: there is nothing to merge, the folder "
                          "already loads with from_pretrained")
    if not made_by_finsft(path):
        return _merge(recipe, path, out_dir, con)
    with run_lock(path, "finsft merge"):  # a training of that folder (--overwrite) must not replace the adapter now
        return _merge(recipe, path, out_dir, con)


def _merge(recipe: Recipe, path: Path, out_dir: Path, con: Any) -> dict[str, Any]:
    source = resolve_model(recipe, log=con.print)
    plan = plan_run(recipe, detect_hardware(), model_shape(source, recipe.model["trust_remote_code"]))
    dtype = torch_dtype(plan.compute_dtype or plan.dtype)
    kwargs = get_model_kwargs(recipe, plan)
    tokenizer = load_tokenizer(adapter_tokenizer_source(path, source), recipe)
    peft_model = apply_adapter(load_model(source, kwargs), path, source, con.print)
    con.print(f"merging {path} into {source.description}"
              + (f" (loaded quantized as in training, de-quantized to {dtype_name(dtype)})"
                 if recipe.quantization else ""))
    report = merge_and_save(peft_model, tokenizer, out_dir, dtype=dtype, log=con.print,
                            load_quantized=lambda: load_model(source, kwargs))
    write_merged_card(out_dir, path, recipe, source, con.print)
    return report


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
