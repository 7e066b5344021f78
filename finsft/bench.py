"""``finsft bench``: time training steps of a recipe, as configured for this hardware, against the way the original
notebooks train (padded batches in random order, no packing, gradient checkpointing on, no Liger kernels), in the
same run.

Each configuration runs in its own Python process (``python -m finsft.bench worker ...``) so that peak memory is
honest: process peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Both build their trainer with the
same code as ``finsft train`` (:func:`finsft.models.load_training_model`, :func:`finsft.training.trainer.build_trainer`).
Nothing is written to the recipe's output folder; checkpoints go to a temporary folder.

Also here: synthetic data shaped like the FinGPT sets (for data-preparation benchmarks, and for ``--random-weights``
runs whose hub dataset is not available offline) and a synthetic tokenizer of a model's vocabulary size (for
``--random-weights`` runs of a hub model whose tokenizer is not downloaded).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finsft.errors import DataError, FinsftError, ModelLoadError
from finsft.recipe import Recipe, recipe_from_dict

# ------------------------------------------------------------------------------------------- synthetic data

SENTIMENT_INSTRUCTIONS = (
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
    "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}.",
    "What is the sentiment of this news? Please choose an answer from {strong negative/moderately negative/"
    "mildly negative/neutral/mildly positive/moderately positive/strong positive}.",
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
)
FINGPT9 = ("strong negative", "moderately negative", "mildly negative", "negative", "neutral", "positive",
           "mildly positive", "moderately positive", "strong positive")
QA_INSTRUCTION = ("Utilize your financial knowledge, give your answer or opinion to the input question or subject . "
                  "Answer format is not limited.")
_WORD_TEXT = (
    "the company reported quarterly revenue profit loss shares stock market investors analysts expect growth "
    "earnings per share guidance dividend bank interest rates inflation bond yields rose fell percent million "
    "billion year sales net income operating margin outlook forecast raised cut downgrade upgrade buy sell hold "
    "price target fund portfolio risk capital debt credit rating merger acquisition deal agreement contract "
    "customers products demand supply chain costs higher lower strong weak quarter fiscal second third fourth "
    "first results announced said today new plans expansion production plant workers jobs energy oil gas "
    "retail consumer technology software chips cloud data services insurance mortgage loans deposits tax "
    "government regulators central federal reserve policy economy recession recovery trading volume index "
    "futures currency dollar euro exchange sector peers competition management chief executive officer board "
    "shareholders stake offering ipo valuation cash flow balance sheet assets liabilities equity return "
    "account savings retirement pension payment card fees account holders how should i can you what is a "
    "for and of to in on with by from at as it its this that will would could may not no more than about"
)
_WORDS = tuple(_WORD_TEXT.split())


def _sentence(rng: random.Random, n_words: int) -> str:
    words = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.04:
            words.append(f"{rng.uniform(0.1, 99):.1f}%")
        elif r < 0.07:
            words.append("$" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(2, 4))))
        elif r < 0.09:
            words.append(str(rng.randint(2, 2025)))
        else:
            words.append(rng.choice(_WORDS))
    text = " ".join(words)
    return text[:1].upper() + text[1:] + "."


def synthetic_rows(kind: str, n: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """``n`` rows ``{"instruction", "input", "output"}`` shaped like a FinGPT set.

    ``sentiment``: fingpt-sentiment-train (one of four instructions, ~30-word news inputs, 9 labels);
    ``qa``: fingpt-fiqa_qa (a ~15-word question, an answer of ~130 words with a long tail).
    """
    if kind not in ("sentiment", "qa"):
        raise ValueError(f"unknown synthetic data kind '{kind}' (use 'sentiment' or 'qa')")
    rng = random.Random(seed)
    for _ in range(n):
        if kind == "sentiment":
            words = max(5, min(80, int(rng.gauss(30, 10))))
            yield {"instruction": rng.choice(SENTIMENT_INSTRUCTIONS), "input": _sentence(rng, words),
                   "output": rng.choice(FINGPT9)}
        else:
            answer = int(min(1100, max(6, rng.lognormvariate(math.log(130), 0.7))))
            yield {"instruction": QA_INSTRUCTION, "input": _sentence(rng, rng.randint(6, 30))[:-1] + "?",
                   "output": " ".join(_sentence(rng, min(40, answer - i)) for i in range(0, answer, 40))}


def write_synthetic(path: str | Path, kind: str, n: int, seed: int = 0) -> Path:
    """Write :func:`synthetic_rows` as JSONL."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in synthetic_rows(kind, n, seed):
            f.write(json.dumps(row) + "\n")
    return path


