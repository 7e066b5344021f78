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
    no Liger kernels; precision, optimizer and everything else as the recipe's plan, and its attention unless that
    was FlexAttention chosen for packed rows (padded rows get SDPA, as the plan gives unpacked runs)."""
    from finsft.plan import Choice
    from finsft.plan.configs import inference_attention

    why = "notebook-style baseline"
    attn = inference_attention(plan)
    changed = {"training.packing": False, "training.group_by_length": False,
               "training.gradient_checkpointing": True, "training.use_liger_kernel": False,
               **({"model.attn_implementation": attn} if attn != plan.attn_implementation else {})}
    choices = [Choice(c.setting, changed[c.setting], why, False) if c.setting in changed else c for c in plan.choices]
    return replace(plan, packing=False, group_by_length=False, gradient_checkpointing=True, use_liger_kernel=False,
                   attn_implementation=attn, choices=choices)


def plan_settings(plan: Any) -> dict[str, Any]:
    return {"packing": plan.packing, "group_by_length": plan.group_by_length,
            "gradient_checkpointing": plan.gradient_checkpointing, "use_liger_kernel": plan.use_liger_kernel,
            "precision": plan.precision, "attn_implementation": plan.attn_implementation, "optim": plan.optim,
            "tf32": plan.tf32}


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


def _peak_memory() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30, "CUDA max allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "process peak RSS"


def _clock(warmup: int, steps: int) -> Any:
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

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if warmup == 0:
                self.t0, self.cpu0, self.n0 = now(), time.process_time(), int(state.num_input_tokens_seen or 0)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup and warmup:
                self.t0, self.cpu0, self.n0 = now(), time.process_time(), int(state.num_input_tokens_seen or 0)
            if state.global_step == warmup + steps:
                self.t1, self.cpu1, self.n1 = now(), time.process_time(), int(state.num_input_tokens_seen or 0)

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


def measure(recipe: Recipe, which: str, *, steps: int, warmup: int, random_weights: bool, workdir: Path,
            shared: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the trainer exactly as ``finsft train`` does (with the baseline's plan when ``which`` is "baseline"),
    run ``warmup`` + ``steps`` optimizer steps and return the measurements. Runs in a worker process."""
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
    data = prepare_bench_data(recipe, source, steps=steps, warmup=warmup, random_weights=random_weights,
                              workdir=workdir, shared=shared, log=log)
    recipe = data.recipe

    run_recipe = recipe.with_changes({"training": {"max_steps": warmup + steps, "eval_steps": None}})
    set_seed(recipe.training["seed"])
    t2 = time.perf_counter()
    model = load_training_model(source, run_recipe, plan, random_weights=random_weights)
    load_s = time.perf_counter() - t2
    args = get_sft_config(run_recipe, plan, str(workdir / f"checkpoints-{which}"))
    args.save_strategy = "no"
    clock = _clock(warmup, steps)
    t3 = time.perf_counter()
    trainer = build_trainer(run_recipe, model, args, data.tokenizer, data.rows)
    setup_s = time.perf_counter() - t3
    trainer.add_callback(ProgressCallback(None, Console(quiet=True), live=False))
    trainer.add_callback(clock)
    trainer.train()
    if clock.t1 <= clock.t0:
        raise FinsftError("the timed steps did not run; the data may be too small for the requested steps")
    elapsed = clock.t1 - clock.t0
    tokens = clock.n1 - clock.n0
    peak, memory_kind = _peak_memory()
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
        "peak_memory_gib": round(peak, 3),
        "memory_kind": memory_kind,
        "peak_reserved_gib": reserved,  # CUDA max reserved (the allocator's cache included); None on CPU
        "data_prep_s": round(data.prep_s, 2),
        "data_from_cache": data.from_cache,
        "model_load_s": round(load_s, 2),
        "trainer_setup_s": round(setup_s, 2),
        "timed_steps": steps,
        "warmup_steps": warmup,
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


def run_worker(recipe: Recipe, which: str, *, steps: int, warmup: int, random_weights: bool, workdir: Path,
               shared: dict[str, Any], echo: Callable[[str], None]) -> dict[str, Any]:
    """Run :func:`measure` in a fresh Python process; returns its result and updates ``shared``."""
    spec = {"source": recipe.source, "raw": recipe.raw, "files": recipe.files, "which": which,
            "steps": steps, "warmup": warmup, "random_weights": random_weights, "workdir": str(workdir),
            "shared": shared}
    spec_path, out_path, log_path = (workdir / f"{which}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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


def bench(recipe: Recipe, *, steps: int = 10, warmup: int = 2, random_weights: bool = False,
          baseline: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``{"recipe": {...}, "baseline": {...} or None, "ratio": recipe/baseline tokens/s or None}``."""
    if steps < 1 or warmup < 0:
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
                echo(f"timing the {which}: {warmup} warm-up + {steps} timed steps in a fresh process ...")
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
    ("tokens/s (non-padding)", lambda r: f"{r['tokens_per_s']:,.1f}"),
    ("tokens per CPU-second", lambda r: f"{r['tokens_per_cpu_s']:,.1f}"),
    ("seconds/step", lambda r: f"{r['s_per_step']:.3f}"),
    ("peak memory", lambda r: f"{r['peak_memory_gib']:.2f} GiB"),
    ("data prep", lambda r: f"{r['data_prep_s']:.1f} s" + (" (cache)" if r["data_from_cache"] else "")),
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


def bench_command(recipe: Recipe, steps: int = 10, warmup: int = 2, random_weights: bool = False,
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
    if results["ratio"] is not None:
        out.print(f"[bold]recipe / notebook baseline: {results['ratio']:.2f}x tokens/s[/]")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    print("usage: finsft bench RECIPE (this module's command line is for finsft's own worker processes)",
          file=sys.stderr)
    sys.exit(2)
