"""The finsft command line. The only place that turns exceptions into exit codes.

``finsft RECIPE.json [key.path=value ...]`` trains (so ``accelerate launch -m finsft RECIPE.json`` works);
the subcommands are listed by ``finsft --help``. Light commands (validate, schema, show, templates) import
neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finsft import __version__
from finsft.errors import FinsftError, RecipeError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
# Commands that may run on a CUDA GPU: finsft configures PyTorch's allocator before they import torch
CUDA_COMMANDS = ("train", "eval", "predict", "merge", "bench")
COMMANDS = ("validate", "schema", "show", "templates", "train", "eval", "predict", "merge", "bench", "plan", "push")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe JSON file")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="override recipe values, e.g. training.learning_rate=1e-4 (validated like the file)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finsft", description="Fine-tune language models for finance from JSON recipes.",
                     epilog="`finsft RECIPE.json` is short for `finsft train RECIPE.json`.")
    parser.add_argument("--version", action="version", version=f"finsft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("validate", help="check recipe files (syntax, schema and cross-field rules)")
    p.add_argument("paths", nargs="+", help="recipe files, folders (searched recursively for *.json) or globs")
    p.add_argument("--format", choices=("text", "json", "github"), default="text",
                   help="text for people, json for machines, github for GitHub Actions annotations")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.path=value",
                   help="override applied to every recipe before validation (repeatable)")

    sub.add_parser("schema", help="print the recipe JSON Schema")

    p = sub.add_parser("show", help="print the fully resolved recipe (extends, overrides and defaults applied)")
    _add_recipe(p)

    sub.add_parser("templates", help="list the registered prompt templates")

    p = sub.add_parser("train", help="fine-tune as the recipe says")
    _add_recipe(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    p.add_argument("--force", action="store_true", help="with --resume: accept a recipe that changed since the run")

    p = sub.add_parser("eval", help="evaluate the base model or a trained adapter on the recipe's evaluation data")
    _add_recipe(p)
    p.add_argument("--adapter", help="trained run folder or adapter folder (default: the base model)")
    p.add_argument("--data", help="evaluation data: a local file or hub dataset id (default: the recipe's)")
    p.add_argument("--split", help="split of a hub evaluation dataset")
    p.add_argument("--limit", type=int, help="evaluate at most N rows")
    p.add_argument("--scorer", choices=("auto", "likelihood", "generate"),
                   help="override evaluation.scorer; with --suite: generate (the default: FinGPT's own benchmark "
                        "procedure, comparable with its published rows) or likelihood (ranks the labels)")
    p.add_argument("--out", help="folder for eval.json and predictions.jsonl (default: the adapter folder)")
    p.add_argument("--suite", nargs="?", const="", metavar="NAME",
                   help="score a benchmark suite instead: fingpt-sentiment = FPB, FiQA-SA, TFNS, NWGI as FinGPT "
                        "prepares them; without NAME, the recipe's evaluation.suite")
    p.add_argument("--suite-data", metavar="DIR", help="with --suite: read local copies from DIR (fpb.jsonl, "
                                                      "fiqa_sa.jsonl, tfns_valid.jsonl, nwgi_test.jsonl) "
                                                      "instead of the hub (default: the recipe's "
                                                      "evaluation.suite_data when it names that suite)")

    p = sub.add_parser("predict", help="generate with the recipe's template")
    _add_recipe(p)
    p.add_argument("--adapter", help="trained run folder or adapter folder (default: the base model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", help="one input text (repeatable)")
    src.add_argument("--file", help="a data file in the recipe's format")
    p.add_argument("--out", help="write predictions as JSONL here instead of printing")
    p.add_argument("--max-new-tokens", type=int, help="longest generation")

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model and save a plain model folder")
    _add_recipe(p)
    p.add_argument("--adapter", required=True, help="trained run folder or adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--gguf", metavar="TYPES", help="also export GGUF files for llama.cpp/Ollama, with a Modelfile: "
                   "comma-separated types from f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (e.g. q8_0,q4_1)")

    p = sub.add_parser("plan", help="every resolved choice with its reason and the memory estimate (no GPU, no "
                                    "weights)")
    _add_recipe(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hardware", metavar="PROFILE", help="plan for a named GPU: t4-16gb, v100-16gb, l4-24gb, "
                       "a10g-24gb, rtx4090-24gb, a100-40gb, a100-80gb, h100-80gb, h200-141gb")
    where.add_argument("--gpu-memory", type=float, metavar="GIB", help="plan for an Ampere-class GPU with GIB GiB")
    p.add_argument("--accelerate-config", metavar="FILE", help="plan per GPU under the engine of this accelerate "
                   "config (DDP, FSDP, DeepSpeed ZeRO), e.g. recipes/accelerate/fsdp.yaml")
    p.add_argument("--num-processes", type=int, metavar="N", help="processes (GPUs) to plan for (default: the "
                   "config's num_processes; without --accelerate-config: DDP over N)")
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = sub.add_parser("push", help="upload a finished run folder (adapter or model, tokenizer, model card) to the "
                                    "Hugging Face hub")
    p.add_argument("run", help="the output folder of a finished finsft train run")
    p.add_argument("--repo", metavar="ID", help="hub repository: NAME (under your account) or NAMESPACE/NAME "
                   "(default: the run's output.hub_model_id, else its recipe name)")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private, unless "
                   "the run's recipe says output.hub_private_repo=false)")

    p = sub.add_parser("bench", help="time training steps of the recipe against the notebook-style baseline")
    _add_recipe(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=_warmup_steps, default=None, metavar="N|auto",
                   help="untimed warm-up steps (default auto: until the time per token is stable, at most 10)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the model from its config with random weights (no download)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--no-baseline", action="store_true", help="time the recipe only")
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """`finsft RECIPE.json ...` -> `finsft train RECIPE.json ...`. Only a word that looks like a recipe file (ends
    in .json, or exists) counts as one: anything else is an unknown command (see _unknown_command)."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-") and _looks_like_recipe(argv[0]):
        return ["train", *argv]
    return argv


