# ruff: noqa  (a verbatim copy of the hand-written anchor script in the project notes: kept as written)
"""The anchor finsft is measured against: a hand-written TRL + PEFT (+ bitsandbytes) training script, run on
random-weight models of the real shapes (no hub access). Prints one `RESULT {json}` line: tokens/s (non-padding),
s/step and peak GPU memory.

Modes: `seed` trains the way the original notebooks do (padded batches, gradient checkpointing); `packed` adds
best-fit-decreasing packing (padding-free); `packed_nogc` also turns checkpointing off; `--liger` adds Liger kernels
(GPU only). Run it in the same device call as `finsft bench` and compare ratios, never numbers across machines.

usage: python trl_handwritten_bench.py --arch gemma2b|mistral7b|tiny --quant 4bit|none \
           --mode seed|packed|packed_nogc [--liger] --task qa|sentiment --steps N
"""
import argparse
import json
import math
import os
import random
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GemmaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl import SFTConfig, SFTTrainer

p = argparse.ArgumentParser()
p.add_argument("--arch", default="gemma2b")
p.add_argument("--quant", default="4bit")
p.add_argument("--mode", default="seed")
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warm", type=int, default=5)
p.add_argument("--bs", type=int, default=8)
p.add_argument("--max_len", type=int, default=512)
p.add_argument("--task", default="qa")  # qa: long answers; sentiment: short inputs, 1-3 token labels
p.add_argument("--ckpt_dir", default=os.path.join(tempfile.gettempdir(), "anchor_ckpt"))
p.add_argument("--liger", action="store_true")
p.add_argument("--compile", action="store_true")
a = p.parse_args()

dev = "cuda" if torch.cuda.is_available() else "cpu"
if a.arch == "gemma2b":
    cfg = GemmaConfig(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
elif a.arch == "mistral7b":
    cfg = MistralConfig(pad_token_id=0, eos_token_id=2, bos_token_id=1)  # defaults are Mistral-7B's shapes
else:
    cfg = GemmaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, pad_token_id=0, eos_token_id=1,
                      bos_token_id=2)
V = cfg.vocab_size

tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
    {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}, unk_token="<unk>")),
    pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")

rng = random.Random(0)
rows = []
for _ in range(a.bs * (a.steps + a.warm + 4) * 3):
    if a.task == "qa":  # FiQA-like: ~40-token prompt, long-tailed answer
        pl = rng.randint(25, 70); cl = int(min(1500, max(8, rng.lognormvariate(math.log(180), 0.7))))
    else:  # sentiment: instruction + headline ~ 40-90 tokens, label 1-3 tokens
        pl = rng.randint(40, 90); cl = rng.randint(2, 4)
    ids = [2] + [rng.randrange(4, V) for _ in range(pl + cl - 2)] + [1]
    ids = ids[: a.max_len]
    rows.append({"input_ids": ids, "completion_mask": [0] * min(pl, len(ids)) + [1] * max(0, len(ids) - pl)})
ds = Dataset.from_list(rows)

t0 = time.time()
if a.quant == "4bit":
    path = os.path.join(tempfile.gettempdir(), f"rand_{a.arch}")
    if not os.path.exists(path):
        with torch.device(dev):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(path); tok.save_pretrained(path); del m
        torch.cuda.empty_cache() if dev == "cuda" else None
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0} if dev == "cuda" else None,
                                                 attn_implementation="sdpa")
else:
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
load_s = time.time() - t0

lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
packed = a.mode.startswith("packed")
args = SFTConfig(output_dir=a.ckpt_dir, per_device_train_batch_size=a.bs, gradient_accumulation_steps=1,
                 max_steps=a.steps + a.warm, learning_rate=2e-4, lr_scheduler_type="constant", logging_steps=10,
                 save_strategy="no", report_to=[], bf16=(dev == "cuda"), max_length=a.max_len,
                 gradient_checkpointing=(a.mode != "packed_nogc"),
                 optim="paged_adamw_8bit" if dev == "cuda" else "adamw_torch",
                 packing=packed, completion_only_loss=True, include_num_input_tokens_seen="non_padding",
                 dataloader_num_workers=0, disable_tqdm=True, seed=0,
                 use_liger_kernel=a.liger, torch_compile=a.compile)

class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == a.warm:
            if dev == "cuda": torch.cuda.synchronize()
            self.t, self.n = time.time(), state.num_input_tokens_seen
    def on_train_end(self, args, state, control, **kw):
        if dev == "cuda": torch.cuda.synchronize()
        self.dt, self.dn = time.time() - self.t, state.num_input_tokens_seen - self.n

clock = Clock()
tr = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[clock])
if dev == "cuda": torch.cuda.reset_peak_memory_stats()
out = tr.train()
res = dict(liger=a.liger, compile=a.compile, arch=a.arch, quant=a.quant, mode=a.mode, task=a.task, bs=a.bs, max_len=a.max_len, steps=a.steps,
           tokens_per_s=round(clock.dn / clock.dt, 1), s_per_step=round(clock.dt / a.steps, 3),
           peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
           load_s=round(load_s, 1), final_loss=round(out.training_loss, 4))
print("RESULT " + json.dumps(res), flush=True)
