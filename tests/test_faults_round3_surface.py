"""Nothing lost, round 3 (issue 24), the surface half: model cards that text from recipes and data cannot break,
the tracking preflight, ``plan --accelerate-config`` validation and the data-format checks of the preflight.

The CLI cases run through ``finsft.cli.main`` in one fresh process per environment (the driver of
test_faults_preflight.py): exit code, words of the message naming the problem and the fix, no "Traceback", no
heavy module imported before the refusal, the user's files byte-identical, no run folder made.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt
from test_faults import _jsonl, _rows
from test_faults_preflight import DRIVER, HEAVY, Case, _fill

from finsft.publish.card import card_text, code_span, fence, portable, quote

# ------------------------------------------------------------------------------------------------- model cards

HOSTILE = [
    "---",
    "# A heading from the description",
    "```",
    "~~~",
    "````python",
    "</details>",
    "</summary>",
    "<script>alert(1)</script>",
    "<details><summary>x",
    "Title\n===",
    "Title\n---\nmore",
    "> quoted\n>> twice",
    "| a | b |\n|---|---|",
    "1. list\n- item\n* star\n+ plus",
    "    indented code",
    "<!-- open comment",
    "text with /abs/path/file.jsonl and a `tick` and ``` three",
]


class _Structure(HTMLParser):
    """Opened/closed details and summary in order, every heading, every script, every code block."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.headings: list[str] = []
        self.scripts = 0
        self._in_heading = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("details", "summary"):
            self.stack.append(tag)
        if tag == "script":
            self.scripts += 1
        if re.fullmatch(r"h[1-6]", tag):
            self._in_heading = True
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("details", "summary"):
            if not self.stack or self.stack[-1] != tag:
                self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            else:
                self.stack.pop()
        if re.fullmatch(r"h[1-6]", tag):
            self._in_heading = False

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.headings[-1] += data


def _structure(markdown: str) -> _Structure:
    parser = _Structure()
    parser.feed(MarkdownIt("commonmark").enable("table").render(markdown))
    parser.close()
    return parser


def _card_files(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def _recipe(description: str, row_text: str) -> dict[str, Any]:
    return {
        "name": "hostile", "description": description,
        "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": "/data/my_rows.jsonl", "split": "train"},
        "template": {"name": "fingpt_sentiment", "chat_template": False},
        "training": {"learning_rate": 1e-3, "seed": 1},
        "evaluation": {"path": "/data/heldout.jsonl"},
        "output": {"dir": "runs/x"},
    }


def _manifest(row_text: str) -> dict[str, Any]:
    return {"recipe": "hostile", "data": {"fingerprint": "ab", "train_rows": 10, "eval_overlap": {
                "checked": {row_text: 3}, "overlapping": 1, "by_set": {row_text: 1}, "drop": True, "dropped": 1}},
            "train": {"global_step": 3, "effective_batch": 2},
            "example": {"row": {"instruction": "Classify.", "input": row_text},
                        "prompt": f"Instruction: Classify.\nInput: {row_text}\nAnswer:", "chat_template": False,
                        "system": None},
            "plan": [{"setting": "training.precision", "value": "fp32", "reason": f"why: {row_text}",
                      "automatic": True}],
            "libraries": {"peft": "0.21.2"}}


REPORT = {"data": "/data/heldout.jsonl </details> <script>", "rows": 4, "rows_fingerprint": "f0`0d",
          "settings": {"scorer": "likelihood"},
          "metrics": {"n": 4, "accuracy": 0.5, "macro_f1": 0.4, "weighted_f1": 0.45,
                      "per_class": {"</summary># x": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2}}},
          "base_metrics": None}


