"""Hub publishing, offline: ``finsft push`` and ``output.push_to_hub`` run in real subprocesses with HF_ENDPOINT
pointing at a fake hub on 127.0.0.1 (tests/_fake_hub.py), so huggingface_hub's own create_repo and upload_folder
code makes the HTTP calls. What the fake cannot show: the real hub's responses and the Xet storage protocol that
hf_xet uses for large files (the LFS path is exercised with HF_HUB_DISABLE_XET=1; with hf_xet on, the fake asks
for every file inline)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _fake_hub import FakeHub, Hub
from conftest import INVENTED_TEST, INVENTED_TRAIN

pytestmark = pytest.mark.slow  # trains a tiny model once (~20 s) and runs finsft in subprocesses


def _recipe(folder: Path, model: Path, name: str = "tiny-push", **output: Any) -> Path:
    recipe = {
        "name": name,
        "model": {"name_or_path": str(model)},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "data": {"path": str(INVENTED_TRAIN), "max_samples": 16},
        "template": {"name": "fingpt_sentiment"},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                     "max_length": 96, "save_steps": 1},
        "evaluation": {"path": str(INVENTED_TEST), "max_samples": 8},
        "output": {"dir": str(folder / "run"), **output},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(recipe))
    return path


def _env(hub: Hub | None, tmp: Path, *, token: str | None = None, xet: bool = False, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "HF_HUB_DISABLE_XET")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf-home"), COLUMNS="200")  # no stored token there
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    if token is not None:
        env["HF_TOKEN"] = token
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    env.update(extra)
    return env


def finsft(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "finsft", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A finished run (adapter, tokenizer, eval.json, predictions.jsonl, checkpoints/, merged/)."""
    folder = tmp_path_factory.mktemp("push-run")
    recipe = _recipe(folder, tiny_model, save_merged=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = finsft(["train", str(recipe)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = folder / "run"
    assert (run / "checkpoints").is_dir() and (run / "predictions.jsonl").is_file() and (run / "merged").is_dir()
    return run


def _expected(run: Path) -> set[str]:
    """What goes up: everything but checkpoints/, predictions.jsonl and the marker."""
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()
            and not p.relative_to(run).as_posix().startswith("checkpoints/")
            and p.name not in ("predictions.jsonl", ".finsft")}


@pytest.mark.parametrize("xet", [False, True], ids=["lfs", "hf_xet-installed"])
def test_push_uploads_the_run_folder_privately(run_dir: Path, tmp_path: Path, xet: bool) -> None:
    with FakeHub(all_regular=xet) as hub:
        proc = finsft(["push", str(run_dir), "--repo", "my-org/tiny-sentiment"], _env(hub, tmp_path, token=hub.token,
                                                                                     xet=xet))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hub.creates == [{"name": "tiny-sentiment", "organization": "my-org", "visibility": "private",
                            "type": "model"}]
    repo = hub.repos["my-org/tiny-sentiment"]
    assert repo["private"] is True
    files = repo["files"]
    assert set(files) == _expected(run_dir)
    assert not any(f.startswith("checkpoints/") or f.endswith("predictions.jsonl") for f in files)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "eval.json",
                 "merged/model.safetensors", "merged/config.json"):
        assert files[name] == (run_dir / name).read_bytes(), name  # byte for byte what the run saved
    if not xet:  # the weights went through the git-lfs batch API and a PUT, checked against their sha256
        oid = hashlib.sha256((run_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert ("PUT", f"/lfs-upload/{oid}") in hub.requests
        assert any(p.endswith(".git/info/lfs/objects/batch") for _, p in hub.requests)
    # The card went up after the hub's metadata check, naming the repository it lives in.
    card = files["README.md"].decode()
    assert any(v["content"] == card for v in hub.validated)
    assert 'from_pretrained("my-org/tiny-sentiment")' in card and "model-index" in card
    assert 'subfolder="merged"' in files["merged/README.md"].decode()
    assert "pushed" in proc.stdout and "my-org/tiny-sentiment" in proc.stdout


def test_push_public_under_the_users_namespace_by_default_name(run_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        proc = finsft(["push", str(run_dir), "--public"], _env(hub, tmp_path, token=hub.token))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # No --repo: the recipe's name, no namespace (the hub puts it under the token's account).
    assert hub.creates == [{"name": "tiny-push", "organization": None, "visibility": "public", "type": "model"}]
    assert hub.repos["alice/tiny-push"]["private"] is False
    assert "alice/tiny-push" in proc.stdout


def test_push_into_an_existing_repository(run_dir: Path, tmp_path: Path) -> None:
    with FakeHub() as hub:
        env = _env(hub, tmp_path, token=hub.token)
        first = finsft(["push", str(run_dir), "--repo", "alice/again"], env)
        second = finsft(["push", str(run_dir), "--repo", "alice/again"], env)
    assert first.returncode == 0 and second.returncode == 0, second.stdout + second.stderr
    assert len(hub.creates) == 2 and len(hub.commits) == 2  # 409 on the second create is "exists", not an error


@pytest.mark.parametrize("case", ["no-token", "offline", "bad-repo", "three-parts", "not-a-run", "unreachable",
                                  "wrong-token"])
def test_push_errors_for_people(run_dir: Path, tmp_path: Path, case: str) -> None:
    with FakeHub() as hub:
        run, repo, env = str(run_dir), "alice/tiny", _env(hub, tmp_path, token=hub.token)
        if case == "no-token":
            env = _env(hub, tmp_path)
        elif case == "offline":
            env["HF_HUB_OFFLINE"] = "1"
        elif case == "bad-repo":
            repo = "alice/tiny--model"
        elif case == "three-parts":
            repo = "alice/tiny/model"
        elif case == "not-a-run":
            (tmp_path / "somefolder").mkdir()
            (tmp_path / "somefolder" / "adapter_config.json").write_text("{}")
            run = str(tmp_path / "somefolder")
        elif case == "unreachable":
            env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: nothing listens
        elif case == "wrong-token":
            env["HF_TOKEN"] = "hf_wrong"
        proc = finsft(["push", run, "--repo", repo], env, timeout=120)
    expected = {
        "no-token": "not logged in to the Hugging Face hub: run `hf auth login`",
        "offline": "the hub is switched off on this machine (HF_HUB_OFFLINE",
        "bad-repo": "--repo 'alice/tiny--model' is not a hub repository id: '--' and '..' are not allowed",
        "three-parts": "--repo 'alice/tiny/model' is not a hub repository id: write NAME or NAMESPACE/NAME",
        "not-a-run": "is not a finished finsft run: it has no recipe.json or manifest.json",
        "unreachable": "cannot reach the hub at http://127.0.0.1:9",
        "wrong-token": "refused your token (401",
    }[case]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(hub.repos.get(r, {}).get("files") for r in hub.repos)  # nothing was uploaded
    if case in ("unreachable", "wrong-token"):
        assert f"push again with: finsft push {run_dir} --repo {repo}" in proc.stderr


def test_train_pushes_at_the_end(tmp_path: Path, tiny_model: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model, name="tiny-end", push_to_hub=True, hub_model_id="team/tiny-end")
    with FakeHub() as hub:
        proc = finsft(["train", str(recipe)], _env(hub, tmp_path, token=hub.token))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert hub.creates == [{"name": "tiny-end", "organization": "team", "visibility": "private", "type": "model"}]
    assert set(hub.repos["team/tiny-end"]["files"]) == _expected(run)
    assert "pushed" in proc.stdout and "team/tiny-end" in proc.stdout


def test_push_to_hub_without_a_token_fails_before_training(tmp_path: Path, tiny_model: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model, name="tiny-notoken", push_to_hub=True)
    t0 = time.perf_counter()
    proc = finsft(["train", str(recipe)], _env(None, tmp_path))
    assert proc.returncode == 1
    assert "not logged in to the Hugging Face hub" in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()  # nothing was trained
    assert time.perf_counter() - t0 < 120


def test_recipe_rejects_a_bad_hub_model_id(tmp_path: Path, tiny_model: Path) -> None:
    from finsft.commands.validate import validate_files

    for repo, message in (("a--b", "'--' and '..' are not allowed"), ("a/b/c", "does not match")):
        recipe = _recipe(tmp_path, tiny_model, hub_model_id=repo)
        result = validate_files([str(recipe)], [])
        assert result.n_invalid == 1
        text = json.dumps([str(p) for f in result.files for p in f.errors])
        assert "hub_model_id" in text and message in text, text
