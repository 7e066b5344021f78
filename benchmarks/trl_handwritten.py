"""A hand-written TRL + PEFT training script: what an experienced engineer writes without finsft. benchmarks/speed.py
times it next to finsft on identical settings, so finsft's own overhead shows as a ratio.

It trains on pre-tokenized rows (JSONL of ``input_ids`` + ``completion_mask``) so that both sides see the very same
tokens in the same order, runs ``--warmup`` untimed and ``--steps`` timed optimizer steps, and prints one line
``RESULT {json}`` with non-padding tokens/s (TRL's own count), tokens per CPU-second of this process, seconds/step and
peak memory (CUDA max allocated, or this process's peak RSS on CPU).

usage: python benchmarks/trl_handwritten.py --model DIR --data rows.jsonl --steps 10 --warmup 2 \\
           [--batch 8] [--grad-accum 1] [--max-length 512] [--packing] [--group-by-length] \\
           [--gradient-checkpointing] [--precision fp32|bf16|fp16] [--attn sdpa] [--optim adamw_torch] \\
           [--lora-r 16] [--lora-alpha 32] [--lora-dropout 0.05] [--target-modules all-linear] [--liger] \\
           [--quant 4bit] [--random-weights]

``--quant 4bit`` loads the model as the hand-written QLoRA anchor does (bitsandbytes NF4, double quantization,
compute in the training precision, on GPU 0; no prepare_model_for_kbit_training). ``--random-weights`` builds the
model from the folder's config alone (on the GPU when there is one), for a folder holding only a config and a
tokenizer.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", required=True, help="model folder (config, weights, tokenizer)")
parser.add_argument("--data", required=True, help="JSONL rows with input_ids and completion_mask")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--warmup", type=int, default=2)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--grad-accum", type=int, default=1)
parser.add_argument("--max-length", type=int, default=512)
parser.add_argument("--packing", action="store_true")
parser.add_argument("--group-by-length", action="store_true")
parser.add_argument("--gradient-checkpointing", action="store_true")
parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
parser.add_argument("--attn", default="sdpa")
parser.add_argument("--optim", default="adamw_torch")
parser.add_argument("--lr", type=float, default=2e-4)
parser.add_argument("--lora-r", type=int, default=16)
parser.add_argument("--lora-alpha", type=int, default=32)
parser.add_argument("--lora-dropout", type=float, default=0.05)
parser.add_argument("--target-modules", default="all-linear")
parser.add_argument("--logging-steps", type=int, default=10)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--liger", action="store_true")
parser.add_argument("--quant", choices=("none", "4bit"), default="none")
parser.add_argument("--random-weights", action="store_true")
a = parser.parse_args()

cuda = torch.cuda.is_available()
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.precision]
tokenizer = AutoTokenizer.from_pretrained(a.model)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
if a.random_weights:
    if a.quant != "none":
        sys.exit("--random-weights builds the model from its config; --quant needs saved weights")
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.model), dtype=dtype,
                                                 attn_implementation=a.attn)
elif a.quant == "4bit":
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": 0} if cuda else None, attn_implementation=a.attn)
else:
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn)
rows = load_dataset("json", data_files=a.data, split="train")

targets = a.target_modules if a.target_modules == "all-linear" else a.target_modules.split(",")
lora = LoraConfig(task_type="CAUSAL_LM", r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                  target_modules=targets)
config = SFTConfig(
    output_dir=tempfile.mkdtemp(prefix="trl-handwritten-"),
    max_steps=a.warmup + a.steps,
    per_device_train_batch_size=a.batch,
    gradient_accumulation_steps=a.grad_accum,
    learning_rate=a.lr,
    optim=a.optim,
    max_length=a.max_length,
    packing=a.packing,
    padding_free=a.packing,
    completion_only_loss=True,
    train_sampling_strategy="group_by_length" if a.group_by_length else "random",
    gradient_checkpointing=a.gradient_checkpointing,
    gradient_checkpointing_kwargs={"use_reentrant": False} if a.gradient_checkpointing else None,
    bf16=a.precision == "bf16",
    fp16=a.precision == "fp16",
    use_cpu=not cuda,
    use_liger_kernel=a.liger,
    logging_steps=a.logging_steps,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    include_num_input_tokens_seen="non_padding",
    seed=a.seed,
    data_seed=a.seed,
)


def now() -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


class Stopwatch(TrainerCallback):
    """Wall time and TRL's non-padding token count between the end of the warm-up and the last step."""

    start = end = cpu_start = cpu_end = 0.0
    tokens_start = tokens_end = 0
    losses: list[float] = []  # noqa: RUF012 (one instance)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if a.warmup == 0:
            self.start, self.cpu_start, self.tokens_start = now(), time.process_time(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if a.warmup and state.global_step == a.warmup:
            self.start, self.cpu_start, self.tokens_start = now(), time.process_time(), state.num_input_tokens_seen
        if state.global_step == a.warmup + a.steps:
            self.end, self.cpu_end, self.tokens_end = now(), time.process_time(), state.num_input_tokens_seen


watch = Stopwatch()
trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=lora,
                     callbacks=[watch])
trainer.train()
elapsed = watch.end - watch.start
cpu = watch.cpu_end - watch.cpu_start
tokens = watch.tokens_end - watch.tokens_start
reserved_gib = None
if cuda:
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    reserved_gib = round(torch.cuda.max_memory_reserved() / 2**30, 3)
else:
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
print("RESULT " + json.dumps({
    "tokens_per_s": round(tokens / elapsed, 2),
    "s_per_step": round(elapsed / a.steps, 4),
    "tokens_per_cpu_s": round(tokens / max(cpu, 1e-9), 2),
    "cpu_s_per_step": round(cpu / a.steps, 4),
    "peak_memory_gib": round(peak_gib, 3),
    "peak_reserved_gib": reserved_gib,
    "losses": watch.losses,
    "timed_tokens": tokens,
    "torch_threads": torch.get_num_threads(),
}), flush=True)
