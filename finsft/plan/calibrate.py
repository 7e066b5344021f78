"""Measure activation memory on any device (CPU included): the bytes autograd saves for the backward pass of
decoder layers of a real configuration, as LoRA training on finsft's path runs them.

Saved tensors are the same bytes on a GPU as on a CPU (the same ops save the same tensors), so the per-layer
coefficients of :mod:`finsft.plan.memory` are calibrated here without a GPU. ``benchmarks/activation_memory.py``
runs this for the shipped model configurations; ``tests/test_memory.py`` measures one small layer.

Imports torch, transformers and peft (and bitsandbytes for 4-bit): never imported by ``finsft plan``.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SavedBytes:
    """Bytes saved for backward by one forward pass, parameters excluded, each storage counted once."""

    total: int
    tokens: int
    by_module: dict[str, int] = field(default_factory=dict)


def _module_label(name: str) -> str:
    """'base_model.model.model.layers.1.mlp.down_proj.lora_dropout.default' -> 'mlp.down_proj.lora_dropout'."""
    parts = [p for p in name.split(".") if p not in ("base_model", "model", "default")]
    if "layers" in parts:
        parts = parts[parts.index("layers") + 2:]
    return ".".join(parts) or "(top)"


def _pop(stack: list[str]) -> Any:
    def hook(module: Any, args: Any, output: Any) -> None:  # returns None: the output stays as it is
        stack.pop()

    return hook


def measure_saved_bytes(model: Any, input_ids: Any, *, autocast_dtype: Any | None = None,
                        labels: Any | None = None) -> SavedBytes:
    """Run one training forward (loss included when ``labels`` is given) and add up the tensors autograd saves."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: set[int] = set()
    by_module: dict[str, int] = defaultdict(int)
    stack: list[str] = ["(top)"]
    handles = []
    for name, module in model.named_modules():
        label = _module_label(name)
        handles.append(module.register_forward_pre_hook(lambda m, a, label=label: stack.append(label)))
        handles.append(module.register_forward_hook(_pop(stack)))

    def pack(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                by_module[stack[-1]] += t.untyped_storage().nbytes()
        return t

    ctx = (torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(input_ids.device.type, enabled=False))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            out = model(input_ids=input_ids, labels=labels, use_cache=False)
        del out
    finally:
        for h in handles:
            h.remove()
    return SavedBytes(total=sum(by_module.values()), tokens=int(input_ids.numel()), by_module=dict(by_module))


class _FusedDropout:
    """Dropout as CUDA runs it (``torch.native_dropout``: a 1-byte mask saved for backward). On CPU, PyTorch's
    dropout multiplies by a noise tensor of the input's dtype and saves that (4 bytes per element in fp32), which
    would overstate a GPU's activation memory."""

    def __enter__(self) -> None:
        import torch

        self.original = torch.nn.Dropout.forward

        def forward(module: Any, x: Any) -> Any:
            if not module.training or module.p == 0:
                return x
            return torch.native_dropout(x, module.p, True)[0]

        torch.nn.Dropout.forward = forward  # type: ignore[method-assign, assignment]

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.nn.Dropout.forward = self.original  # type: ignore[method-assign]


def _lora_model(config: Any, *, layers: int, quant: str | None, lora: dict[str, Any] | None, dtype: Any,
                upcast: bool, workdir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": layers, "vocab_size": 512,
                                      "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if quant == "4bit":
        from transformers import BitsAndBytesConfig

        folder = workdir / f"layers{layers}"
        model.save_pretrained(folder)
        del model
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype,
                                                     attn_implementation="sdpa")
        if upcast:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        if quant:  # what TRL's SFTTrainer does for quantized models: adapters in bf16
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    model.train()
    return model


def per_layer_bytes(config: Any, *, tokens: tuple[int, int] = (64, 192), quant: str | None = None,
                    lora: dict[str, Any] | None = None, dtype: str = "bfloat16", upcast: bool = False,
                    seed: int = 0) -> dict[str, Any]:
    """Saved-for-backward bytes of ONE decoder layer per token: the difference between a 2-layer and a 1-layer
    model of ``config``'s shapes (vocabulary cut to 512: the head is not part of a layer), at two sequence lengths,
    so that the per-token slope is separated from per-step constants (bf16 copies of fp32 adapter weights under
    autocast). Dropout saves a 1-byte mask as on CUDA. Returns the slope in bytes per token, its multiple of the
    hidden size, the constant bytes, and the per-module slope."""
    import torch

    torch_dtype = getattr(torch, dtype)
    runs: dict[tuple[int, int], SavedBytes] = {}
    with tempfile.TemporaryDirectory() as tmp, _FusedDropout():
        for layers in (1, 2):
            model = _lora_model(config, layers=layers, quant=quant, lora=lora, dtype=torch_dtype, upcast=upcast,
                                workdir=Path(tmp))
            for n in tokens:
                g = torch.Generator().manual_seed(seed)
                ids = torch.randint(3, 512, (1, n), generator=g)
                runs[layers, n] = measure_saved_bytes(
                    model, ids, autocast_dtype=torch_dtype if dtype != "float32" else None)
            del model
    lo, hi = tokens
    layer = {n: runs[2, n].total - runs[1, n].total for n in tokens}
    slope = (layer[hi] - layer[lo]) / (hi - lo)
    hidden = config.get_text_config().hidden_size
    modules = set(runs[2, hi].by_module)

    def delta(n: int, k: str) -> int:
        return runs[2, n].by_module.get(k, 0) - runs[1, n].by_module.get(k, 0)

    breakdown = {k: (delta(hi, k) - delta(lo, k)) / (hi - lo) for k in sorted(modules)}
    return {"bytes_per_token": slope, "x_hidden": round(slope / hidden, 2),
            "constant_bytes": round(layer[lo] - slope * lo), "tokens": list(tokens),
            "breakdown_per_token": {k: round(v, 1) for k, v in breakdown.items() if abs(v) > 0.5}}


def load_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


def config_dict(path: str | Path) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()))