def _clean_headings(tmp_path: Path) -> list[str]:
    return _structure(card_text(_card_files(tmp_path), _manifest("plain"), _recipe("plain", "plain"), REPORT)
                      ).headings


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
def test_hostile_recipe_and_row_text_cannot_change_the_card(tmp_path: Path, text: str) -> None:
    folder = _card_files(tmp_path)
    markdown = card_text(folder, _manifest(text), _recipe(text, text), REPORT)
    card = ModelCard(markdown)  # the metadata still parses, as the hub reads it
    assert card.data.library_name == "peft" and "finsft" in card.data.tags
    (folder / "README.md").write_text(markdown, encoding="utf-8")
    assert ModelCard.load(folder / "README.md").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    parsed = _structure(card.text)
    assert parsed.errors == [] and parsed.stack == [], parsed.errors or parsed.stack
    assert parsed.scripts == 0
    assert parsed.headings == _clean_headings(tmp_path)  # no heading added, none swallowed by an open fence
    assert "</details>" in markdown and "</summary>" in markdown


def test_path_scrubber_keeps_closing_tags_and_entities() -> None:
    text = "<details><summary>x</summary>\n\n</details> &lt;/script&gt; </script>"
    assert portable(text) == text
    assert portable("see /home/me/data/tfns.jsonl, (/x/y.json) `~/m/smol`") == "see tfns.jsonl, (y.json) `smol`"


def test_fences_and_code_spans_outlast_the_text() -> None:
    assert fence("a ``` b ````` c", "json") == ["``````json", "a ``` b ````` c", "``````"]
    assert fence("plain") == ["```", "plain", "```"]
    assert code_span("a`b") == "`` a`b ``" and code_span("x") == "`x`"
    assert quote("# h\n---\n<b>") == ["> \\# h", "> \\---", "> &lt;b&gt;"]


# ------------------------------------------------------------------------- the CLI: preflight and plan cases


TRAIN = ["train", "{user}/r.json"]
AUTO = ["train", "{user}/r_auto.json"]  # no template section: TRL's rules pick the format from the data
STOP = ["training.report_to=[\"wandb\"]"]  # a second problem, so a case whose data passes stops before the model
PLAN = ["plan", "{user}/r.json", "--hardware", "h100-80gb", "--accelerate-config"]
PC = [{"prompt": f"Headline {i}: shares moved.", "completion": f" Answer {i}."} for i in range(8)]
CPROMPT = [{"role": "user", "content": "How did shares move?"}]
CCOMP = [{"role": "assistant", "content": "They rose."}]


def _pc(path: str) -> list[str]:
    return [f"data.path={{user}}/{path}"]


