"""GGUF export, measured (not CI: minutes to tens of minutes on a CPU).

usage:
  python benchmarks/gguf_export.py quickstart --run RUN --work DIR [--types q8_0,q4_1,f16] [--eval-types q8_0,q4_1]
      [--limit N]
      `finsft merge recipes/quickstart.json --adapter RUN --gguf TYPES`, then `finsft eval` of the merged folder
      and of each GGUF on the quickstart's 300 held-out tweets: accuracy / weighted F1 and file size per type.
  python benchmarks/gguf_export.py llama-cpp --gguf FILE --tokenizer DIR [--python VENV/bin/python]
      A program that is not transformers: llama.cpp (llama-cpp-python, built from source in its own venv) loads
      the GGUF, tokenizes the held-out prompts (compared with the Hugging Face tokenizer), and its next-token logits
      after each prompt are compared with transformers' (same GGUF); it picks the label the model gives most
      probability (the three labels' first tokens) and its accuracy is reported.
  python benchmarks/gguf_export.py big --model mistral|gemma --work DIR [--type q8_0] [--keep]
      A random-weight checkpoint of the real shapes (finsft/model_configs) written shard by shard in bf16 without
      building the model, then exported streaming; the export runs in its own process and reports its peak RSS.
      The files are deleted afterwards unless --keep.

Each prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "finsft" / "model_configs"
QUICKSTART = REPO / "recipes" / "quickstart.json"
HELDOUT = REPO / "recipes" / "data" / "tfns_quickstart_heldout.jsonl"
# The export's stated memory bound, whatever the model's size (measured: 1.15 GiB Mistral-7B, 1.35 GiB Gemma-2B).
RSS_BOUND_GIB = 1.5
BIG = {"mistral": "mistralai--Mistral-7B-v0.1.json", "gemma": "google--gemma-2b.json"}


def _finsft(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    start = time.time()
    subprocess.run([sys.executable, "-m", "finsft", *args], check=True, env=env, cwd=REPO)
    return time.time() - start


def _recipe(work: Path, name: str, model: dict[str, Any]) -> Path:
    raw = json.loads(QUICKSTART.read_text())
    raw["model"] = model
    raw["data"]["path"] = str(REPO / "recipes" / raw["data"]["path"])
    raw["evaluation"]["path"] = str(REPO / "recipes" / raw["evaluation"]["path"])
    raw["output"]["dir"] = str(work / "unused-run")
    raw.pop("$schema", None)
    path = work / f"recipe-{name}.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def quickstart(args: argparse.Namespace) -> None:
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    merged = work / "merged"
    seconds = _finsft("merge", str(QUICKSTART), "--adapter", args.run, "--out", str(merged), "--gguf", args.types)
    print(json.dumps({"step": "merge+export", "types": args.types, "seconds": round(seconds, 1)}))
    models: dict[str, dict[str, Any]] = {"merged": {"name_or_path": str(merged)}}
    for t in args.types.split(","):
        size = (merged / "gguf" / f"model.{t}.gguf").stat().st_size
        print(json.dumps({"type": t, "bytes": size, "MiB": round(size / 2**20, 1)}))
        if t in args.eval_types.split(","):
            models[t] = {"name_or_path": str(merged / "gguf" / f"model.{t}.gguf")}
    for name, model in models.items():
        recipe = _recipe(work, name, model)
        extra = ["--limit", str(args.limit)] if args.limit else []
        seconds = _finsft("eval", str(recipe), "--out", str(work / f"eval-{name}"), *extra)
        result = json.loads((work / f"eval-{name}" / "eval.json").read_text())
        m = result["metrics"]
        size = None if name == "merged" else (merged / "gguf" / f"model.{name}.gguf").stat().st_size
        print(json.dumps({"model": name, "bytes": size, "rows": m["n"], "accuracy": round(m["accuracy"], 4),
                          "weighted_f1": round(m["weighted_f1"], 4), "macro_f1": round(m["macro_f1"], 4),
                          "rows_fingerprint": result["rows_fingerprint"], "eval_seconds": round(seconds, 1)}))


_LLAMA_CPP = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.loads(sys.stdin.read())
llm = Llama(model_path=job["gguf"], n_ctx=512, logits_all=False, verbose=False, n_threads=1)
out = []
for prompt in job["prompts"]:
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    out.append({"ids": ids, "logits": logits.tolist()})
text = llm("Instruction: What is the sentiment of this news? Please choose an answer from "
           "{negative/neutral/positive}.\nInput: " + job["example"] + "\nAnswer:", max_tokens=4, temperature=0)
print(json.dumps({"rows": out, "generated": text["choices"][0]["text"]}))
"""