def synthetic_kind(template: Any) -> str | None:
    """The synthetic data shape for a template that reads only instruction/input/output, else None."""
    if not set(template.fields) <= {"instruction", "input", "output"}:
        return None
    return "sentiment" if template.is_classification else "qa"


# --------------------------------------------------------------------------------------- synthetic tokenizer


def synthetic_tokenizer(config: Any, texts: list[str], *, max_trained: int = 32_000) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` whose ids fit the model's vocabulary and whose BOS/EOS/PAD ids
    are the config's: token counts close to a real tokenizer's, for timing a random-weight model whose tokenizer is
    not downloaded. Adds BOS to every sequence, as the Llama-family tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from finsft.testing import CHAT_TEMPLATE

    cfg = config.get_text_config()
    vocab_size = int(cfg.vocab_size)
    wanted = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}
    ids = {k: (v[0] if isinstance(v, list) else v) for k, v in wanted.items()}
    names = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}
    taken = {v for v in ids.values() if v is not None}
    free = (i for i in range(vocab_size) if i not in taken)
    for k in ("eos", "bos", "pad"):
        if ids[k] is None or ids[k] >= vocab_size:
            ids[k] = ids["eos"] if k == "pad" and ids["eos"] is not None else next(free)
            taken.add(ids[k])
    specials = {names[k]: i for k, i in ids.items() if k != "pad" or ids["pad"] != ids["eos"]}
    trainer = trainers.BpeTrainer(vocab_size=max(300, min(max_trained, vocab_size - len(taken))),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(texts, trainer)
    model = json.loads(trained.to_str())["model"]
    # Renumber the learned tokens around the config's special-token ids.
    free_ids = (i for i in range(vocab_size) if i not in set(specials.values()))
    vocab = {tok: next(free_ids) for tok, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])}
    vocab.update(specials)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", specials["<bos>"])])
    pad = "<pad>" if "<pad>" in specials else "<eos>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token=pad)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ------------------------------------------------------------------------------------------------ the bench


def baseline_plan(plan: Any) -> Any:
    """The notebook way on the same hardware: padded batches in random order, no packing, gradient checkpointing,
    no Liger kernels, the LM head as TRL projects it; precision, optimizer and everything else as the recipe's plan,
    and its attention unless that was FlexAttention chosen for packed rows (padded rows get SDPA, as the plan gives
    unpacked runs)."""
    from finsft.plan import Choice
    from finsft.plan.configs import inference_attention

    why = "notebook-style baseline"
    attn = inference_attention(plan)
    changed = {"training.packing": False, "training.group_by_length": False,
               "training.gradient_checkpointing": True, "training.use_liger_kernel": False,
               "training.supervised_lm_head": None,
               **({"model.attn_implementation": attn} if attn != plan.attn_implementation else {})}
    choices = [Choice(c.setting, changed[c.setting], why, False) if c.setting in changed else c for c in plan.choices]
    return replace(plan, packing=False, group_by_length=False, gradient_checkpointing=True, use_liger_kernel=False,
                   supervised_lm_head=None, attn_implementation=attn, choices=choices)


def plan_settings(plan: Any) -> dict[str, Any]:
    return {"packing": plan.packing, "group_by_length": plan.group_by_length,
            "gradient_checkpointing": plan.gradient_checkpointing, "use_liger_kernel": plan.use_liger_kernel,
            "precision": plan.precision, "attn_implementation": plan.attn_implementation, "optim": plan.optim,
            "tf32": plan.tf32, "supervised_lm_head": plan.supervised_lm_head}


# ------------------------------------------------------------------------------------- warm-up, cold start, MFU

# "auto" warm-up: until the time per token of the last WARMUP_WINDOW steps is within WARMUP_TOLERANCE of their
# median (the first step never counts: it pays for first-touch allocations and kernel selection), at most
# WARMUP_CAP steps.
WARMUP_WINDOW = 3
WARMUP_TOLERANCE = 0.10
WARMUP_CAP = 10


def warmup_end(step_times: list[float], *, window: int = WARMUP_WINDOW, tolerance: float = WARMUP_TOLERANCE,
               cap: int = WARMUP_CAP) -> tuple[int, bool] | None:
    """When the warm-up of the steps timed so far ends: ``(warm-up steps, stable)`` or None (not yet).

    ``step_times``: seconds of each step so far, in order (normalised per token when batches differ in size).
    Stable when the last ``window`` steps, not counting the first step, are all within ``tolerance`` (relative) of
    their median; otherwise the warm-up ends unstable at ``cap`` steps."""
    n = len(step_times)
    if n - 1 >= window:
        last = step_times[-window:]
        mid = sorted(last)[len(last) // 2]
        if mid > 0 and all(abs(t - mid) <= tolerance * mid for t in last):
            return n, True
    if n >= cap:
        return n, False
    return None


def cold_start_seconds(warmup_times: list[float], warmup_tokens: list[int], timed_seconds: float,
                       timed_tokens: int) -> float:
    """The seconds the warm-up steps took beyond what their tokens cost at the timed (warm) rate: kernel
    compilation, first-touch allocations, cold caches. Never negative."""
    if not warmup_times or timed_tokens <= 0:
        return 0.0
    warm = sum(warmup_tokens) * timed_seconds / timed_tokens
    return max(0.0, sum(warmup_times) - warm)


# Dense bf16/fp16 tensor peaks (TFLOPS, no sparsity) from the vendors' datasheets, matched against the device name
# in order (the first match wins). T4 has no bf16: its fp16 peak. A10G: AWS publishes no datasheet; the figure is
# the commonly reported one for the G5 instances.
PEAK_TFLOPS_16BIT: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("A6000", 154.8), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
    ("V100", 125.0), ("T4", 65.0),
)


def peak_flops(device_name: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for the training precision, where it comes from). None on CPUs (no honest peak
    for a shared, frequency-scaling CPU core), for fp32 and for devices missing from the table."""
    if precision not in ("bf16", "fp16"):
        return None, f"no {precision} peak in finsft's table (bf16/fp16 tensor-core peaks only)"
    for key, tflops in PEAK_TFLOPS_16BIT:
        if key.lower() in device_name.lower():
            return tflops * 1e12, f"{key} dense {precision} peak {tflops:g} TFLOPS"
    return None, f"'{device_name}' is not in finsft's table of peaks"


def training_flops_per_token(config: Any, seq_len: int, full_fine_tune: bool) -> int:
    """Training FLOPs per token from the model's config (TRL's ``compute_flops_per_token``: matmuls, attention
    scores at ``seq_len`` and the LM head, forward + backward = 3 x forward, i.e. ~6N). An adapter run computes no
    gradients of the frozen base weights, so it counts 2 x forward (~4N), as the issue's MFU figures do."""
    from trl.trainer.utils import compute_flops_per_token

    full = int(compute_flops_per_token(config.get_text_config(), max(1, int(seq_len))))
    return full if full_fine_tune else full * 2 // 3


def mfu_percent(tokens_per_s: float, flops_per_token: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device, in percent (TRL's ``compute_mfu``), or None without a peak."""
    if peak is None or peak <= 0:
        return None
    from trl.trainer.utils import compute_mfu

    return round(float(compute_mfu(flops_per_token, tokens_per_s, 1, peak)), 2)


def compile_cache_env(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR under finsft's cache folder, unless the user set them: compiled
    kernels then survive the process (the default Inductor cache is under /tmp), so a second run starts warm."""
    from finsft.files import cache_dir

    root = cache_dir() / "compile"
    wanted = {"TRITON_CACHE_DIR": str(root / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}
    return {k: v for k, v in wanted.items() if not environ.get(k)}


def timing_rows(train_ds: Any, recipe: Recipe, steps: int, warmup: int) -> Any:
    """The rows a bench times on: a seeded random sample of the prepared training rows, the same for the recipe and
    the baseline, large enough for every timed step (also when packed) and for length grouping at full strength
    (transformers sorts mega-batches of min(rows / (4 x batch), 50) batches)."""
    import numpy as np
    import pyarrow.compute as pc

    train = recipe.training
    per_step = train["per_device_train_batch_size"] * train["gradient_accumulation_steps"]
    lengths = pc.list_value_length(train_ds.with_format("arrow")["input_ids"])
    mean_len = float(np.mean(np.asarray(lengths))) if len(train_ds) else 1.0
    pack = math.ceil((train["max_length"] or 1024) / mean_len) + 1
    n = max(per_step * (steps + warmup) * pack, 200 * per_step)
    if n >= len(train_ds):
        return train_ds
    return train_ds.shuffle(seed=train["seed"]).select(range(n)).flatten_indices()


def train_batch(recipe: Recipe) -> int:
    """Rows per optimizer step of one process."""
    return int(recipe.training["per_device_train_batch_size"] * recipe.training["gradient_accumulation_steps"])


def _peak_memory() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30, "CUDA max allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "process peak RSS"


def _clock(warmup: int | None, steps: int) -> Any:
    """The timing callback: ``warmup`` untimed steps (None: until the time per token is stable, see
    :func:`warmup_end`), then ``steps`` timed steps, then it stops the training."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    class Clock(TrainerCallback):
        """Time and non-padding tokens of the steps after the warm-up."""

        def __init__(self) -> None:
            self.t0 = self.t1 = self.cpu0 = self.cpu1 = 0.0
            self.n0 = self.n1 = 0
            self.loss: float | None = None
            self.losses: list[float] = []
            self.train_begin = 0.0
            self.warmup_steps: int | None = None
            self.stable: bool | None = None  # None: a fixed warm-up
            self.step_s: list[float] = []  # every step's seconds and tokens, in order
            self.step_tokens: list[int] = []
            self._last, self._last_n = 0.0, 0

        def _start(self, state: Any, t: float) -> None:
            self.t0, self.cpu0, self.n0 = t, time.process_time(), int(state.num_input_tokens_seen or 0)
            self.warmup_steps = state.global_step

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.train_begin = self._last = now()
            self._last_n = int(state.num_input_tokens_seen or 0)
            if warmup == 0:
                self._start(state, self._last)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            t, n = now(), int(state.num_input_tokens_seen or 0)
            self.step_s.append(t - self._last)
            self.step_tokens.append(n - self._last_n)
            self._last, self._last_n = t, n
            if self.warmup_steps is None:
                if warmup is not None:
                    if state.global_step == warmup:
                        self._start(state, t)
                else:
                    per_token = [s / max(k, 1) for s, k in zip(self.step_s, self.step_tokens, strict=True)]
                    end = warmup_end(per_token)
                    if end is not None:
                        self.stable = end[1]
                        self._start(state, t)
            elif state.global_step == self.warmup_steps + steps:
                self.t1, self.cpu1, self.n1 = t, time.process_time(), n
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kw: Any) -> None:
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                self.losses.append(self.loss)

    return Clock()


def _fallback_data(recipe: Recipe, template: Any, workdir: Path, exc: DataError, log: Callable[[str], None]) -> Recipe:
    kind = synthetic_kind(template)
    if kind is None:
        raise DataError(f"{exc} (--random-weights can stand in synthetic data only for instruction/input/output "
                        "templates)") from exc
    labels = template.labels
    path = workdir / f"synthetic_{kind}.jsonl"
    if not path.exists():
        rows = list(synthetic_rows(kind, 20_000, seed=recipe.training["seed"]))
        if labels:
            rng = random.Random(0)
            for r in rows:
                r["output"] = rng.choice(labels)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    log(f"data '{recipe['data']['path']}' is not available ({exc}); timing on 20,000 synthetic rows shaped like "
        f"FinGPT {kind} instead")
    return recipe.with_changes({"data": {"path": str(path), "columns": {}, "validation_path": None,
                                         "validation_size": 0, "datasets": None}})


def _bench_tokenizer(recipe: Recipe, source: Any, random_weights: bool, texts: Callable[[], list[str]],
                     shared: dict[str, Any], log: Callable[[str], None]) -> tuple[Any, str]:
    from finsft.models import load_tokenizer

    try:
        return load_tokenizer(source, recipe), "the model's"
    except ModelLoadError:
        if not random_weights:
            raise
    from transformers import AutoConfig, AutoTokenizer

    ref = recipe.model["name_or_path"]
    if source.path.endswith(".json"):  # a config shipped with finsft: the real tokenizer if it was downloaded
        try:
            tok = AutoTokenizer.from_pretrained(ref, local_files_only=True)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return tok, f"{ref}'s (from the local Hugging Face cache)"
        except (OSError, ValueError):
            pass
    if shared.get("tokenizer_dir"):
        return AutoTokenizer.from_pretrained(shared["tokenizer_dir"]), "synthetic"
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=recipe.model["trust_remote_code"])
    log(f"no tokenizer for '{ref}' here: training a synthetic byte-level BPE tokenizer on the data "
        f"(ids within the model's vocabulary of {config.get_text_config().vocab_size:,})")
    tok = synthetic_tokenizer(config, texts())
    return tok, "synthetic"


def _check_config(recipe: Recipe, source: Any) -> None:
    """--random-weights needs the model's config: a clear error when it cannot be read."""
    from transformers import AutoConfig

    from finsft.models import shipped_models

    try:
        AutoConfig.from_pretrained(source.path, trust_remote_code=recipe.model["trust_remote_code"])
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"--random-weights needs the config of '{recipe['model']['name_or_path']}' and cannot read it ({exc}). "
            f"It works offline for the models whose configs finsft ships ({', '.join(shipped_models())}) and for "
            "a local folder holding the model's config.json") from exc


@dataclass
class BenchData:
    """The recipe's data as the timed run sees it (synthetic rows stand in when --random-weights meets missing
    data)."""

    recipe: Recipe
    tokenizer: Any
    tokenizer_kind: str
    train_rows: int
    rows: Any  # the rows sampled for timing
    prep_s: float
    from_cache: bool


def prepare_bench_data(recipe: Recipe, source: Any, *, steps: int, warmup: int, random_weights: bool,
                       workdir: Path, shared: dict[str, Any], log: Callable[[str], None]) -> BenchData:
    """Split, tokenize (through finsft's cache, timed) and sample the rows for ``warmup`` + ``steps`` steps."""
    from finsft.data import make_formatter, prepared_cache
    from finsft.data_sources import build_splits
    from finsft.templates import template_from_recipe

    template = template_from_recipe(recipe.template)
    t0 = time.perf_counter()
    try:
        splits = build_splits(recipe, template)
    except DataError as exc:
        if not random_weights:
            raise
        recipe = _fallback_data(recipe, template, workdir, exc, log)
        shared["data_path"] = recipe.data["path"]
        t0 = time.perf_counter()
        splits = build_splits(recipe, template)
    split_s = time.perf_counter() - t0

    def texts() -> list[str]:
        rows = splits.train.select(range(min(20_000, len(splits.train))))
        return [template.render_prompt(r) + template.render_completion(r) for r in rows]

    tokenizer, tokenizer_kind = _bench_tokenizer(recipe, source, random_weights, texts, shared, log)
    if tokenizer_kind == "synthetic" and not shared.get("tokenizer_dir"):
        shared["tokenizer_dir"] = str(workdir / "tokenizer")
        tokenizer.save_pretrained(shared["tokenizer_dir"])
    formatter = make_formatter(recipe, template, tokenizer)
    messages: list[str] = []
    t1 = time.perf_counter()
    train_ds = prepared_cache(splits.train, formatter, recipe.training["max_length"], splits.fingerprint,
                              "train", log=messages.append)
    prep_s = split_s + time.perf_counter() - t1
    return BenchData(recipe, tokenizer, tokenizer_kind, len(train_ds), timing_rows(train_ds, recipe, steps, warmup),
                     prep_s, any("from cache" in m for m in messages))


def measure(recipe: Recipe, which: str, *, steps: int, warmup: int | None, random_weights: bool, workdir: Path,
            shared: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the trainer exactly as ``finsft train`` does (with the baseline's plan when ``which`` is "baseline"),
    run ``warmup`` (None: until stable, at most WARMUP_CAP) + ``steps`` optimizer steps and return the
    measurements. Runs in a worker process."""
    started = time.perf_counter()
    import torch
    from rich.console import Console
    from transformers import set_seed

    from finsft.models import load_training_model, model_shape, resolve_model
    from finsft.plan import detect_hardware, get_sft_config, plan_run
    from finsft.progress import ProgressCallback
    from finsft.quiet import quiet_libraries
    from finsft.training.trainer import build_trainer

    quiet_libraries()
    hw = detect_hardware()
    if shared.get("data_path"):
        recipe = recipe.with_changes({"data": {"path": shared["data_path"], "columns": {}, "validation_path": None,
                                               "validation_size": 0, "datasets": None}})
    source = resolve_model(recipe, log=log, random_weights=random_weights)
    if random_weights:
        _check_config(recipe, source)
    plan = plan_run(recipe, hw, model_shape(source, recipe.model["trust_remote_code"]))
    if which == "baseline":
        plan = baseline_plan(plan)
    most_warmup = WARMUP_CAP if warmup is None else warmup
    data = prepare_bench_data(recipe, source, steps=steps, warmup=most_warmup, random_weights=random_weights,
                              workdir=workdir, shared=shared, log=log)
    recipe = data.recipe

    run_recipe = recipe.with_changes({"training": {"max_steps": most_warmup + steps, "eval_steps": None}})
    set_seed(recipe.training["seed"])
    t2 = time.perf_counter()
    model = load_training_model(source, run_recipe, plan, random_weights=random_weights)
    load_s = time.perf_counter() - t2
    args = get_sft_config(run_recipe, plan, str(workdir / f"checkpoints-{which}"))
    args.save_strategy = "no"
    clock = _clock(warmup, steps)
    t3 = time.perf_counter()
    trainer = build_trainer(run_recipe, model, args, data.tokenizer, data.rows,
                            supervised_lm_head=plan.supervised_lm_head)
    setup_s = time.perf_counter() - t3
    trainer.add_callback(ProgressCallback(None, Console(quiet=True), live=False))
    trainer.add_callback(clock)
    trainer.train()
    if clock.t1 <= clock.t0:
        raise FinsftError("the timed steps did not run; the data may be too small for the requested steps")
    elapsed = clock.t1 - clock.t0
    tokens = clock.n1 - clock.n0
    n_warm = clock.warmup_steps or 0
    cold_s = cold_start_seconds(clock.step_s[:n_warm], clock.step_tokens[:n_warm], elapsed, tokens)
    config = getattr(model, "config", None)
    rows_seen = max(1, steps * train_batch(recipe))
    fpt = (training_flops_per_token(config, tokens / rows_seen, full_fine_tune=recipe.lora is None)
           if config is not None else None)
    peak, peak_note = peak_flops(hw.name, plan.precision) if hw.is_gpu else (
        None, f"{hw.device.upper()}: no honest peak for a CPU core shared with other work (frequency scaling, "
        "contention), so no MFU")
    mfu = mfu_percent(tokens / elapsed, fpt, peak) if fpt is not None else None
    peak_mem, memory_kind = _peak_memory()
    reserved = (round(torch.cuda.max_memory_reserved() / 2**30, 3)
                if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    train, quant = recipe.training, recipe.quantization
    return {
        "config": which,
        "tokens_per_s": round(tokens / elapsed, 2),
        "s_per_step": round(elapsed / steps, 4),
        # CPU seconds of this process (all threads) in the timed steps: on a CPU shared with other jobs, tokens per
        # CPU-second compare configurations more steadily than wall-clock tokens/s.
        "cpu_s_per_step": round((clock.cpu1 - clock.cpu0) / steps, 4),
        "tokens_per_cpu_s": round(tokens / max(clock.cpu1 - clock.cpu0, 1e-9), 2),
        "peak_memory_gib": round(peak_mem, 3),
        "memory_kind": memory_kind,
        "peak_reserved_gib": reserved,  # CUDA max reserved (the allocator's cache included); None on CPU
        "data_prep_s": round(data.prep_s, 2),
        "data_from_cache": data.from_cache,
        "model_load_s": round(load_s, 2),
        "trainer_setup_s": round(setup_s, 2),
        "timed_steps": steps,
        "warmup_steps": n_warm,
        # None: a fixed --warmup; True/False: the step time per token settled / the warm-up hit WARMUP_CAP
        "warmup_stable": clock.stable,
        "startup_s": round(clock.train_begin - started, 2),  # worker imports, data, model load, trainer setup
        "cold_start_s": round(cold_s, 2),  # the warm-up steps' time beyond the warm rate
        "first_step_s": round(clock.step_s[0], 3) if clock.step_s else None,
        "flops_per_token": fpt,
        "mfu_percent": mfu,
        "mfu_note": peak_note,
        "timed_tokens": tokens,
        "final_loss": clock.loss,
        "losses": clock.losses,  # every logged training loss (logging_steps apart)
        "settings": plan_settings(plan),
        "batch": {"per_device_train_batch_size": train["per_device_train_batch_size"],
                  "gradient_accumulation_steps": train["gradient_accumulation_steps"],
                  "max_length": train["max_length"]},
        "device": f"{hw.device} ({hw.name})",
        "torch_threads": torch.get_num_threads(),
        "model": source.description + (", random weights" if random_weights else ""),
        "tokenizer": data.tokenizer_kind,
        "quantization": (None if quant is None else "4-bit" if quant["load_in_4bit"] else "8-bit"),
        "data": (f"{'synthetic rows' if shared.get('data_path') else recipe.data['path']} ({data.train_rows:,} "
                 f"training rows; {len(data.rows):,} sampled for timing)"),
    }


# --------------------------------------------------------------------------------------------- processes


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    shared = dict(spec["shared"])
    try:
        recipe = recipe_from_dict(spec["raw"], spec["source"], spec["files"])  # validated again, like a file
        result = measure(recipe, spec["which"], steps=spec["steps"], warmup=spec["warmup"],
                         random_weights=spec["random_weights"], workdir=Path(spec["workdir"]), shared=shared,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    except FinsftError as exc:
        out.write_text(json.dumps({"error": str(exc)}))
        return 1
    out.write_text(json.dumps({"result": result, "shared": shared}))
    return 0


def run_worker(recipe: Recipe, which: str, *, steps: int, warmup: int | None, random_weights: bool, workdir: Path,
               shared: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    """Run :func:`measure` in a fresh Python process; returns its result and updates ``shared``."""
    spec = {"source": recipe.source, "raw": recipe.raw, "files": recipe.files, "which": which,
            "steps": steps, "warmup": warmup, "random_weights": random_weights, "workdir": str(workdir),
            "shared": shared}
    spec_path, out_path, log_path = (workdir / f"{which}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **compile_cache_env(os.environ)}
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "finsft.bench", "worker", str(spec_path), str(out_path)],
                                stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C, or SIGTERM (see bench): the worker must not outlive us
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    answer = json.loads(out_path.read_text()) if out_path.exists() else {}
    if "error" in answer:
        raise FinsftError(f"{which}: {answer['error']}")
    if code != 0 or "result" not in answer:
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise FinsftError(f"timing the {which} failed (exit code {code}); the end of its output:\n{tail}")
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(("data '", "no tokenizer for", "converting ")):
            echo(f"  {which}: {line}")
    shared.update(answer["shared"])
    return dict(answer["result"])


def bench(recipe: Recipe, *, steps: int = 10, warmup: int | None = None, random_weights: bool = False,
          baseline: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``{"recipe": {...}, "baseline": {...} or None, "ratio": recipe/baseline tokens/s or None}``."""
    if steps < 1 or (warmup is not None and warmup < 0):
        raise FinsftError(f"--steps must be at least 1 and --warmup at least 0 (got {steps} and {warmup})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinsftError("finsft bench times one process: run it directly, not under accelerate launch/torchrun")
    results: dict[str, Any] = {"recipe": None, "baseline": None, "ratio": None}
    shared: dict[str, Any] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        previous = None
    try:
        with tempfile.TemporaryDirectory(prefix="finsft-bench-") as tmp:
            for which in ("recipe", "baseline") if baseline else ("recipe",):
                warm = (f"up to {WARMUP_CAP} warm-up steps (until the step time is stable)" if warmup is None
                        else f"{warmup} warm-up")
                echo(f"timing the {which}: {warm} + {steps} timed steps in a fresh process ...")
                results[which] = run_worker(recipe, which, steps=steps, warmup=warmup,
                                            random_weights=random_weights, workdir=Path(tmp), shared=shared,
                                            echo=echo)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if results["baseline"] and results["baseline"]["tokens_per_s"] > 0:
        results["ratio"] = round(results["recipe"]["tokens_per_s"] / results["baseline"]["tokens_per_s"], 3)
    return results


def _yes(v: bool) -> str:
    return "yes" if v else "no"


ROWS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("packing", lambda r: _yes(r["settings"]["packing"])),
    ("length-grouped batches", lambda r: _yes(r["settings"]["group_by_length"])),
    ("gradient checkpointing", lambda r: _yes(r["settings"]["gradient_checkpointing"])),
    ("Liger kernels", lambda r: _yes(r["settings"]["use_liger_kernel"])),
    ("precision / attention", lambda r: f"{r['settings']['precision']} / {r['settings']['attn_implementation']}"),
    ("LM head positions", lambda r: {True: "supervised", False: "all", None: "TRL's choice"}[
        r["settings"].get("supervised_lm_head")]),
    ("tokens/s (non-padding)", lambda r: f"{r['tokens_per_s']:,.1f}"),
    ("tokens per CPU-second", lambda r: f"{r['tokens_per_cpu_s']:,.1f}"),
    ("seconds/step", lambda r: f"{r['s_per_step']:.3f}"),
    ("peak memory", lambda r: f"{r['peak_memory_gib']:.2f} GiB"),
    ("data prep", lambda r: f"{r['data_prep_s']:.1f} s" + (" (cache)" if r["data_from_cache"] else "")),
    ("warm-up steps", lambda r: f"{r['warmup_steps']}" + {None: "", True: " (stable)", False: " (cap, unstable)"}[
        r.get("warmup_stable")]),
    ("cold start (warm-up excess)", lambda r: f"{r['cold_start_s']:.1f} s"),
    ("start-up (load, setup)", lambda r: f"{r['startup_s']:.1f} s"),
    ("MFU", lambda r: "unknown" if r.get("mfu_percent") is None else f"{r['mfu_percent']:.1f}%"),
)


def render(results: dict[str, Any], title: str) -> Any:
    """The measurements as a rich table: one column per configuration, and the ratio."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    present = [w for w in ("recipe", "baseline") if results.get(w)]
    for which in present:
        table.add_column("recipe (finsft)" if which == "recipe" else "notebook baseline", justify="right")
    if results.get("ratio") is not None:
        table.add_column("ratio", justify="right")
    for name, cell in ROWS:
        row = [name, *(cell(results[w]) for w in present)]
        if results.get("ratio") is not None:
            if name.startswith("tokens/s"):
                row.append(f"{results['ratio']:.2f}x")
            elif name == "tokens per CPU-second":
                row.append(f"{results['recipe']['tokens_per_cpu_s'] / results['baseline']['tokens_per_cpu_s']:.2f}x")
            elif name == "seconds/step":
                row.append(f"{results['recipe']['s_per_step'] / results['baseline']['s_per_step']:.2f}x")
            elif name == "peak memory":
                row.append(f"{results['recipe']['peak_memory_gib'] / results['baseline']['peak_memory_gib']:.2f}x")
            else:
                row.append("")
        table.add_row(*row)
    return table


def bench_command(recipe: Recipe, steps: int = 10, warmup: int | None = None, random_weights: bool = False,
                  fmt: str = "text", baseline: bool = True) -> dict[str, Any]:
    """``finsft bench``: print the table (text) or exactly ``{"recipe", "baseline", "ratio"}`` (json)."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True)
    echo = err.print if fmt == "json" else out.print
    results = bench(recipe, steps=steps, warmup=warmup, random_weights=random_weights, baseline=baseline,
                    echo=echo)
    if fmt == "json":
        print(json.dumps(results, indent=2))
        return results
    r = results["recipe"]
    quant = f", {r['quantization']} quantized" if r["quantization"] else ""
    out.print(f"model: {r['model']}{quant} (tokenizer: {r['tokenizer']})")
    out.print(f"data: {r['data']}")
    out.print(f"device: {r['device']}, {r['torch_threads']} CPU threads; batch {r['batch']['per_device_train_batch_size']}"
              f" x {r['batch']['gradient_accumulation_steps']} accumulation, max_length {r['batch']['max_length']}")
    out.print(render(results, f"finsft bench: {recipe.name}"))
    out.print(f"tokens/s counts non-padding tokens of the {steps} timed steps; peak memory is the "
              f"{r['memory_kind']} of each configuration's own process. On a CPU shared with other jobs, tokens per "
              "CPU-second of the process is the steadier comparison.")
    warm = (f"until the time per token is stable (within {WARMUP_TOLERANCE:.0%} over {WARMUP_WINDOW} steps), at "
            f"most {WARMUP_CAP}" if warmup is None else str(warmup))
    out.print(f"warm-up: {warm} steps; "
              "cold start is the warm-up steps' time beyond the timed rate (compilation, first allocations). "
              f"MFU: {r['flops_per_token'] or 0:,} training FLOPs per token "
              f"({'6N' if recipe.lora is None else '4N, adapters'}, TRL's count from the model config); "
              f"{r['mfu_note']}.")
    if results["ratio"] is not None:
        out.print(f"[bold]recipe / notebook baseline: {results['ratio']:.2f}x tokens/s[/]")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    print("usage: finsft bench RECIPE (this module's command line is for finsft's own worker processes)",
          file=sys.stderr)
    sys.exit(2)
