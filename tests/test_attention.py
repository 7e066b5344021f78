"""Attention for packed (padding-free) rows: the plan's choice with its reason, as pure functions of the hardware
and the model's shape; and, on a real tiny Llama on the CPU, that transformers keeps the examples of a packed row
apart under FlexAttention (and SDPA): the same logits and loss as each example run alone.

FlexAttention has no backward on the CPU (torch 2.13), so gradients and speed are stages of
benchmarks/gpu_check.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from finsft.plan import Hardware, ModelShape, Plan, get_model_kwargs, plan_run
from finsft.plan.configs import inference_attention
from finsft.plan.memory import MemorySettings, attention_mask_bytes, layer_activation_bytes
from finsft.plan.plan import _auto_attention
from finsft.recipe import Recipe, load_recipe

GiB = 2**30
H100 = Hardware(device="cuda", name="NVIDIA H100", bf16=True, tf32=True, memory_bytes=80 * GiB, flash_attn=False,
                liger=False, compute_capability=(9, 0))
L4 = replace(H100, name="NVIDIA L4", memory_bytes=22 * GiB, compute_capability=(8, 9))
T4 = Hardware(device="cuda", name="Tesla T4", bf16=False, tf32=False, memory_bytes=16 * GiB, flash_attn=False,
              liger=False, compute_capability=(7, 5))
CPU = Hardware(device="cpu", name="cpu", bf16=False, tf32=False, memory_bytes=None, flash_attn=False, liger=False,
               flex_attn=False)
GEMMA_2B = ModelShape("gemma", 2048, 16384, 18, 8, 1, 256, 256000, True)  # head_dim 256
MISTRAL_7B = ModelShape("mistral", 4096, 14336, 32, 32, 8, 128, 32000, False)  # head_dim 128


@pytest.mark.parametrize(("hw", "pack", "precision", "shape", "expected", "in_reason"), [
    # flash-attn installed and usable: its varlen kernel, packed or not
    (replace(H100, flash_attn=True), True, "bf16", GEMMA_2B, "flash_attention_2", "variable-length kernel"),
    (replace(H100, flash_attn=True), False, "bf16", GEMMA_2B, "flash_attention_2", "installed"),
    # no flash-attn: FlexAttention for packed rows on Ampere or newer, whatever the head_dim on big-SRAM GPUs
    (H100, True, "bf16", GEMMA_2B, "flex_attention", "block mask"),
    (H100, True, "fp16", MISTRAL_7B, "flex_attention", "pip install flash-attn"),
    (replace(H100, compute_capability=(8, 0)), True, "bf16", None, "flex_attention", "compiles only this kernel"),
    # ~99 KiB shared memory (sm_8.9): flex's backward fits head_dim 128, not 256
    (L4, True, "bf16", MISTRAL_7B, "flex_attention", "skips the blocks between examples"),
    (L4, True, "bf16", GEMMA_2B, "sdpa", "head_dim 256 > 128"),
    (L4, True, "bf16", None, "sdpa", "head_dim is unknown"),
    # pre-Ampere, no Triton, fp32: SDPA under the dense mask, each with why
    (T4, True, "fp16", MISTRAL_7B, "sdpa", "compute capability >= 8.0"),
    (replace(H100, flex_attn=False), True, "bf16", MISTRAL_7B, "sdpa", "Triton"),
    (H100, True, "fp32", MISTRAL_7B, "sdpa", "computes in fp32"),
    # padded rows: SDPA's own kernels; the CPU keeps SDPA (no flex backward there)
    (H100, False, "bf16", GEMMA_2B, "sdpa", "padded, not packed"),
    (CPU, False, "fp32", None, "sdpa", "no backward on the CPU"),
    (CPU, True, "fp32", None, "sdpa", "dense block-diagonal mask"),
])
def test_attention_choice_and_reason(hw: Hardware, pack: bool, precision: str, shape: ModelShape | None,
                                     expected: str, in_reason: str) -> None:
    impl, reason = _auto_attention(hw, pack, precision, shape)
    assert (impl, in_reason in reason) == (expected, True), reason
    assert "would need torch.compile" not in reason  # transformers compiles the kernel, not the model


@pytest.fixture
def recipe(make_recipe: Any):  # type: ignore[no-untyped-def]
    def build(**sections: Any) -> Recipe:
        return load_recipe(str(make_recipe(**sections)))

    return build


def _choice(plan: Plan) -> tuple[str, bool, str]:
    c = plan.choice("model.attn_implementation")
    return c.value, c.automatic, c.reason


def test_plan_packs_with_flex_on_an_h100_and_loads_sdpa_for_inference(recipe: Any) -> None:
    plan = plan_run(recipe(), H100, MISTRAL_7B)
    assert plan.packing and _choice(plan)[:2] == ("flex_attention", True)
    assert get_model_kwargs(recipe(), plan)["attn_implementation"] == "flex_attention"
    # eval/predict/merge batches are padded: an automatic flex becomes SDPA there ...
    assert inference_attention(plan) == "sdpa"
    assert get_model_kwargs(recipe(), plan, inference=True)["attn_implementation"] == "sdpa"
    # ... a pinned one is kept
    pinned = plan_run(recipe(model={"attn_implementation": "flex_attention"}), H100, MISTRAL_7B)
    assert _choice(pinned) == ("flex_attention", False, "pinned by the recipe")
    assert inference_attention(pinned) == "flex_attention"


def test_a_pinned_attention_wins_and_unpacked_gpu_runs_keep_sdpa(recipe: Any) -> None:
    pinned = plan_run(recipe(model={"attn_implementation": "sdpa"}), H100, MISTRAL_7B)
    assert pinned.packing and _choice(pinned) == ("sdpa", False, "pinned by the recipe")
    unpacked = plan_run(recipe(training={"packing": False}), H100, MISTRAL_7B)
    assert _choice(unpacked)[:2] == ("sdpa", True)


def test_flex_needs_no_dense_mask_and_no_expanded_kv_in_the_memory_estimate() -> None:
    s = MemorySettings(batch=8, max_length=512, precision="bf16", quantization="4bit", packing=True)
    assert attention_mask_bytes(GEMMA_2B, s) > GiB // 2  # SDPA: 18 layers x [4096, 4096] bf16 + the bool mask
    flex = replace(s, attn_implementation="flex_attention")
    assert attention_mask_bytes(GEMMA_2B, flex) == 0
    # SDPA with a mask expands Gemma's one k/v head to all 8; flex takes grouped k/v as they are (enable_gqa)
    assert layer_activation_bytes(GEMMA_2B, flex) < layer_activation_bytes(GEMMA_2B, s)


# ------------------------------------------------------------------------------------ packed rows, real model


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention without torch.compile: transformers compiles the flex kernel (and its block mask) with
    Inductor, which takes minutes on a shared CPU core; the uncompiled kernel computes the same masked attention
    from the same BlockMask. The compiled kernel is timed and checked against SDPA, gradients included, in
    benchmarks/gpu_check.py's attention stage."""
    import torch
    from transformers.integrations import flex_attention as tf_flex

    def no_compile(fn: Any = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    monkeypatch.setattr(torch, "compile", no_compile)
    # transformers keeps the compiled kernel in a singleton: start from none, and leave none behind
    monkeypatch.setattr(tf_flex.WrappedFlexAttention, "_instance", None)
    monkeypatch.setattr(tf_flex.WrappedFlexAttention, "_is_flex_compiled", False)
    monkeypatch.setattr(tf_flex.WrappedFlexAttention, "_compiled_flex_attention", None)


@pytest.mark.usefixtures("eager_flex")
def test_packed_flex_and_sdpa_rows_equal_each_example_alone() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    sdpa = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    flex = LlamaForCausalLM._from_config(config, attn_implementation="flex_attention").eval()
    flex.load_state_dict(sdpa.state_dict())
    assert flex.config._attn_implementation == "flex_attention"
    lengths = [7, 13, 5, 20]
    examples = [torch.randint(3, 300, (n,)).tolist() for n in lengths]
    # the padding-free batch exactly as TRL's collator builds it for packed training: one row, position_ids
    # restarting at 0 per example, labels -100 at each example's first token, cu_seq_lens for varlen kernels
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": e} for e in examples])
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    with torch.no_grad():
        alone = [sdpa(input_ids=torch.tensor([e]), labels=torch.tensor([e]), use_cache=False) for e in examples]
        want_logits = torch.cat([a.logits[0] for a in alone])
        n = torch.tensor([length - 1 for length in lengths], dtype=torch.float32)  # predicted tokens per example
        want_loss = (torch.stack([a.loss for a in alone]) * n).sum() / n.sum()
        for model in (flex, sdpa):
            # use_cache=False: transformers derives the packed mask from position_ids only without a cache
            packed = model(**batch, use_cache=False)
            assert (packed.logits[0] - want_logits).abs().max().item() < 1e-5, model.config._attn_implementation
            assert abs(packed.loss.item() - want_loss.item()) < 1e-5
        # the comparison can fail: without position_ids the row is one causal sequence and the examples mix
        mixed = flex(input_ids=batch["input_ids"], use_cache=False).logits[0]
        assert (mixed - want_logits).abs().max().item() > 1e-2


def test_scoring_switches_an_automatic_flex_model_to_sdpa_and_back(recipe: Any) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from finsft.models import scoring_attention

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM._from_config(config, attn_implementation="flex_attention"),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    auto, pinned = plan_run(recipe(), H100, MISTRAL_7B), plan_run(
        recipe(model={"attn_implementation": "flex_attention"}), H100, MISTRAL_7B)
    with scoring_attention(model, auto):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "flex_attention"
    with scoring_attention(model, pinned):
        assert model.config._attn_implementation == "flex_attention"
