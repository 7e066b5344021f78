"""Random command lines thrown at ``finsft.cli.main`` in process: whatever the words, options, overrides and
(mutated) recipe files, the CLI answers with an exit code, never an uncaught exception.

Only the light paths run: validate, show, schema, templates, plan, push, and the heavy commands through their
preflight (finsft.preflight: local data files, chat rows, mixtures, evaluation sets, suite data, trackers, the
hub). A command that gets past the preflight stops at ``_quiet_libraries`` (the first step towards the heavy
imports), which the test replaces with a sentinel: reaching it is a fine outcome, not a failure.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from finsft import cli

BASE: dict[str, Any] = {
    "name": "fuzz",
    "model": {"name_or_path": "finsft-test/no-such-model"},
    "lora": {"r": 4, "lora_alpha": 8},
    "data": {"path": "ok.jsonl", "validation_size": 0.1},
    "template": {"name": "fingpt_sentiment"},
    "training": {"max_steps": 1},
    "output": {"dir": "runs/fuzz"},
}


class _Heavy(Exception):
    """Raised where a command that passed validation would start importing torch."""


def _heavy() -> None:
    raise _Heavy


KEYS = ["model.name_or_path", "model.gguf_file", "data.path", "data.validation_path", "data.validation_size",
        "data.columns.input", "data.group_by", "template.name", "template.prompt", "template.completion",
        "template.labels", "training.max_steps", "training.learning_rate", "training.packing", "output.dir",
        "evaluation.path", "evaluation.scorer", "lora", "quantization", "extends", "name", "nope.key", "a..b", "",
        "data.datasets", "evaluation.sets", "training.report_to", "output.push_to_hub", "output.hub_model_id",
        "data.label_map", "data.drop_eval_overlap", "template"]
VALUES = ["", " ", "1", "-1", "0.5", "1e400", "NaN", "null", "true", "[]", "{}", "\"x\"", "~/x", ".", "/",
          "{input:{input.__class__}}", "{input:>100000000}", "{input}", " {output}", "fingpt9", "custom",
          "[[[[[[[[[[", "\"\\ud800\"", "package:", "package:os", "a.json", "x.jsonl", "é", "\x00",
          # chat, mixtures, evaluation sets, trackers
          "chat", "chat.jsonl", "ok.jsonl", "empty.jsonl", "heads.jsonl", "[\"wandb\"]", "[\"tensorboard\"]",
          '[{"path": "chat.jsonl"}, {"path": "ok.jsonl", "fraction": 0.5}]', '[{"path": "empty.jsonl"}]',
          '[{"path": "heads.jsonl", "columns": {"input": "headline"}}]', '[{"path": "nope.jsonl"}]',
          '{"s": {"path": "heads.jsonl"}}', '{"s": {"path": "chat.jsonl", "template": "chat"}}', '{"": {}}',
          # data format rows (drawn per example: fmt.jsonl, fmt.csv), trackers' destinations
          "fmt.jsonl", "fmt.csv", "[\"mlflow\"]", "\"all\"", "{\"0\": \"neutral\", \"1\": \"neutral\"}"]
WORDS = ["validate", "show", "schema", "templates", "train", "eval", "predict", "merge", "bench", "trian",
         "valdate", "help", "r.json", "bad.json", "mut.json", "missing.json", "--help", "--version", "--format",
         "json", "github", "text", "--set", "--overwrite", "--resume", "--force", "--adapter", "--data", "--out",
         "--input", "--file", "--limit", "--scorer", "--steps", "--random-weights", "-x", "--", "=", "*.json",
         "**/*.json", "[", "", "plan", "push", "--suite", "fingpt-sentiment", "--suite-data", "suite", "--gpu-memory",
         "nan", "--hardware", "h100-80gb", "--repo", "--public"]


OPTIONS = ["--overwrite", "--resume", "--force", "--format", "json", "github", "--set", "--limit", "0",
           "--input", "", "--input", "Shares rose", "--out", "--data", "x.jsonl", "--scorer", "generate",
           "--adapter", "runs/fuzz", "--file", "x.jsonl", "--suite", "fingpt-sentiment", "--suite-data", "suite",
           "--suite-data", "nope", "--gpu-memory", "nan", "--gpu-memory", "-1", "--gpu-memory", "inf",
           "--gpu-memory", "24", "--hardware", "", "--hardware", "h100-80gb", "--repo", "me/x", "--public",
           "--gpu-memory", "1e308", "--accelerate-config", "acc.yaml", "--accelerate-config", "ds.json",
           "--accelerate-config", "suite", "--num-processes", "0", "--num-processes", "2"]


def _override() -> st.SearchStrategy[str]:
    return st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(VALUES) | st.text(max_size=8))


# Plain words without path separators or a bare run of dots: `finsft validate /` would walk the file system.
_word = st.text(alphabet=st.characters(blacklist_characters="/\\", blacklist_categories=("Cs",)), max_size=10)
ARG = st.sampled_from(WORDS) | _override() | _word.filter(lambda w: not w or w.strip(".") != "")


# accelerate configs as `accelerate config` writes them, then mutated (values of the wrong type or range, lists
# where mappings belong, unknown keys), or a DeepSpeed JSON, or no mapping at all
ACCELERATE_BASE: dict[str, Any] = {
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1, "num_processes": 2,
    "mixed_precision": "no", "deepspeed_config": {"zero_stage": 2, "offload_optimizer_device": "none"},
    "fsdp_config": {"fsdp_version": 2, "fsdp_sharding_strategy": "FULL_SHARD"},
}
ACCEL_VALUES = [None, 0, -1, 1, 2, 3, 4, 1e308, "3", "three", "", [], {}, [1], True, "NO", "FSDP", "MULTI_GPU",
                "XLA", "no", "fp8", {"deepspeed_config_file": "ds.json"}]


@st.composite
def accelerate_texts(draw: Any) -> str:
    import yaml

    kind = draw(st.sampled_from(["mutated", "mutated", "deepspeed", "scalar", "text"]))
    if kind == "deepspeed":
        return json.dumps({"zero_optimization": {"stage": draw(st.sampled_from(ACCEL_VALUES))},
                           "train_micro_batch_size_per_gpu": "auto"})
    if kind == "scalar":
        return yaml.safe_dump(draw(st.sampled_from(ACCEL_VALUES)))
    if kind == "text":
        return draw(st.text(max_size=40))
    config = copy.deepcopy(ACCELERATE_BASE)
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from([config] + [config[k] for k in ("deepspeed_config", "fsdp_config")
                                                   if isinstance(config.get(k), dict)]))
        key = draw(st.sampled_from([*sorted(section), "zero_stage", "fsdp_version", "bogus_key",
                                    "deepspeed_config_file"]))
        section[key] = draw(st.sampled_from(ACCEL_VALUES))
    return yaml.safe_dump(config)


# rows of TRL's formats and near misses: empty, null and JSON-string targets, user turns in completions, empty
# conversations, text + label
_msg = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "User", ""]),
                              "content": st.sampled_from(["", "Shares rose.", "How?", None, 5])})
_cell = st.one_of(st.sampled_from(["", " ", "Shares rose.", "positive", "[{\"role\": \"user\"}]", None, 0]),
                  st.lists(_msg, max_size=3), st.text(max_size=12))
FORMAT_COLUMNS = ["prompt", "completion", "messages", "text", "label", "input", "output", " completion", "instruction"]


@st.composite
def format_rows(draw: Any) -> tuple[str, str]:
    """(JSON lines, CSV) of one layout: a few columns of FORMAT_COLUMNS, 1-6 rows of drawn cells."""
    columns = draw(st.lists(st.sampled_from(FORMAT_COLUMNS), min_size=1, max_size=3, unique=True))
    rows = draw(st.lists(st.fixed_dictionaries({c: _cell for c in columns}), min_size=1, max_size=6))
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    flat = [[c if isinstance(c, str) else json.dumps(c) for c in r.values()] for r in rows]
    csv_text = ",".join(columns) + "\n" + "".join(",".join(json.dumps(c) for c in r) + "\n" for r in flat)
    return lines, csv_text


def _mutate(obj: Any, draw: Any) -> Any:
    """One random edit of a JSON-like value: drop or add a key, replace a value, change its type."""
    out = copy.deepcopy(obj)
    if isinstance(out, dict) and out:
        key = draw(st.sampled_from(sorted(out)))
        action = draw(st.sampled_from(["drop", "replace", "recurse", "add"]))
        if action == "drop":
            del out[key]
        elif action == "replace":
            out[key] = draw(st.sampled_from([None, 0, -1, 1.5, "", "x", [], {}, True, [1, "a"], {"k": None}]))
        elif action == "recurse":
            out[key] = _mutate(out[key], draw)
        else:
            out[draw(st.sampled_from(["extends", "bogus", "lora", "quantization", "evaluation"]))] = draw(
                st.sampled_from([None, "r.json", "mut.json", {"r": 0}, {"load_in_4bit": True}, "missing.json"]))
    return out


@st.composite
def cases(draw: Any) -> tuple[list[str], str, str, tuple[str, str]]:
    recipe = BASE
    for _ in range(draw(st.integers(0, 3))):
        recipe = _mutate(recipe, draw)
    text = json.dumps(recipe)
    if draw(st.booleans()):  # damage the JSON text itself
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "}", ",", "\"", "\x00", "é", "]]"]))
    argv = draw(st.lists(ARG, min_size=1, max_size=7))
    if draw(st.integers(0, 2)):  # mostly a command and a recipe, then random words
        argv = [draw(st.sampled_from(["validate", "show", "train", "eval", "predict", "merge", "bench", "plan",
                                      "push"])),
                draw(st.sampled_from(["r.json", "mut.json", "bad.json", "missing.json"])),
                *draw(st.lists(_override() | st.sampled_from(OPTIONS), max_size=5))]
    return argv, text, draw(accelerate_texts()), draw(format_rows())


def _jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _data_files(folder: Path) -> None:
    """Small local data the recipes and overrides name: sentiment rows, chat rows (one with a role typo and one
    with text parts), an empty file, a file with another column name, and suite data with an unknown label."""
    labels = ("negative", "neutral", "positive")
    _jsonl(folder / "ok.jsonl", [{"input": f"Shares moved {i}", "output": labels[i % 3]} for i in range(12)])
    conv = [{"role": "user", "content": "How did shares move?"}, {"role": "assistant", "content": "They rose."}]
    _jsonl(folder / "chat.jsonl", [{"messages": conv}] * 4 + [
        {"messages": [{"role": "User", "content": "hi"}, conv[1]]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, conv[1]]}])
    (folder / "empty.jsonl").write_text("\n", encoding="utf-8")
    _jsonl(folder / "heads.jsonl", [{"headline": f"Shares moved {i}", "output": "neutral"} for i in range(4)])
    (folder / "suite").mkdir()
    _jsonl(folder / "suite" / "tfns_valid.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 7}])


@settings(max_examples=int(os.environ.get("FINSFT_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=cases())
def test_cli_main_never_raises(tmp_path_factory: pytest.TempPathFactory,
                               case: tuple[list[str], str, str, tuple[str, str]]) -> None:
    argv, mutated, accelerate, (fmt_jsonl, fmt_csv) = case
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "r.json").write_text(json.dumps(BASE), encoding="utf-8")
    (folder / "mut.json").write_text(mutated, encoding="utf-8")
    (folder / "bad.json").write_bytes(b"{\"model\": \xff\xfe}")
    _data_files(folder)
    (folder / "acc.yaml").write_text(accelerate, encoding="utf-8")
    (folder / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}), encoding="utf-8")
    (folder / "fmt.jsonl").write_text(fmt_jsonl, encoding="utf-8")
    (folder / "fmt.csv").write_text(fmt_csv, encoding="utf-8")
    sink = io.StringIO()
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_quiet_libraries", _heavy)
        os.chdir(folder)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                code = cli.main(argv)
        except _Heavy:
            event("reached the heavy imports (recipe valid)")
            return
        finally:
            os.chdir(cwd)
    assert isinstance(code, int) and code in (0, 1, 2), (argv, code, sink.getvalue()[-2000:])
    assert "Traceback" not in sink.getvalue(), (argv, sink.getvalue()[-2000:])
    event(f"exit {code}")
    assert not (Path(folder) / "~").exists()


# ------------------------------------------------------------------------- model cards from hostile texts

_hostile_line = st.sampled_from(["---", "===", "# h", "```", "````", "~~~", "</details>", "</summary>", "<details>",
                                 "<script>x</script>", "<!--", "> q", "| a |", "- i", "1. n", "    code", "/abs/p.json",
                                 "&lt;", "\\", "`"])
CARD_TEXT = st.lists(_hostile_line | st.text(max_size=12), max_size=6).map(lambda parts: "\n".join(parts)) | st.text(
    max_size=30)


@settings(max_examples=int(os.environ.get("FINSFT_FUZZ_EXAMPLES", "150")) // 2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(description=CARD_TEXT, row=CARD_TEXT, label=CARD_TEXT)
def test_card_structure_survives_any_text(tmp_path_factory: pytest.TempPathFactory, description: str, row: str,
                                          label: str) -> None:
    """Any description, training row or label: the card's metadata parses, its details/summary stay balanced,
    no script, and the headings are the card's own."""
    from huggingface_hub import ModelCard
    from test_faults_round3_surface import (
        REPORT,
        _card_files,
        _clean_headings,
        _manifest,
        _recipe,
        _structure,
    )

    from finsft.publish.card import card_text

    folder = tmp_path_factory.mktemp("card")
    report = {**REPORT, "metrics": {**REPORT["metrics"], "per_class": {
        label: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}}}}
    markdown = card_text(_card_files(folder), _manifest(row), _recipe(description, row), report)
    assert ModelCard(markdown).data.library_name == "peft"
    parsed = _structure(ModelCard(markdown).text)
    assert parsed.errors == [] and parsed.stack == [] and parsed.scripts == 0, (description, row, label)
    assert parsed.headings == _clean_headings(folder), (description, row, label)


