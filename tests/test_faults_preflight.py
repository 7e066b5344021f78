"""Fail fast, through the real CLI: configuration errors that need no model (trackers, hub and token, suite data,
mixture sources, column mappings, evaluation sets, chat rows, plan options) are reported before torch,
transformers, TRL or PEFT are imported, every problem at once, with the file, the key and the fix.

The cases run ``finsft.cli.main`` in ONE fresh Python process per environment (a driver script): after each case
it records the exit code, the output, whether "Traceback" was printed, which heavy modules are loaded and the
hashes of the user's folder. A heavy module in ``sys.modules`` after a refused command means it was imported
before the error was raised (modules are never unloaded): that is the fail-fast check, independent of timing.
Chat data, whose checks also run in training, get in-process tests of ``finsft.chat`` and one short training run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_faults import _jsonl, _rows, run_cli, tree_digest

HEAVY = ("torch", "transformers", "trl", "peft")
CONV = [{"role": "user", "content": "How did shares move?"}, {"role": "assistant", "content": "They rose."}]


@dataclass
class Case:
    id: str
    args: list[str]  # {user}, {runs} replaced
    code: int
    words: Sequence[str]  # each must appear in the output
    absent: Sequence[str] = ()  # none may appear
    env: dict[str, str] = field(default_factory=dict)


TRAIN = ["train", "{user}/r.json"]
CHAT = ["template.name=chat"]


def _mixture(*paths: str) -> list[str]:
    return ["data.path=null", "data.datasets=" + json.dumps([{"path": p} for p in paths])]


CASES = [
    # ---- trackers and the hub (train), all problems at once
    Case("tracker-not-installed", [*TRAIN, "training.report_to=[\"wandb\"]"], 1,
         ["training.report_to", "wandb", "pip install wandb"]),
    Case("push-hub-offline", [*TRAIN, "output.push_to_hub=true", "output.hub_model_id=me/faults"], 1,
         ["hub is switched off", "HF_HUB_OFFLINE", "finsft push"]),
    Case("push-no-token", [*TRAIN, "output.push_to_hub=true", "output.hub_model_id=me/faults"], 1,
         ["not logged in", "hf auth login", "HF_TOKEN"],
         env={"HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HF_HOME": "{runs}/hf-home"}),
    Case("three-problems-at-once", [*TRAIN, "training.report_to=[\"wandb\"]", "output.push_to_hub=true",
                                    "data.path={user}/headline.jsonl"], 1,
         ["3 problems", "pip install wandb", "hub is switched off", 'data.columns = {"input": "headline"}']),
    Case("push-command-both-problems", ["push", "{user}/no-run"], 1,
         ["2 problems", "'{user}/no-run' does not exist", "hub is switched off"]),
    # ---- suite data (finsft eval --suite)
    Case("suite-data-missing-folder", ["eval", "{user}/r.json", "--suite", "fingpt-sentiment", "--suite-data",
                                       "{user}/nope", "--out", "{runs}/s"], 1,
         ["--suite-data", "{user}/nope", "does not exist", "tfns_valid.jsonl"]),
    Case("suite-data-is-a-file", ["eval", "{user}/r.json", "--suite", "fingpt-sentiment", "--suite-data",
                                  "{user}/ok.jsonl", "--out", "{runs}/s"], 1, ["--suite-data", "is a file"]),
    Case("suite-data-bad-files", ["eval", "{user}/r.json", "--suite", "fingpt-sentiment", "--suite-data",
                                  "{user}/suite", "--out", "{runs}/s"], 1,
         ["3 problems", "tfns_valid.jsonl", "column 'label'", "7 (3 rows)", "allowed: 0 (negative), 1 (positive), "
          "2 (neutral)", "fpb.jsonl", "missing column label", "nwgi_test.jsonl", "column 'output'", "'bullish'",
          "'strong negative' (negative)"], absent=["KeyError"]),
    Case("suite-data-too-few-rows", ["eval", "{user}/r.json", "--suite", "fingpt-sentiment", "--suite-data",
                                     "{user}/suite_small", "--out", "{runs}/s"], 1,
         ["fpb.jsonl", "too few", "whole dataset"]),
    # ---- mixtures
    Case("mixture-empty-source", [*TRAIN, *_mixture("{user}/ok.jsonl", "{user}/empty.jsonl")], 1,
         ["empty.jsonl", "no rows"]),
    Case("mixture-missing-source", [*TRAIN, *_mixture("{user}/ok.jsonl", "{user}/gone.jsonl")], 1,
         ["gone.jsonl", "does not exist"]),
    Case("mixture-column-hint", [*TRAIN, *_mixture("{user}/ok.jsonl", "{user}/headline.jsonl")], 1,
         ["headline.jsonl", 'data.datasets[1].columns = {"input": "headline"}'], absent=["data.columns"]),
    # ---- evaluation data
    Case("eval-set-column-hint", [*TRAIN, "data.validation_size=4",
                                  "evaluation.sets={\"heads\": {\"path\": \"{user}/headline.jsonl\"}}"], 1,
         ["evaluation set 'heads'", 'evaluation.sets.heads.columns = {"input": "headline"}'],
         absent=["data.columns"]),
    Case("eval-set-label-hint", [*TRAIN, "data.validation_size=4",
                                 "evaluation.sets={\"nine\": {\"path\": \"{user}/nine.jsonl\"}}"], 1,
         ["evaluation set 'nine'", "'mildly positive'", "set evaluation.sets.nine.labels to \"fingpt9\""]),
    Case("eval-data-columns", ["eval", "{user}/r.json", "--data", "{user}/headline.jsonl", "--out", "{runs}/e"], 1,
         ["headline.jsonl", 'data.columns = {"input": "headline"}']),
    Case("eval-adapter-missing", ["eval", "{user}/r.json", "--adapter", "{user}/no-run", "--out", "{runs}/e"], 1,
         ["adapter folder", "does not exist"]),
    Case("predict-adapter-missing", ["predict", "{user}/r.json", "--adapter", "{user}/no-run", "--input", "x"], 1,
         ["adapter folder", "does not exist"]),
    Case("merge-adapter-missing", ["merge", "{user}/r.json", "--adapter", "{user}/no-run", "--out", "{runs}/m"], 1,
         ["adapter folder", "does not exist"]),
    # ---- chat data
    Case("chat-role-typos", [*TRAIN, *CHAT, "data.path={user}/chat_roles.jsonl"], 1,
         ["2 of 6 conversations", "chat_roles.jsonl, line 3", "'User'", "Did you mean 'user'",
          "chat_roles.jsonl, line 6", "'assistent'", "Did you mean 'assistant'"], absent=["conversation 1"]),
    Case("chat-content-number", [*TRAIN, *CHAT, "data.path={user}/chat_number.jsonl"], 1,
         ["chat_number.jsonl, line 2", "content is int 5", "not text"]),
    Case("chat-image-part", [*TRAIN, *CHAT, "data.path={user}/chat_image.jsonl"], 1,
         ["chat_image.jsonl, line 1", "'image_url'", "only text parts"]),
    Case("chat-no-messages-column", [*TRAIN, *CHAT, "data.path={user}/ok.jsonl"], 1,
         ["ok.jsonl", "no 'messages' column", "input, output", "{\"role\"", "custom"], absent=["data.columns ="]),
    Case("chat-conversations-column", [*TRAIN, *CHAT, "data.path={user}/chat_sharegpt.jsonl"], 1,
         ['data.columns = {"messages": "conversations"}']),
    Case("chat-mixture-source-row", [*TRAIN, *CHAT, *_mixture("{user}/chat_ok.jsonl", "{user}/chat_number.jsonl")],
         1, ["chat_number.jsonl", "line 2", "not text"]),
    Case("chat-validation-file-row", [*TRAIN, *CHAT, "data.path={user}/chat_ok.jsonl",
                                      "data.validation_path={user}/chat_roles.jsonl"], 1,
         ["chat_roles.jsonl, line 3", "Did you mean 'user'"]),
    # ---- plan options (usage errors, exit 2)
    *[Case(f"plan-gpu-memory-{v}", ["plan", "{user}/r.json", "--gpu-memory", v], 2,
           ["--gpu-memory", "positive number of GiB"]) for v in ("nan", "inf", "0", "-1")],
    Case("plan-hardware-empty", ["plan", "{user}/r.json", "--hardware", ""], 2,
         ["--hardware is empty", "h100-80gb", "--gpu-memory"]),
]

DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    sys.path.insert(0, sys.argv[3])
    from test_faults import tree_digest
    from finsft import cli

    cases, user = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    out = {}
    for name, args in cases:
        before = tree_digest(__import__("pathlib").Path(user))
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            try:
                code = cli.main(args)
            except BaseException:
                traceback.print_exc()
                code = -1
        out[name] = {"code": code, "output": sink.getvalue(),
                     "heavy": [m for m in HEAVY_MODULES if m in sys.modules],
                     "unchanged": tree_digest(__import__("pathlib").Path(user)) == before}
    print(json.dumps(out))
""").replace("HEAVY_MODULES", repr(HEAVY))