def llama_cpp(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finsft.templates import get_template

    template = get_template("fingpt_sentiment")
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()][: args.limit]
    prompts = [template.render_prompt(r) for r in rows]
    job = {"gguf": str(Path(args.gguf).absolute()), "prompts": prompts, "example": rows[0]["input"]}
    start = time.time()
    proc = subprocess.run(["nice", "-n", "19", args.python, "-c", _LLAMA_CPP], input=json.dumps(job),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    cpp_seconds = time.time() - start
    folder, name = os.path.dirname(job["gguf"]), os.path.basename(job["gguf"])
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    labels = [tok(" " + lab, add_special_tokens=False)["input_ids"][0] for lab in template.labels or ()]
    same_ids, diffs, agree, cpp_correct, hf_correct = 0, [], 0, 0, 0
    for row, r in zip(rows, result["rows"], strict=True):
        hf_ids = tok(template.render_prompt(row))["input_ids"]
        same_ids += hf_ids == r["ids"]
        with torch.inference_mode():
            hf = model(input_ids=torch.tensor([r["ids"]])).logits[0, -1].numpy()
        cpp = np.array(r["logits"], dtype=np.float32)
        diffs.append(float(np.abs(hf - cpp).max() / max(1.0, np.abs(hf).max())))
        cpp_label = (template.labels or ())[int(np.argmax(cpp[labels]))]
        hf_label = (template.labels or ())[int(np.argmax(hf[labels]))]
        agree += cpp_label == hf_label
        cpp_correct += cpp_label == row["output"]
        hf_correct += hf_label == row["output"]
    n = len(rows)
    print(json.dumps({"gguf": name, "rows": n, "llama_cpp_seconds": round(cpp_seconds, 1),
                      "same_token_ids_as_hf_tokenizer": same_ids,
                      "max_rel_logit_diff_llama_cpp_vs_transformers": round(max(diffs), 5),
                      "median_rel_logit_diff": round(float(np.median(diffs)), 5),
                      "label_agreement": agree, "llama_cpp_first_token_accuracy": round(cpp_correct / n, 4),
                      "transformers_first_token_accuracy": round(hf_correct / n, 4),
                      "llama_cpp_generated": result["generated"]}))


# --------------------------------------------------------------------------------------------------- big models


def _write_random_checkpoint(config_path: Path, folder: Path, layers_per_shard: int = 2) -> dict[str, Any]:
    """A random bf16 checkpoint of the config's shapes, one shard at a time (the model is never built)."""
    import torch
    from safetensors.torch import save_file

    from finsft.gguf_export import weight_shapes

    config = json.loads(config_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = weight_shapes(config)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = "rest" if ".layers." not in name else f"layers-{int(name.split('.')[2]) // layers_per_shard:03d}"
        groups.setdefault(key, []).append(name)
    weight_map, total, start = {}, 0, time.time()
    torch.manual_seed(0)
    for i, (_key, names) in enumerate(sorted(groups.items())):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            t = torch.empty(shapes[n], dtype=torch.bfloat16)
            if len(shapes[n]) == 1:
                t.fill_(1.0 if config.get("model_type") != "gemma" else 0.0)
            else:
                t.normal_(0.0, 0.02)
            tensors[n] = t
            weight_map[n] = shard
            total += t.numel() * 2
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return {"bytes": total, "seconds": round(time.time() - start, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


# Peak RSS from /proc/self/status (VmHWM): getrusage's ru_maxrss survives exec on Linux, so a child would report
# its parent's peak (the checkpoint writer's) when that was higher.
_EXPORT = r"""
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
import torch, gguf, safetensors  # the libraries the export uses, loaded before the baseline
from finsft.gguf_export import export_gguf
folder, out, qtype = sys.argv[1:4]
base = hwm()
start = time.time()
report = export_gguf(folder, out, qtype, tokenizer=None, log=lambda m: None)
print(json.dumps({**report.as_dict(), "seconds": round(time.time() - start, 1), "peak_rss_gib": round(hwm(), 2),
                  "rss_after_imports_gib": round(base, 2)}))
"""


def big(args: argparse.Namespace) -> None:
    import shutil

    from finsft.gguf_export import estimate_bytes, weight_shapes

    work = Path(args.work).absolute()
    folder, out = work / f"random-{args.model}", work / f"random-{args.model}.{args.type}.gguf"
    config_path = CONFIGS / BIG[args.model]
    config = json.loads(config_path.read_text())
    largest = max(s[0] * s[1] for s in weight_shapes(config).values() if len(s) == 2)
    try:
        made = _write_random_checkpoint(config_path, folder)
        print(json.dumps({"step": "random checkpoint", "model": args.model, **made}))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", _EXPORT, str(folder), str(out), args.type], env=env,
                              capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(model=args.model, checkpoint_bytes=made["bytes"], estimate_bytes=estimate_bytes(config, args.type),
                      largest_tensor_bf16_gib=round(largest * 2 / 2**30, 2))
        from gguf import GGUFReader

        reader = GGUFReader(str(out))
        result["reader_tensors"] = len(reader.tensors)
        result["reader_architecture"] = reader.fields["general.architecture"].contents()
        result["within_bound"] = result["peak_rss_gib"] <= RSS_BOUND_GIB
        print(json.dumps(result))
        if not result["within_bound"]:
            raise SystemExit(f"peak RSS {result['peak_rss_gib']} GiB is above the {RSS_BOUND_GIB} GiB bound")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            out.unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quickstart")
    q.add_argument("--run", required=True)
    q.add_argument("--work", required=True)
    q.add_argument("--types", default="q8_0,q4_1,f16")
    q.add_argument("--eval-types", default="q8_0,q4_1", help="the types scored with finsft eval")
    q.add_argument("--limit", type=int)
    c = sub.add_parser("llama-cpp")
    c.add_argument("--gguf", required=True)
    c.add_argument("--tokenizer", required=True, help="the merged folder (its Hugging Face tokenizer)")
    c.add_argument("--python", default=sys.executable,
                   help="a Python with llama-cpp-python installed (default: this one)")
    c.add_argument("--limit", type=int, default=300)
    b = sub.add_parser("big")
    b.add_argument("--model", choices=sorted(BIG), required=True)
    b.add_argument("--work", required=True)
    b.add_argument("--type", default="q8_0")
    b.add_argument("--keep", action="store_true")
    args = p.parse_args()
    {"quickstart": quickstart, "llama-cpp": llama_cpp, "big": big}[args.what](args)


if __name__ == "__main__":
    main()