def _looks_like_recipe(word: str) -> bool:
    return word.lower().endswith(".json") or os.path.isfile(word)


def _unknown_command(argv: list[str]) -> str | None:
    """The message for `finsft trian r.json` (a first word that is neither a command nor a recipe file)."""
    from finsft.errors import did_you_mean

    if not argv or argv[0] in COMMANDS or argv[0].startswith("-") or _looks_like_recipe(argv[0]):
        return None
    return (f"finsft: unknown command '{argv[0]}'.{did_you_mean(argv[0], COMMANDS)} Commands: "
            f"{', '.join(COMMANDS)}; or give a recipe file (finsft RECIPE.json trains it). See finsft --help")


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Option combinations argparse cannot express; parser.error exits with the usage code."""
    if args.command == "train" and args.force and not args.resume:
        parser.error("--force only applies with --resume (it accepts a recipe that changed since the run): add "
                     "--resume, or drop --force")
    if args.command == "plan" and args.gpu_memory is not None:
        from finsft.plan.hardware import MAX_GPU_GIB

        if not (math.isfinite(args.gpu_memory) and 0 < args.gpu_memory <= MAX_GPU_GIB):
            parser.error(f"--gpu-memory {args.gpu_memory:g}: give the GPU's memory as a positive number of GiB, at "
                         f"most {MAX_GPU_GIB:g}, e.g. --gpu-memory 24 (or name a GPU with --hardware PROFILE)")
    if args.command == "plan" and args.hardware is not None and not args.hardware.strip():
        from finsft.plan.hardware import PROFILES

        parser.error(f"--hardware is empty: name a GPU profile ({', '.join(PROFILES)}), or give --gpu-memory "
                     "GIB; leave both out to plan for this machine")
    if args.command == "predict" and args.input and any(not text.strip() for text in args.input):
        parser.error("--input is empty: give the text to predict on, e.g. --input \"Shares rose 5% after "
                     "earnings\"")


# ------------------------------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from finsft.commands.validate import REPORTER_BY_NAME, validate_files
    from finsft.recipe import expand_paths

    files, unmatched = expand_paths(args.paths)
    if unmatched:
        print(f"finsft validate: no recipe files match: {', '.join(unmatched)}", file=sys.stderr)
        return EXIT_USAGE
    result = validate_files(files, args.overrides)
    REPORTER_BY_NAME[args.format]().report(result)
    return EXIT_INVALID if result.n_invalid else EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from finsft.recipe import schema

    print(json.dumps(schema(), indent=2))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from finsft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(json.dumps(recipe.config, indent=2))
    if recipe.data_format:  # on stderr: stdout stays the recipe's JSON
        print(f"data format: {recipe.data_format}", file=sys.stderr)
    elif recipe.template_pending:
        print("data format: decided when the data loads (the recipe names no template and its data is not a "
              "local JSON/JSONL/CSV file)", file=sys.stderr)
    return EXIT_OK


def cmd_templates(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from finsft.templates import CUSTOM, get_template, registered_names

    table = Table(title="finsft templates")
    for col in ("name", "kind", "fields", "labels", "description"):
        table.add_column(col, overflow="fold", no_wrap=col in ("name", "kind"))  # names stay copy-pasteable
    for name in registered_names():
        if name == CUSTOM:
            table.add_row(CUSTOM, "declarative", "any", "optional",
                          "prompt/completion format strings written in the recipe (template.prompt, .completion)")
            continue
        try:
            t = get_template(name)
        except FinsftError as exc:
            table.add_row(name, "broken", "", "", str(exc))
            continue
        kind = "classification" if t.is_classification else "generation"
        table.add_row(t.name, kind, ", ".join(t.fields), "/".join(t.labels or ()) or "-", t.description)
    Console().print(table)
    return EXIT_OK


def _quiet_libraries() -> None:
    """Library progress bars off and known-harmless library messages dropped, before the heavy imports."""
    from finsft.quiet import quiet_libraries

    quiet_libraries()


class _SignalWhileStarting(BaseException):
    """SIGINT/SIGTERM during the heavy imports at the start of a run (a BaseException: no library's ``except
    Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StartInterrupted(FinsftError):
    """A signal stopped ``train`` before the run began; nothing was written (exit 128 + the signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _import_training(args: argparse.Namespace) -> object:
    """``finsft.training.train``, imported (torch, transformers, TRL, PEFT: seconds to tens of seconds) with
    SIGINT and SIGTERM turned into a message and exit 128 + the signal: before the run's own handlers take over,
    Python's default would end the process silently on SIGTERM. With ``FINSFT_TEST_SIGNAL_AT_PHASE=imports`` (tests)
    the process sends itself SIGTERM as the imports begin, through the real handler."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise _SignalWhileStarting(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        spec = os.environ.get("FINSFT_TEST_SIGNAL_AT_PHASE", "")
        if spec.split(":")[0] == "imports":
            os.kill(os.getpid(), getattr(signal, spec.split(":")[1]) if ":" in spec else signal.SIGTERM)
        _quiet_libraries()
        from finsft.training import train
    except _SignalWhileStarting as exc:
        import shlex

        name = signal.Signals(exc.signum).name
        again = shlex.join(["finsft", "train", args.recipe, *args.overrides])
        raise StartInterrupted(f"{name} while loading the training libraries (torch, transformers, TRL), before the "
                               f"run began: nothing was written. Start again with:\n  {again}", exc.signum) from None
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    return train


def cmd_train(args: argparse.Namespace) -> int:
    from finsft.preflight import preflight
    from finsft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    checked = preflight(recipe, "train")  # before torch, transformers and TRL are imported
    train: Any = _import_training(args)
    train(recipe, overwrite=args.overwrite, resume=args.resume, force=args.force,
          command=["finsft", "train", args.recipe, *args.overrides], checked=checked)  # command: the resume hint
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from finsft.preflight import preflight
    from finsft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.suite_data and args.suite is None:
        raise FinsftError("--suite-data goes with --suite (e.g. --suite fingpt-sentiment)")
    suite, data_dir = None, args.suite_data
    if args.suite is not None:
        if args.data or args.split:
            raise FinsftError("--suite scores the suite's own data: leave out --data and --split")
        ev = recipe.evaluation_settings
        suite = args.suite or ev["suite"]
        if not suite:
            raise FinsftError("--suite without a name scores the recipe's evaluation.suite, and this recipe names "
                              "none: pass --suite fingpt-sentiment, or set evaluation.suite")
        data_dir = args.suite_data or (ev["suite_data"] if suite == ev["suite"] else None)
    if args.limit is not None and args.limit < 1:
        raise FinsftError(f"--limit must be at least 1, not {args.limit}")
    checked = preflight(recipe, "eval", data=args.data, split=args.split, limit=args.limit, suite=suite,
                        suite_data=data_dir, adapter=args.adapter, extra=[lambda: _results_writable(args)])
    _quiet_libraries()
    if suite:
        from finsft.commands.suite import suite_command

        suite_command(recipe, suite, adapter=args.adapter, data_dir=data_dir, limit=args.limit,
                      scorer=args.scorer, out=args.out, checked=checked)
        return EXIT_OK
    from finsft.commands.evaluate import evaluate_command

    evaluate_command(recipe, adapter=args.adapter, data=args.data, split=args.split, limit=args.limit,
                     scorer=args.scorer, out=args.out, checked=checked)
    return EXIT_OK


def _results_writable(args: argparse.Namespace) -> None:
    """eval's results go under --out, else under the --adapter run: refused now (before torch loads) when that
    cannot be written, e.g. a read-only run; the command checks each set's folder again before the model loads."""
    from finsft.files import check_writable

    target = args.out or (os.path.join(args.adapter, "eval") if args.adapter else None)
    if target and not (os.path.lexists(target) and not os.path.isdir(target)):  # a file or link: eval says why
        check_writable(Path(target).expanduser().absolute(), "the results folder",
                       "the scores would be lost after scoring. Pass --out DIR to write the results to a folder you "
                       "can write to")


def cmd_predict(args: argparse.Namespace) -> int:
    from finsft.preflight import preflight
    from finsft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    preflight(recipe, "predict", adapter=args.adapter)
    _quiet_libraries()
    from finsft.commands.predict import predict_command

    predict_command(recipe, adapter=args.adapter, inputs=args.input, file=args.file, out=args.out,
                    max_new_tokens=args.max_new_tokens)
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    from finsft.merge import check_out
    from finsft.preflight import preflight
    from finsft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    extra: list[Callable[[], object]] = [lambda: check_out(Path(args.out).expanduser().absolute())]
    if args.gguf is not None:
        from finsft.gguf_export import light_check, parse_types

        extra += [lambda: parse_types(args.gguf), lambda: light_check(recipe)]
    preflight(recipe, "merge", adapter=args.adapter, extra=extra)
    _quiet_libraries()
    from finsft.commands.merge import merge_command
    from finsft.gguf_export import parse_types

    merge_command(recipe, adapter=args.adapter, out=args.out,
                  gguf=parse_types(args.gguf) if args.gguf is not None else None)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from finsft.commands.plan import plan_command
    from finsft.recipe import load_recipe

    return plan_command(load_recipe(args.recipe, args.overrides), hardware=args.hardware,
                        gpu_memory=args.gpu_memory, fmt=args.format, accelerate_config=args.accelerate_config,
                        num_processes=args.num_processes)


def cmd_push(args: argparse.Namespace) -> int:
    from finsft.commands.push import push_command

    push_command(args.run, repo=args.repo, public=args.public)
    return EXIT_OK


def _warmup_steps(text: str) -> int | None:
    """--warmup: "auto" (None) or a count of at least 0."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of steps (0, 1, 2, ...) or 'auto'")
    return n


def cmd_bench(args: argparse.Namespace) -> int:
    from finsft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_libraries()
    from finsft.bench import bench_command

    bench_command(recipe, steps=args.steps, warmup=args.warmup, random_weights=args.random_weights,
                  fmt=args.format, baseline=not args.no_baseline)
    return EXIT_OK


HANDLERS = {
    "validate": cmd_validate, "schema": cmd_schema, "show": cmd_show, "templates": cmd_templates,
    "train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "merge": cmd_merge, "bench": cmd_bench,
    "plan": cmd_plan, "push": cmd_push,
}


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 invalid recipe or failed run, 2 usage error)."""
    args_list = _normalise(list(sys.argv[1:] if argv is None else argv))
    unknown = _unknown_command(args_list)
    if unknown:
        print(unknown, file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser()
    try:
        # Overrides may follow options (`finsft train R --overwrite training.max_steps=3`): argparse stops
        # collecting positionals at the first option, so gather the remaining key=value words here.
        args, extra = parser.parse_known_args(args_list)
        stray = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
        _check_usage(parser, args)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command in CUDA_COMMANDS:
        # Before anything imports torch: the caching allocator reads its configuration when CUDA initialises.
        from finsft.allocator import configure_allocator

        configure_allocator()
    try:
        code = HANDLERS[args.command](args)
        sys.stdout.flush()  # a closed pipe (`finsft schema | head -1`) raises here, inside the try
        return code
    except BrokenPipeError:
        # The reader went away: nothing left to say. Python's documented recipe: point stdout at devnull so the
        # interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (captured in tests)
            pass
        finally:
            os.close(devnull)
        return EXIT_INVALID
    except RecipeError as exc:
        print(f"finsft {args.command}: the recipe is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_INVALID
    except FinsftError as exc:
        if _is_main_process() or args.command != "train":
            print(f"finsft {args.command}: error: {exc}", file=sys.stderr)
        signum = getattr(exc, "signum", None)  # train.RunInterrupted: 130 for SIGINT, 143 for SIGTERM
        return 128 + signum if isinstance(signum, int) else EXIT_INVALID
    except KeyboardInterrupt:
        print(f"finsft {args.command}: interrupted", file=sys.stderr)
        return 130
