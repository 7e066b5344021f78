"""FinGPT's own benchmark code against finsft's suite, on the same adapter and rows.

Runs FinGPT's benchmark loop (benchmarks/fingpt_benchmark/fingpt_code.py: its format_example, tokenizer set-up,
``generate(max_length=512)``, ``split("Answer: ")[1]`` and change_target, vendored under its MIT licence) on an
adapter loaded as FinGPT's benchmarks.py loads one (AutoModelForCausalLM + PeftModel.from_pretrained), with FPB and
TFNS prepared as its fpb.py and tfns.py prepare them from local copies of the hub sets. Then reads finsft's suite
results for the same adapter (``finsft eval RECIPE --adapter RUN --suite fingpt-sentiment --out DIR``) and prints,
per set, both scores and how many rows agree (gold label, answer text, predicted label).

    python benchmarks/fingpt_reference.py recipes/quickstart.json --adapter runs/quickstart \\
        --suite-data ../shared/data --finsft-results runs/quickstart-suite [--sets fpb,tfns] [--out ref.json]

Exit code 0 when every row agrees, 1 otherwise. Nothing of finsft's scoring is used on FinGPT's side: finsft only
resolves where the base model lies (the embedded GGUF is converted once into finsft's cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fingpt_benchmark"))

import fingpt_code  # noqa: E402  (FinGPT's code, vendored)

# fpb.py's dic and instruction; tfns.py's (labels 0/1/2 = negative/positive/neutral) and instruction
FPB_DIC = {0: "negative", 1: "neutral", 2: "positive"}
FPB_INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
TFNS_DIC = {0: "negative", 1: "positive", 2: "neutral"}
TFNS_INSTRUCTION = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."


def fpb_frame(path: Path) -> Any:
    """fpb.py: the seed-42 test split of sentences_50agree; columns input/output; the news instruction. The local
    file holds the 4,846 sentences in hub order, as {sentence, label} or already as {input, output}."""
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    ds = ds.train_test_split(seed=42)["test"].to_pandas()
    if "sentence" in ds.columns:
        ds = ds[["sentence", "label"]]
        ds.columns = ["input", "output"]
        ds["output"] = ds["output"].apply(lambda x: FPB_DIC[x])
    else:
        ds = ds[["input", "output"]]
    ds["instruction"] = FPB_INSTRUCTION
    return ds


def tfns_frame(path: Path) -> Any:
    """tfns.py: the validation split; labels mapped with its dic; the tweet instruction."""
    import pandas as pd

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ds = pd.DataFrame(rows)
    if "text" in ds.columns:
        ds = ds[["text", "label"]]
        ds["label"] = ds["label"].apply(lambda x: TFNS_DIC[x])
        ds.columns = ["input", "output"]
    else:
        ds = ds[["input", "output"]]
    ds["instruction"] = TFNS_INSTRUCTION
    return ds


FRAMES = {"fpb": ("fpb.jsonl", fpb_frame), "tfns": ("tfns_valid.jsonl", tfns_frame)}


def load_like_fingpt(recipe_path: str, adapter: str) -> tuple[Any, Any]:
    """benchmarks.py's loading: the base model and tokenizer from their folder, then PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finsft.models import resolve_model
    from finsft.recipe import load_recipe

    source = resolve_model(load_recipe(recipe_path), log=lambda s: None)
    model = AutoModelForCausalLM.from_pretrained(source.path)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model, tokenizer = fingpt_code.setup_tokenizer(model, tokenizer)
    model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--adapter", required=True)
    p.add_argument("--suite-data", required=True, help="folder with fpb.jsonl and tfns_valid.jsonl")
    p.add_argument("--finsft-results", required=True, help="finsft's suite --out folder for the same adapter")
    p.add_argument("--sets", default="fpb,tfns")
    p.add_argument("--batch-size", type=int, default=8, help="FinGPT's --batch_size (finsft's evaluation.batch_size)")
    p.add_argument("--out", help="write the comparison as JSON here (a new file)")
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)
    model, tokenizer = load_like_fingpt(args.recipe, args.adapter)
    report: dict[str, Any] = {"adapter": args.adapter, "batch_size": args.batch_size, "sets": {}}
    all_agree = True
    for name in args.sets.split(","):
        file, make = FRAMES[name]
        frame = make(Path(args.suite_data) / file)
        t0 = time.perf_counter()
        with torch.no_grad():
            frame, metrics = fingpt_code.test_rows(model, tokenizer, frame, args.batch_size)
        seconds = time.perf_counter() - t0
        ours = [json.loads(line) for line in
                (Path(args.finsft_results) / name / "predictions.jsonl").read_text().splitlines()]
        finsft_eval = json.loads((Path(args.finsft_results) / name / "eval.json").read_text())
        n = len(frame)
        same_rows = len(ours) == n
        agree = {
            "inputs": sum(o["input"] == i for o, i in zip(ours, frame["input"], strict=False)),
            "gold": sum(o["gold"] == g for o, g in zip(ours, frame["new_target"], strict=False)),
            "answers": sum(o["answer"] == a for o, a in zip(ours, frame["out_text"], strict=False)),
            "labels": sum(o["pred"] == p for o, p in zip(ours, frame["new_out"], strict=False)),
        }
        ok = same_rows and all(v == n for v in agree.values())
        all_agree &= ok
        m = finsft_eval["metrics"]
        report["sets"][name] = {
            "rows": n, "finsft_rows": len(ours), "agree": agree, "all_agree": ok, "seconds": round(seconds, 1),
            "fingpt_code": {k: round(float(v), 4) for k, v in metrics.items()},
            "finsft_suite": {k: round(float(m[k]), 4) for k in ("accuracy", "macro_f1", "weighted_f1")},
            "finsft_scorer": finsft_eval["settings"]["scorer"],
        }
        fc, fs = report["sets"][name]["fingpt_code"], report["sets"][name]["finsft_suite"]
        print(f"{name}: {n} rows, {seconds:.0f} s. FinGPT's code: acc {fc['accuracy']:.3f} macro F1 "
              f"{fc['macro_f1']:.3f} weighted F1 {fc['weighted_f1']:.3f} | finsft suite "
              f"({report['sets'][name]['finsft_scorer']}): acc {fs['accuracy']:.3f} macro F1 {fs['macro_f1']:.3f} "
              f"weighted F1 {fs['weighted_f1']:.3f} | rows agreeing: inputs {agree['inputs']}, gold "
              f"{agree['gold']}, answers {agree['answers']}, labels {agree['labels']} of {n}", flush=True)
    if args.out:  # a new file only, through finsft's writing gate
        from finsft.files import write_file

        write_file(args.out, json.dumps(report, indent=2) + "\n")
    print("every row agrees" if all_agree else "ROWS DIFFER")
    return 0 if all_agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