CLI_CASES = [
    # ---- trackers: the destination, before the model loads
    Case("mlflow-database-store", [*TRAIN, "training.report_to=[\"mlflow\"]"], 1,
         ["MLFLOW_TRACKING_URI=sqlite:///", "SQLAlchemy", "pip install mlflow", "RUN/mlruns"],
         env={"MLFLOW_TRACKING_URI": "sqlite:///{runs}/m.db"}),
    Case("mlflow-unknown-scheme", [*TRAIN, "training.report_to=[\"mlflow\"]"], 1,
         ["MLFLOW_TRACKING_URI=ftp://host/x", "scheme 'ftp:'", "allowed: http, https", "unset MLFLOW_TRACKING_URI"],
         env={"MLFLOW_TRACKING_URI": "ftp://host/x"}),
    Case("mlflow-store-under-a-file", [*TRAIN, "training.report_to=[\"mlflow\"]"], 1,
         ["cannot be written", "ok.jsonl is a file, not a folder", "file:///path/to/mlruns"],
         env={"MLFLOW_TRACKING_URI": "file://{user}/ok.jsonl/mlruns"}),
    Case("mlflow-unset-default-store", [*TRAIN, "training.report_to=[\"mlflow\", \"wandb\"]"], 1,
         ["MLFLOW_TRACKING_URI is not set", "file store mlruns/ in the run folder", "pip install wandb"],
         absent=["2 problems"], env={"MLFLOW_TRACKING_URI": ""}),
    Case("tensorboard-dir-under-a-file", [*TRAIN, "training.report_to=[\"tensorboard\"]"], 1,
         ["TENSORBOARD_LOGGING_DIR", "is a file, not a folder", "unset it"],
         env={"TENSORBOARD_LOGGING_DIR": "{user}/ok.jsonl/tb"}),
    # ---- plan --accelerate-config: one line per key
    Case("accel-zero-stage-4", [*PLAN, "{user}/zero4.yaml"], 1,
         ["zero4.yaml", "deepspeed_config.zero_stage: 4", "allowed: 0, 1, 2 or 3"]),
    Case("accel-zero-stage-word", [*PLAN, "{user}/zero_word.yaml"], 1,
         ["deepspeed_config.zero_stage: 'three'", "allowed: 0, 1, 2 or 3"]),
    Case("accel-fsdp-version-3", [*PLAN, "{user}/fsdp3.yaml"], 1, ["fsdp_config.fsdp_version: 3", "allowed: 1 or 2"]),
    Case("accel-many-keys", [*PLAN, "{user}/many.yaml"], 1,
         ["many.yaml: 5 problems", "num_processes: 0; allowed: a whole number of at least 1", "num_machines: 0",
          "fsdp_config: a list", "allowed: a mapping", "distributed_type 'MULTI_GPUS'", "Did you mean 'MULTI_GPU'",
          "mixed_precsion: not a setting accelerate knows", "Did you mean 'mixed_precision'"]),
    Case("accel-list-file", [*PLAN, "{user}/list.yaml"], 1, ["list.yaml", "holds a list", "a mapping of accelerate"]),
    Case("accel-string-file", [*PLAN, "{user}/string.yaml"], 1, ["string.yaml", "holds a string"]),
    Case("accel-deepspeed-json", [*PLAN, "{user}/ds_config.json"], 1,
         ["ds_config.json", "DeepSpeed configuration (zero_optimization", "deepspeed_config_file",
          "distributed_type: DEEPSPEED"]),
    Case("accel-deepspeed-file-bad-stage", [*PLAN, "{user}/ds_bad.yaml"], 1,
         ["deepspeed_config_file", "zero_optimization.stage 5", "allowed: 0, 1, 2 or 3"]),
    Case("accel-missing", [*PLAN, "{user}/nope.yaml"], 1, ["nope.yaml", "does not exist"]),
    Case("accel-folder", [*PLAN, "{user}"], 1, ["--accelerate-config", "a folder"]),
    Case("accel-not-yaml", [*PLAN, "{user}/broken.yaml"], 1, ["broken.yaml", "not valid YAML"]),
    Case("plan-gpu-memory-1e308", ["plan", "{user}/r.json", "--gpu-memory", "1e308"], 2,
         ["--gpu-memory", "at most 1024"], absent=["OverflowError"]),
    # ---- data formats, checked as chat rows are
    Case("empty-completions-dropped", [*AUTO, *_pc("pc_some_empty.jsonl"), *STOP], 1,
         ["2 of 8 rows have an empty 'completion'", "line 3", "left out", "pip install wandb"]),
    Case("all-completions-empty", [*AUTO, *_pc("pc_all_empty.jsonl")], 1,
         ["every row's 'completion' is empty", "data.columns"]),
    Case("null-completion", [*AUTO, *_pc("pc_null.jsonl")], 1,
         ["pc_null.jsonl, line 4", "'completion' is null", "remove the row"]),
    Case("empty-fingpt-answers-dropped", [*TRAIN, "data.path={user}/fingpt_empty.jsonl", *STOP], 1,
         ["1 of 20 rows have an empty 'output'"]),
    Case("completion-turn-role-user", [*AUTO, *_pc("cpc_user.jsonl")], 1,
         ["cpc_user.jsonl, line 2", "completion turn 0 has role 'user'", "into 'prompt'"]),
    Case("messages-json-string", [*AUTO, *_pc("chat_string.jsonl")], 1,
         ["'messages' holds text that looks like JSON", "json.loads"], absent=["match no data format"]),
    Case("messages-json-string-chat-template", [*TRAIN, "template.name=chat", "data.path={user}/chat_string.jsonl"], 1,
         ["chat_string.jsonl, line 1", "looks like JSON", "json.loads"]),
    Case("empty-first-conversation", [*AUTO, *_pc("chat_empty_first.jsonl")], 1,
         ["first row: 'messages' is an empty list", "remove the empty row"], absent=["match no data format"]),
    Case("csv-header-with-space", [*AUTO, *_pc("pc_space.csv")], 1,
         ["' completion'", "spaces around them", "prompt-completion", 'data.columns = {"completion": " completion"}'],
         absent=["match no data format"]),
    Case("text-and-label-warns", [*AUTO, *_pc("text_label.jsonl"), *STOP], 1,
         ["language modelling", "column 'label' is not used", "template.name \"fingpt_sentiment\"",
          '"output": "label"']),
    Case("label-map-one-class", [*TRAIN, "data.path={user}/numeric.jsonl",
                                 "data.label_map={\"0\": \"neutral\", \"1\": \"neutral\", \"2\": \"neutral\"}", *STOP],
         1, ["all 20 training rows have the label 'neutral'", "after data.label_map", "pip install wandb"]),
    Case("leak-guard-group-by", [*TRAIN, "data.group_by=instruction", "data.path={user}/instr.jsonl", "evaluation.path={user}/eval_same_instr.jsonl"],
         1, ["data.group_by ('instruction')", "set data.group_by to it"], absent=["training data is an evaluation set"]),
]