def _fill(text: str, user: Path, runs: Path) -> str:
    return text.replace("{user}", str(user)).replace("{runs}", str(runs))


def _write_user_files(user: Path, model: Path) -> None:
    _jsonl(user / "ok.jsonl", _rows(20))
    (user / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    _jsonl(user / "headline.jsonl", [{"headline": r["input"], "output": r["output"]} for r in _rows(6)])
    _jsonl(user / "nine.jsonl", [{"input": r["input"], "output": "mildly positive"} for r in _rows(4)])
    _jsonl(user / "chat_ok.jsonl", [{"messages": CONV}] * 6)
    _jsonl(user / "chat_roles.jsonl", [{"messages": CONV}] * 2 + [{"messages": [{**CONV[0], "role": "User"}, CONV[1]]}]
           + [{"messages": CONV}] * 2 + [{"messages": [CONV[0], {**CONV[1], "role": "assistent"}]}])
    _jsonl(user / "chat_number.jsonl", [{"messages": CONV}, {"messages": [{**CONV[0], "content": 5}, CONV[1]]}])
    _jsonl(user / "chat_image.jsonl", [{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/chart.png"}}]}, CONV[1]]}])
    _jsonl(user / "chat_sharegpt.jsonl", [{"conversations": CONV}] * 3)
    suite = user / "suite"
    suite.mkdir()
    _jsonl(suite / "tfns_valid.jsonl", [{"text": "x", "label": 0}] * 5 + [{"text": "y", "label": 7}] * 3)
    _jsonl(suite / "fpb.jsonl", [{"sentence": "x"}] * 8)
    _jsonl(suite / "nwgi_test.jsonl", [{"input": "x", "output": "strong negative"}, {"input": "y", "output": "bullish"}])
    small = user / "suite_small"
    small.mkdir()
    _jsonl(small / "fpb.jsonl", [{"sentence": "x", "label": 0}])
    recipe = {
        "name": "preflight", "model": {"name_or_path": str(model)}, "lora": {"r": 4, "lora_alpha": 8},
        "data": {"path": str(user / "ok.jsonl")}, "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64},
        "output": {"dir": str(user.parent / "runs" / "out")},
    }
    (user / "r.json").write_text(json.dumps(recipe, indent=2), encoding="utf-8")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    """Every case run by the driver: one process per distinct environment."""
    root = tmp_path_factory.mktemp("preflight")
    user, runs = root / "user", root / "runs"
    user.mkdir()
    runs.mkdir()
    _write_user_files(user, tiny_model)
    driver = root / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    groups: dict[str, list[Case]] = {}
    for c in CASES:
        groups.setdefault(json.dumps(c.env, sort_keys=True), []).append(c)
    out: dict[str, Any] = {"user": user, "runs": runs}
    for env_key, cases in groups.items():
        spec = root / f"cases-{len(out)}.json"
        spec.write_text(json.dumps([[c.id, [_fill(a, user, runs) for a in c.args]] for c in cases]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1",
               **{k: _fill(v, user, runs) for k, v in json.loads(env_key).items()}}
        proc = subprocess.run([sys.executable, str(driver), str(spec), str(user), str(Path(__file__).parent)],
                              cwd=root, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_preflight_fault(results: dict[str, Any], case: Case) -> None:
    r = results[case.id]
    user, runs = results["user"], results["runs"]
    shown = f"$ finsft {' '.join(_fill(a, user, runs) for a in case.args)}\nexit {r['code']}\n{r['output'][-4000:]}"
    assert "Traceback" not in r["output"], shown
    assert r["code"] == case.code, shown
    missing = [w for w in (_fill(w, user, runs) for w in case.words) if w not in r["output"]]
    assert not missing, f"message lacks {missing}:\n{shown}"
    present = [w for w in case.absent if w in r["output"]]
    assert not present, f"message should not say {present}:\n{shown}"
    assert r["heavy"] == [], f"{r['heavy']} imported before the error was raised:\n{shown}"
    assert r["unchanged"], f"the user's files changed:\n{shown}"
    assert not (runs / "out").exists() and not (runs / "out.partial").exists(), "a refused run made its folder"


# ----------------------------------------------------------------------------------- chat rows, in process


def test_text_parts_are_used_as_their_text(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from finsft.chat import check_conversation, tokenize_conversations

    parts = [{"role": "user", "content": [{"type": "text", "text": "How did "}, {"type": "text", "text": "shares move?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "They rose."}]}]
    assert check_conversation(parts) == CONV
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tokenize_conversations(tok, [parts], None, None) == tokenize_conversations(tok, [CONV], None, None)


def test_over_long_conversations_are_truncated_or_dropped_with_a_count(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from finsft.chat import tokenize_conversations
    from finsft.errors import DataError

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long_answer = [CONV[0], {"role": "assistant", "content": "They rose. " * 40}]
    long_question = [{"role": "user", "content": "How did shares move? " * 40}, CONV[1]]
    full, _ = tokenize_conversations(tok, [CONV], None, None)
    limit = len(full[0]) + 4
    said: list[str] = []
    ids, masks = tokenize_conversations(tok, [CONV, long_answer, long_question], None, limit, said.append)
    assert len(ids) == 2 and all(len(x) <= limit for x in ids) and all(any(m) for m in masks)
    assert said and "2 of 3 conversations" in said[0] and "1 truncated" in said[0] and "1 dropped" in said[0]
    assert "training.max_length" in said[0]
    with pytest.raises(DataError, match=r"raise training\.max_length"):
        tokenize_conversations(tok, [long_question], None, limit)


def test_jsonl_lines_skip_blank_lines(tmp_path: Path) -> None:
    from finsft.chat import check_conversations
    from finsft.errors import DataError

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n\n" + json.dumps({"messages": [CONV[0]]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl, line 3: the conversation has no assistant message"):
        check_conversations([CONV, [CONV[0]]], str(path), str(path))


@pytest.mark.slow
def test_chat_training_uses_text_parts_and_counts_long_conversations(tmp_path: Path, tiny_model: Path) -> None:
    """One real run: content given as text parts trains; conversations over max_length are counted, not an
    IndexError in the length-grouped sampler."""
    data = tmp_path / "chat.jsonl"
    parts = [{"role": "user", "content": [{"type": "text", "text": "How did shares move?"}]}, CONV[1]]
    long_one = [{"role": "user", "content": "Shares moved a lot today. " * 30}, CONV[1]]
    _jsonl(data, [{"messages": parts}] * 6 + [{"messages": long_one}] * 2)
    recipe = {"name": "chat", "model": {"name_or_path": str(tiny_model)}, "lora": {"r": 4, "lora_alpha": 8},
              "data": {"path": str(data)}, "template": {"name": "chat"},
              "training": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 48},
              "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "r.json").write_text(json.dumps(recipe), encoding="utf-8")
    before = tree_digest(data)
    result = run_cli(["train", str(tmp_path / "r.json")], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-4000:]
    assert "2 of 8 conversations are longer than training.max_length=48" in output, output[-4000:]
    assert tree_digest(data) == before
