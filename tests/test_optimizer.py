"""The "auto" optimizer, chosen by what it costs: fused AdamW while its state is small next to the memory a step
may use, paged 8-bit AdamW where the state is large (full fine-tunes of big models) or memory is short, fused AdamW
under FSDP/ZeRO-3 and on the CPU. Pure functions of (recipe, hardware, model shape); one real optimizer step on
the CPU checks that the fused kernel runs there."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from finsft.plan import Hardware, ModelShape, Parallelism, plan_run
from finsft.plan.memory import fit_limit
from finsft.plan.plan import OPTIMIZER_STATE_SHARE
from finsft.recipe import Recipe, load_recipe

GiB = 2**30
H100 = Hardware(device="cuda", name="NVIDIA H100", bf16=True, tf32=True, memory_bytes=int(79.1 * GiB),
                flash_attn=False, liger=False, compute_capability=(9, 0))
CPU = Hardware(device="cpu", name="cpu", bf16=False, tf32=False, memory_bytes=None, flash_attn=False, liger=False)
GEMMA_2B = ModelShape("gemma", 2048, 16384, 18, 8, 1, 256, 256000, True)
MISTRAL_7B = ModelShape("mistral", 4096, 14336, 32, 32, 8, 128, 32000, False)
SHAPES = {"gemma": GEMMA_2B, "mistral": MISTRAL_7B}


@pytest.fixture
def recipe(make_recipe: Any):  # type: ignore[no-untyped-def]
    def build(**sections: Any) -> Recipe:
        base: dict[str, Any] = {"training": {"per_device_train_batch_size": 8, "max_length": 512}}
        for k, v in sections.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        return load_recipe(str(make_recipe(**base)))

    return build


def _optim(plan: Any) -> tuple[str, bool, str]:
    c = plan.choice("training.optim")
    return c.value, c.automatic, c.reason


def test_adapters_get_fused_adamw_with_the_numbers(recipe: Any) -> None:
    # Gemma-2B QLoRA r16 on all 7 projections: 39M adapter parameters, bf16 (TRL casts them on quantized models)
    qlora = recipe(quantization={"load_in_4bit": True}, lora={"r": 16, "lora_alpha": 32})
    value, automatic, reason = _optim(plan_run(qlora, H100, GEMMA_2B))
    assert (value, automatic) == ("adamw_torch_fused", True)
    assert "0.15 GiB = 0.2% of the 71.5 GiB" in reason and "save 0.11 GiB" in reason
    # Mistral-7B LoRA: fp32 adapters, 0.31 GiB of state
    value, _, reason = _optim(plan_run(recipe(lora={"r": 16, "lora_alpha": 32}), H100, MISTRAL_7B))
    assert value == "adamw_torch_fused" and "0.31 GiB" in reason


def test_a_large_state_or_short_memory_gets_paged_8bit(recipe: Any) -> None:
    # full fine-tune of Mistral-7B in bf16: AdamW keeps 2 x 2 bytes a parameter = 27 GiB, 38% of an H100's budget
    full = plan_run(recipe(lora=None, training={"gradient_checkpointing": True}), H100, MISTRAL_7B)
    value, automatic, reason = _optim(full)
    assert (value, automatic) == ("paged_adamw_8bit", True)
    assert f"(> {OPTIMIZER_STATE_SHARE:.0%})" in reason and "26.98 GiB" in reason and "keeps it in 13.49 GiB" in reason
    # a small full fine-tune keeps fused AdamW: the state is what counts, not the kind of run
    tiny = ModelShape("llama", 576, 1536, 30, 9, 3, 64, 49152, True)  # SmolLM2-135M
    assert _optim(plan_run(recipe(lora=None), H100, tiny))[0] == "adamw_torch_fused"
    # memory short by less than the 8-bit saving: a GPU whose budget lies between the two step estimates
    r = recipe(lora={"r": 16, "lora_alpha": 32}, training={"gradient_checkpointing": True})
    fused = plan_run(r, H100, MISTRAL_7B).memory
    paged = plan_run(recipe(lora={"r": 16, "lora_alpha": 32},
                            training={"gradient_checkpointing": True, "optim": "paged_adamw_8bit"}),
                     H100, MISTRAL_7B).memory
    assert fused is not None and paged is not None and paged.peak < fused.peak
    device = int(((paged.peak + fused.peak) / 2) * 1.1 + GiB // 2)
    hw = replace(H100, memory_bytes=device)
    assert paged.peak <= fit_limit(device) < fused.peak
    value, _, reason = _optim(plan_run(r, hw, MISTRAL_7B))
    assert value == "paged_adamw_8bit" and reason.startswith("memory is short") and "fits" in reason
    plan = plan_run(r, hw, MISTRAL_7B)
    assert plan.memory is not None and plan.memory.fits  # the plan's own estimate uses the chosen optimizer


def test_unknown_size_sharding_cpu_and_pins(recipe: Any) -> None:
    assert _optim(plan_run(recipe(quantization={"load_in_4bit": True}), H100, None))[0] == "paged_adamw_8bit"
    assert _optim(plan_run(recipe(), H100, None))[0] == "adamw_torch_fused"
    value, _, reason = _optim(plan_run(recipe(quantization={"load_in_4bit": True}), H100, GEMMA_2B,
                                       Parallelism("FSDP", 2, True, True, True, "FULL_SHARD")))
    assert value == "adamw_torch_fused" and "bitsandbytes#89" in reason
    value, automatic, reason = _optim(plan_run(recipe(), CPU, MISTRAL_7B))
    assert (value, automatic) == ("adamw_torch_fused", True) and "CPU" in reason
    assert _optim(plan_run(recipe(training={"optim": "paged_adamw_8bit"}), H100, GEMMA_2B)) == (
        "paged_adamw_8bit", False, "pinned by the recipe")


def test_fused_adamw_steps_on_the_cpu_like_plain_adamw() -> None:
    """What the CPU plan relies on: torch's fused AdamW runs on CPU tensors and updates as the plain one does."""
    import torch

    torch.manual_seed(0)
    weights = [torch.randn(64, 16), torch.randn(16, 300)]
    grads = [torch.randn_like(w) for w in weights]
    out = []
    for fused in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=fused)
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
        out.append([p.detach() for p in params])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*out, strict=True))
    assert not torch.equal(out[1][0], weights[0])  # it did step