def _write_surface_files(user: Path, model: Path) -> None:
    rows = _rows(20)
    _jsonl(user / "ok.jsonl", rows)
    _jsonl(user / "pc_some_empty.jsonl", [{**r, "completion": "" if i in (2, 5) else r["completion"]}
                                          for i, r in enumerate(PC)])
    _jsonl(user / "pc_all_empty.jsonl", [{**r, "completion": " "} for r in PC])
    _jsonl(user / "pc_null.jsonl", [{**r, "completion": None if i == 3 else r["completion"]} for i, r in enumerate(PC)])
    _jsonl(user / "fingpt_empty.jsonl", [{**r, "output": ""} if i == 7 else r for i, r in enumerate(rows)])
    _jsonl(user / "cpc_user.jsonl", [{"prompt": CPROMPT, "completion": CCOMP},
                                     {"prompt": CPROMPT, "completion": [{"role": "user", "content": "And?"}, *CCOMP]}])
    conv = [*CPROMPT, *CCOMP]
    _jsonl(user / "chat_string.jsonl", [{"messages": json.dumps(conv)}] * 4)
    _jsonl(user / "chat_empty_first.jsonl", [{"messages": []}] + [{"messages": conv}] * 3)
    (user / "pc_space.csv").write_text("prompt, completion\n" + "".join(
        f"\"{r['prompt']}\",\"{r['completion']}\"\n" for r in PC), encoding="utf-8")
    _jsonl(user / "text_label.jsonl", [{"text": r["input"], "label": i % 3} for i, r in enumerate(rows)])
    _jsonl(user / "numeric.jsonl", [{"input": r["input"], "output": str(i % 3)} for i, r in enumerate(rows)])
    _jsonl(user / "eval_same_instr.jsonl", [{"instruction": "Classify the headline.", "input": f"other {i}",
                                             "output": "neutral"} for i in range(6)])
    _jsonl(user / "instr.jsonl", [{"instruction": "Classify the headline.", **r} for r in rows])
    accel = {
        "zero4.yaml": "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config: {zero_stage: 4}\n",
        "zero_word.yaml": "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: three\n",
        "fsdp3.yaml": "distributed_type: FSDP\nnum_processes: 2\nfsdp_config: {fsdp_version: 3}\n",
        "many.yaml": "distributed_type: MULTI_GPUS\nnum_processes: 0\nnum_machines: 0\nfsdp_config: [1, 2]\n"
                     "mixed_precsion: bf16\n",
        "list.yaml": "- distributed_type: MULTI_GPU\n- num_processes: 2\n",
        "string.yaml": "MULTI_GPU\n",
        "ds_config.json": json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}),
        "ds_bad.yaml": f"distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  deepspeed_config_file: "
                       f"{user}/ds_stage5.json\n",
        "ds_stage5.json": json.dumps({"zero_optimization": {"stage": 5}}),
        "broken.yaml": "distributed_type: [MULTI_GPU\n",
    }
    for name, text in accel.items():
        (user / name).write_text(text, encoding="utf-8")
    recipe = {
        "name": "surface", "model": {"name_or_path": str(model)}, "lora": {"r": 4, "lora_alpha": 8},
        "data": {"path": str(user / "ok.jsonl")}, "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64},
        "output": {"dir": str(user.parent / "runs" / "out")},
    }
    (user / "r.json").write_text(json.dumps(recipe, indent=2), encoding="utf-8")
    del recipe["template"]
    (user / "r_auto.json").write_text(json.dumps(recipe, indent=2), encoding="utf-8")


