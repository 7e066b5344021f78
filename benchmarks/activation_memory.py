"""Calibrate finsft's memory model on any machine (CPU is enough): the bytes autograd saves for backward per
token by ONE decoder layer of a real model configuration, LoRA r16 on all 7 projections, dropout 0.05, bf16
autocast, with CUDA's dropout semantics (1-byte mask), next to what finsft.plan.memory predicts.

usage: python benchmarks/activation_memory.py [CONFIG.json ...] [--tokens 64 192] [--quant 4bit] [--upcast]

Without configs it measures the seed models: Mistral-7B (LoRA bf16) and Gemma-2B (QLoRA nf4, with and without
the fp32 upcast of prepare_model_for_kbit_training). Measured on the project's CPU machine: Mistral-7B 62.59,
Gemma-2B 102.63 (150.63 with the upcast) x hidden bytes per token per layer; the formula gives the same.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from finsft.plan.calibrate import load_config, per_layer_bytes
from finsft.plan.memory import MemorySettings, layer_activation_bytes, read_model_shape

CONFIGS = Path(__file__).resolve().parent.parent / "finsft" / "model_configs"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def run(path: Path, quant: str | None, upcast: bool, tokens: tuple[int, int]) -> dict[str, object]:
    measured = per_layer_bytes(load_config(path), tokens=tokens, quant=quant, lora=LORA, upcast=upcast)
    shape = read_model_shape(path)
    assert shape is not None
    s = MemorySettings(batch=1, max_length=tokens[1], precision="bf16", quantization=quant, packing=False,
                       kbit_upcast=upcast)
    model = layer_activation_bytes(shape, replace(s))
    return {"config": path.stem, "quant": quant, "upcast": upcast, "measured_x_hidden": measured["x_hidden"],
            "model_x_hidden": round(model / shape.hidden, 2),
            "error_pct": round((model / measured["bytes_per_token"] - 1) * 100, 2),
            "breakdown_bytes_per_token": measured["breakdown_per_token"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", type=Path)
    p.add_argument("--tokens", nargs=2, type=int, default=(64, 192))
    p.add_argument("--quant", choices=("4bit",), default=None)
    p.add_argument("--upcast", action="store_true", help="prepare_model_for_kbit_training (fp32 norms)")
    a = p.parse_args()
    jobs = ([(c, a.quant, a.upcast) for c in a.configs] if a.configs else [
        (CONFIGS / "mistralai--Mistral-7B-v0.1.json", None, False),
        (CONFIGS / "google--gemma-2b.json", "4bit", False),
        (CONFIGS / "google--gemma-2b.json", "4bit", True)])
    for path, quant, upcast in jobs:
        print(json.dumps(run(path, quant, upcast, tuple(a.tokens))), flush=True)


if __name__ == "__main__":
    main()