def _main(argv: list[str], folder: Path) -> tuple[int | None, str]:
    """cli.main in ``folder`` with the heavy-import sentinel: (exit code or None when it got past the preflight,
    output)."""
    sink = io.StringIO()
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_quiet_libraries", _heavy)
        os.chdir(folder)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                return cli.main(argv), sink.getvalue()
        except _Heavy:
            return None, sink.getvalue()
        finally:
            os.chdir(cwd)


@settings(max_examples=int(os.environ.get("FINSFT_FUZZ_EXAMPLES", "150")) // 2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(accelerate=accelerate_texts(), rows=format_rows(), csv_file=st.booleans(),
       processes=st.sampled_from([[], ["--num-processes", "0"], ["--num-processes", "3"]]))
def test_accelerate_configs_and_format_rows_through_the_cli(tmp_path_factory: pytest.TempPathFactory,
                                                            accelerate: str, rows: tuple[str, str], csv_file: bool,
                                                            processes: list[str]) -> None:
    """Every drawn accelerate config through `finsft plan --accelerate-config`, every drawn data layout through
    `finsft train` of a recipe without a template (TRL's rules): an exit code and a message, never a traceback."""
    folder = tmp_path_factory.mktemp("surface-fuzz")
    _data_files(folder)  # ok.jsonl: the recipe is valid, so plan reads the accelerate config
    recipe = {k: v for k, v in BASE.items() if k != "template"}
    (folder / "auto.json").write_text(json.dumps(recipe), encoding="utf-8")
    (folder / "acc.yaml").write_text(accelerate, encoding="utf-8")
    (folder / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}), encoding="utf-8")
    data = folder / ("fmt.csv" if csv_file else "fmt.jsonl")
    data.write_text(rows[1] if csv_file else rows[0], encoding="utf-8")
    for argv in (["plan", "auto.json", "--hardware", "h100-80gb", "--accelerate-config", "acc.yaml", *processes],
                 ["train", "auto.json", f"data.path={data.name}"]):
        code, output = _main(argv, folder)
        assert "Traceback" not in output, (argv, accelerate, rows, output[-2000:])
        assert code is None or code in (0, 1, 2), (argv, code, output[-2000:])
        if code:
            assert output.strip(), (argv, "an exit code without a message")
        event(f"{argv[0]}: exit {code}" + (f" ({output.split(':', 2)[1].strip()[:30]})" if code else ""))