# The preflight driver, with each case's environment set around it (set, or removed when empty), so that every case
# runs in ONE process: the variables are read when the checks run, not at import.
assert "\nfor name, args in cases:\n" in DRIVER and " == before}\n" in DRIVER
ENV_DRIVER = DRIVER.replace("\nfor name, args in cases:\n", """
import os
for name, args, env in cases:
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.pop(k, None) if v == "" else os.environ.__setitem__(k, v)
""").replace(" == before}\n", """ == before}
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    """Every case run by the driver of test_faults_preflight.py in one fresh process, each in its environment."""
    root = tmp_path_factory.mktemp("surface")
    user, runs = root / "user", root / "runs"
    user.mkdir()
    runs.mkdir()
    _write_surface_files(user, tiny_model)
    driver = root / "driver.py"
    driver.write_text(ENV_DRIVER, encoding="utf-8")
    spec = root / "cases.json"
    spec.write_text(json.dumps([[c.id, [_fill(a, user, runs) for a in c.args],
                                 {k: _fill(v, user, runs) for k, v in c.env.items()}] for c in CLI_CASES]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    for var in ("MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR"):  # only the cases that set them have them
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(driver), str(spec), str(user), str(Path(__file__).parent)],
                          cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"user": user, "runs": runs, **json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_surface_fault(results: dict[str, Any], case: Case) -> None:
    r = results[case.id]
    user, runs = results["user"], results["runs"]
    shown = f"$ finsft {' '.join(_fill(a, user, runs) for a in case.args)}\nexit {r['code']}\n{r['output'][-4000:]}"
    assert "Traceback" not in r["output"], shown
    assert r["code"] == case.code, shown
    missing = [w for w in (_fill(w, user, runs) for w in case.words) if w not in r["output"]]
    assert not missing, f"message lacks {missing}:\n{shown}"
    present = [w for w in case.absent if w in r["output"]]
    assert not present, f"message should not say {present}:\n{shown}"
    assert [m for m in r["heavy"] if m in HEAVY] == [], f"{r['heavy']} imported before the error was raised:\n{shown}"
    assert r["unchanged"], f"the user's files changed:\n{shown}"
    assert not (runs / "out").exists() and not (runs / "out.partial").exists(), "a refused run made its folder"


# --------------------------------------------------------------------- MLflow's default store, a real run


@pytest.mark.slow
def test_mlflow_without_a_tracking_uri_logs_to_the_run_folder(make_recipe: Any, monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """report_to mlflow with no MLFLOW_TRACKING_URI (the common start): finsft's file store RUN/mlruns, readable by
    MLflow's client at the published folder (the artifact locations point at RUN, not RUN.partial)."""
    pytest.importorskip("mlflow", reason="pip install mlflow-skinny (part of the dev extra)")
    from mlflow.tracking import MlflowClient

    from finsft.recipe import load_recipe
    from finsft.training import train

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(var, "x")  # recorded, so that the end of the test restores the variable as it was
        monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    out = train(load_recipe(str(make_recipe(training={"report_to": ["mlflow"], "max_steps": 2, "warmup_steps": 0}))))
    store = out / "mlruns"
    assert store.is_dir() and not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if client.search_runs([e.experiment_id])]
    (ml_run,) = client.search_runs([experiment.experiment_id])
    assert ml_run.info.status == "FINISHED" and ml_run.info.run_name == "tiny"
    assert [m.step for m in client.get_metric_history(ml_run.info.run_id, "loss")] == [1, 2]
    assert ml_run.info.artifact_uri.startswith(out.as_uri() + "/mlruns/")
    assert "finsft_recipe.json" in [a.path for a in client.list_artifacts(ml_run.info.run_id)]
    assert ".partial" not in "".join(p.read_text() for p in store.rglob("meta.yaml"))


