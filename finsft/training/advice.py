"""What to change when a GPU runs out of memory, as concrete recipe overrides."""

from __future__ import annotations

from finsft.plan import Plan
from finsft.recipe import Recipe


def oom_message(recipe: Recipe, plan: Plan, where: str, resume_cmd: str | None = None) -> str:
    """What to change when CUDA runs out of memory, as concrete recipe overrides."""
    t = recipe.training
    bs, ga = t["per_device_train_batch_size"], t["gradient_accumulation_steps"]
    world = plan.hardware.world_size
    options = []
    if bs > 1:
        nbs = max(1, bs // 2)
        nga = ga * bs // nbs if bs % nbs == 0 else ga * 2
        options.append(f"smaller per-device batch, same effective batch ({nbs * nga * world}): "
                       f"training.per_device_train_batch_size={nbs} training.gradient_accumulation_steps={nga}")
    else:
        options.append("the per-device batch is already 1: shorten the sequences or quantize (below)")
    if not plan.gradient_checkpointing:
        options.append("recompute activations instead of storing them (~30% slower, far less memory): "
                       "training.gradient_checkpointing=true")
    if not plan.packing:
        options.append("pack examples without padding (padding-free batches are smaller): training.packing=true")
    quant = recipe.quantization
    if not (quant and quant["load_in_4bit"]):
        if recipe.lora:
            options.append("load the base model in 4 bits (QLoRA, ~4x less weight memory): "
                           "quantization.load_in_4bit=true")
        else:
            options.append("train a LoRA adapter on a 4-bit base model instead of all weights (QLoRA): add a "
                           '"lora" section and quantization.load_in_4bit=true')
    ml = t["max_length"]
    if ml is None or ml > 128:
        shorter = 512 if ml is None else max(64, ml // 2)
        options.append(f"shorter sequences (longer examples are truncated): training.max_length={shorter}")
    mem = plan.hardware.memory_bytes
    device = plan.hardware.name + (f", {mem / 2**30:.0f} GiB" if mem else "")
    lines = [f"CUDA ran out of memory during {where} ({device}; per-device batch {bs}, max_length {ml}). "
             "Options, each an override for the command line (finsft train RECIPE key.path=value ...):"]
    lines += [f"  - {o}" for o in options]
    if resume_cmd:
        lines.append(f"A changed recipe starts over: add --overwrite (same recipe: {resume_cmd}).")
    return "\n".join(lines)


