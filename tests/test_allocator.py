"""PyTorch's CUDA allocator: finsft sets expandable segments before torch is imported (so before CUDA starts) in
the commands that may use a GPU, keeps a user's setting (the current and the legacy variable), and the plan says
which it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from finsft.allocator import LEGACY_VARIABLE, VALUE, VARIABLE, allocator_choice, configure_allocator
from finsft.plan import Hardware, plan_run
from finsft.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30
H100 = Hardware(device="cuda", name="NVIDIA H100", bf16=True, tf32=True, memory_bytes=80 * GiB, flash_attn=False,
                liger=False, compute_capability=(9, 0))
CPU = Hardware(device="cpu", name="cpu", bf16=False, tf32=False, memory_bytes=None, flash_attn=False, liger=False)


def test_expandable_segments_unless_the_user_configured_the_allocator() -> None:
    env: dict[str, str] = {}
    assert configure_allocator(env) == VARIABLE and env == {VARIABLE: VALUE}  # torch 2.13 reads the new name
    assert configure_allocator(env) is None and env == {VARIABLE: VALUE}
    for name in (VARIABLE, LEGACY_VARIABLE):
        user = {name: "garbage_collection_threshold:0.6"}
        assert configure_allocator(user) is None and user == {name: "garbage_collection_threshold:0.6"}


def test_the_plan_says_what_the_allocator_does(make_recipe: Any) -> None:
    recipe = load_recipe(str(make_recipe()))
    setting = f"env.{VARIABLE}"
    auto = plan_run(recipe, H100, environ={}).choice(setting)
    assert (auto.value, auto.automatic) == (VALUE, True) and "33.9 -> 14.5 GiB" in auto.reason
    user = plan_run(recipe, H100, environ={LEGACY_VARIABLE: "max_split_size_mb:128"}).choice(setting)
    assert (user.value, user.automatic) == ("max_split_size_mb:128", False)
    assert LEGACY_VARIABLE in user.reason and "kept" in user.reason
    assert setting not in {c.setting for c in plan_run(recipe, CPU, environ={}).choices}  # no CUDA, no allocator
    assert allocator_choice({VARIABLE: VALUE})[2] is True  # as set by finsft in a run: automatic


# A child that runs the real CLI and records the allocator variables at the moment anything first imports torch,
# then stops (nothing after that moment matters here, and the test stays fast).
_CHILD = textwrap.dedent("""
    import importlib.abc, json, os, sys

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                with open(os.environ["RECORD"], "w") as f:
                    json.dump({k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}, f)
                os._exit(0)
            return None

    sys.meta_path.insert(0, Hook())
    from finsft.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _first_torch_import(tmp_path: Path, argv: list[str], **env: str) -> dict[str, Any] | None:
    record = tmp_path / "record.json"
    record.unlink(missing_ok=True)
    child_env = {k: v for k, v in os.environ.items() if k not in (VARIABLE, LEGACY_VARIABLE)}
    child_env.update(PYTHONPATH=str(REPO), RECORD=str(record), **env)
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=child_env, capture_output=True, text=True,
                          timeout=300)
    if not record.exists():
        assert proc.returncode == 0, proc.stderr
        return None
    return dict(json.loads(record.read_text()))


@pytest.mark.parametrize("command", ["train", "eval"])
def test_set_before_torch_is_imported_in_a_real_finsft_process(tmp_path: Path, make_recipe: Any,
                                                               command: str) -> None:
    recipe = str(make_recipe())
    assert _first_torch_import(tmp_path, [command, recipe]) == {VARIABLE: VALUE, LEGACY_VARIABLE: None}
    # a user's value, under either name, reaches torch untouched
    assert _first_torch_import(tmp_path, [command, recipe], **{LEGACY_VARIABLE: "max_split_size_mb:256"}) == {
        VARIABLE: None, LEGACY_VARIABLE: "max_split_size_mb:256"}
    assert _first_torch_import(tmp_path, [command, recipe], **{VARIABLE: "expandable_segments:False"}) == {
        VARIABLE: "expandable_segments:False", LEGACY_VARIABLE: None}


def test_light_commands_leave_the_environment_alone(tmp_path: Path, make_recipe: Any) -> None:
    # validate never imports torch, and sets nothing
    assert _first_torch_import(tmp_path, ["validate", str(make_recipe())]) is None