# ---------------------------------------------------------------------------------------- small, in process


def test_accelerate_names_match_the_installed_accelerate() -> None:
    """finsft's lists (no accelerate import on the plan path) are the installed accelerate's."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    from finsft.plan.accelerate_config import CONFIG_KEYS, DISTRIBUTED_TYPES

    assert set(CONFIG_KEYS) == set(ClusterConfig.__dataclass_fields__)
    assert set(DISTRIBUTED_TYPES) == {t.value for t in DistributedType}


def test_accelerate_config_checks_accept_what_accelerate_writes() -> None:
    import yaml

    from finsft.plan.accelerate_config import check_accelerate_config

    shipped = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
    for path in sorted(shipped.glob("*.yaml")):
        assert check_accelerate_config(yaml.safe_load(path.read_text())) == [], path.name
    assert check_accelerate_config({"distributed_type": False, "num_processes": "2"}) == []  # YAML's NO; digits
    assert check_accelerate_config({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": True}})


def test_push_leaves_finsfts_mlflow_store_local(tmp_path: Path) -> None:
    from finsft.publish.hub import _ignored

    meta = tmp_path / "mlruns" / "0" / "abc" / "meta.yaml"
    assert _ignored(meta, tmp_path) and not _ignored(tmp_path / "eval.json", tmp_path)


def test_mlflow_destination_checks_without_mlflow_imported(tmp_path: Path) -> None:
    from finsft.errors import FinsftError
    from finsft.preflight import check_mlflow_destination

    assert "RUN/mlruns" in str(check_mlflow_destination({}))
    for ok in (tmp_path.as_uri() + "/new/mlruns", str(tmp_path / "plain"), "https://mlflow.example.com",
               "databricks"):
        assert check_mlflow_destination({"MLFLOW_TRACKING_URI": ok}) is None, ok
    with pytest.raises(FinsftError, match="scheme 'gopher:'"):
        check_mlflow_destination({"MLFLOW_TRACKING_URI": "gopher://x"})


def test_empty_targets_are_left_out_of_the_rows_trained_and_scored(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The preflight's rows are the rows trained on: the empty completions are gone (counted on stderr), and an
    evaluation set's empty references are not scored either."""
    from finsft.preflight import preflight
    from finsft.recipe import load_recipe

    data, heldout = tmp_path / "pc.jsonl", tmp_path / "heldout.jsonl"
    _jsonl(data, [{**r, "completion": "" if i in (2, 5) else r["completion"]} for i, r in enumerate(PC)])
    _jsonl(heldout, [{"prompt": f"Other {i}:", "completion": " " if i == 0 else " ok"} for i in range(4)])
    recipe = {"name": "pc", "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
              "lora": {"r": 4, "lora_alpha": 8}, "data": {"path": str(data), "validation_size": 0},
              "evaluation": {"path": str(heldout), "scorer": "generate"}, "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "r.json").write_text(json.dumps(recipe), encoding="utf-8")
    checked = preflight(load_recipe(str(tmp_path / "r.json")), "train")
    assert checked.splits is not None and len(checked.splits.train) == 6
    assert all(c.strip() for c in checked.splits.train["completion"])
    assert checked.main_set is not None and len(checked.main_set.rows) == 3
    err = capsys.readouterr().err
    assert "2 of 8 rows have an empty 'completion' (first: line 3, line 6)" in err
    assert "1 of 4 rows have an empty 'completion'" in err
