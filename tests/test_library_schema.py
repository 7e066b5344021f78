"""The library keys of the recipe schema (finsft/library_schema.py): generated from the installed trl.SFTConfig,
peft.LoraConfig and transformers.BitsAndBytesConfig (drift test), validated with did-you-mean, passed through to
the library objects, and the cross-field rules of evaluation, checkpoints and early stopping."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from finsft import library_schema as ls
from finsft.plan import Hardware, get_peft_config, get_quantization_config, get_sft_config, plan_run
from finsft.recipe import check_recipe, load_recipe, schema

CPU = Hardware(device="cpu", name="test-cpu", bf16=False, tf32=False, memory_bytes=None, flash_attn=False,
               liger=False)
SMALL = (135_000_000, 576, 30)
SECTIONS = ("training", "lora", "quantization")


def props(section: str) -> dict[str, Any]:
    result: dict[str, Any] = schema()["properties"][section]["properties"]
    return result


def library_keys(section: str) -> dict[str, Any]:
    return {k: v for k, v in props(section).items() if ls.MARK in v}


def val(x: Any) -> Any:
    return getattr(x, "value", x)


# ------------------------------------------------------------------------------------------------ drift


def test_schema_matches_the_installed_libraries() -> None:
    versions = ", ".join(f"{k} {v}" for k, v in ls.library_versions().items())
    fresh = ls.generate(schema())
    for section in SECTIONS:
        old, new = props(section), fresh["properties"][section]["properties"]
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        assert not (added or removed or changed), (
            f"{section}: the schema differs from {versions}: new fields {added}, gone {removed}, changed {changed}. "
            f"Run `{ls.COMMAND}` and `python -m finsft.docs README.md`, and review the diff")
    assert fresh == schema()
    assert ls.dumps(fresh) == ls.schema_path().read_text(encoding="utf-8")


@pytest.mark.parametrize("section", SECTIONS)
def test_every_library_field_is_a_key_or_excluded_with_a_reason(section: str) -> None:
    fields = {f.name for f in ls.library_fields(section)}
    excluded = schema()["properties"][section][ls.EXCLUDED_MARK]
    keys = set(props(section))
    assert fields <= keys | set(excluded)
    assert not keys & set(excluded)
    assert all(isinstance(r, str) and len(r) > 10 for r in excluded.values())
    assert set(library_keys(section)) == fields - keys.difference(library_keys(section)) - set(excluded)


def test_the_libraries_many_keys_are_exposed() -> None:
    assert len(props("training")) >= 95 and len(props("lora")) >= 30
    for key in ("neftune_noise_alpha", "lr_scheduler_kwargs", "adam_beta2", "load_best_model_at_end",
                "metric_for_best_model", "torch_compile"):
        assert key in library_keys("training"), key
    for key in ("init_lora_weights", "rank_pattern", "alpha_pattern", "exclude_modules"):
        assert key in library_keys("lora"), key
    assert "llm_int8_threshold" in library_keys("quantization")
    # finsft's own keys stay first, the library's long tail follows
    names = list(props("training"))
    assert names.index("precision") < names.index("adam_beta2")
    assert {"eval_strategy", "early_stopping_patience", "report_to", "run_name"} <= set(names) - set(
        library_keys("training"))


def test_types_defaults_enums_and_help_come_from_the_library() -> None:
    from transformers.training_args import OptimizerNames
    from trl import SFTConfig

    fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    beta2 = props("training")["adam_beta2"]
    assert beta2["type"] == "number" and beta2["default"] == fields["adam_beta2"].default
    assert beta2["description"] == fields["adam_beta2"].metadata["help"].strip()
    assert props("training")["optim"]["enum"] == ["auto", *(o.value for o in OptimizerNames)]
    assert props("training")["logging_strategy"]["enum"] == ["no", "steps", "epoch"]
    assert "tensorboard" in props("training")["report_to"]["anyOf"][0]["enum"]
    assert props("lora")["init_lora_weights"]["default"] is True
    assert props("quantization")["llm_int8_threshold"]["default"] == 6.0


def test_generate_flags_fields_without_a_json_form_and_stale_exclusions() -> None:
    def fake(section: str) -> list[ls.LibraryField]:
        real = ls.library_fields(section)
        if section == "lora":
            real = [f for f in real if f.name != "task_type"]  # an excluded field the library dropped
            real.append(ls.LibraryField("new_thing", {"type": "integer"}, 3, "A new LoRA knob."))
            real.append(ls.LibraryField("weird", {}, None, "UNSUPPORTED: no JSON form for <class 'X'>"))
        return real

    with pytest.raises(ValueError) as exc:
        ls.generate(schema(), fake)
    text = str(exc.value)
    assert "lora.task_type: excluded, but peft.LoraConfig has no such field" in text
    assert "lora.weird: no JSON form" in text and "EXCLUDED" in text


def test_generate_adds_a_new_library_field_after_finsfts_keys() -> None:
    def fake(section: str) -> list[ls.LibraryField]:
        extra = [ls.LibraryField("new_thing", {"type": "integer"}, 3, "A new LoRA knob.")]
        return ls.library_fields(section) + (extra if section == "lora" else [])

    new = ls.generate(schema(), fake)["properties"]["lora"]["properties"]
    assert list(new)[-1] == "new_thing"
    assert new["new_thing"] == {"type": "integer", "description": "A new LoRA knob.", "default": 3,
                                "examples": [3], ls.MARK: "peft.LoraConfig"}


def test_json_schema_of_library_types() -> None:
    from typing import Literal

    assert ls.json_schema_of(int | None) == {"type": ["integer", "null"]}
    assert ls.json_schema_of(dict | str | None) == {"type": ["object", "null"]}
    assert ls.json_schema_of(list[tuple[int, int]]) == {
        "type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}}
    assert ls.json_schema_of(Literal["a", "n_[count]"]) == {
        "anyOf": [{"enum": ["a"]}, {"type": "string", "pattern": "^n_[0-9]+$"}]}
    with pytest.raises(ls.UnsupportedField):
        ls.json_schema_of(object)


# ------------------------------------------------------------------------------------- full-key recipes


def full_recipe(make_recipe: Any, **over: Any) -> Any:
    """Every key of the three library sections set (finsft's at their defaults, the library's at theirs)."""
    sections: dict[str, Any] = {s: {k: v["default"] for k, v in props(s).items()} for s in SECTIONS}
    sections["quantization"].update(load_in_4bit=True)
    sections["training"].update(max_steps=2, logging_steps=1, max_length=128)
    for section, values in over.items():
        sections[section].update(values)
    return make_recipe(**sections)


def test_a_recipe_setting_every_key_validates_and_compiles(make_recipe: Any, tmp_path: Any) -> None:
    recipe, problems = check_recipe(str(full_recipe(make_recipe)))
    assert problems == [] and recipe is not None
    plan = plan_run(recipe, CPU, SMALL)
    sft = get_sft_config(recipe, plan, str(tmp_path))  # no keyword given twice, every value accepted
    lora = get_peft_config(recipe)
    quant = get_quantization_config(recipe, plan)
    assert sft.adam_beta2 == 0.999 and sft.neftune_noise_alpha is None and lora.init_lora_weights is True
    assert quant.llm_int8_threshold == 6.0 and quant.load_in_4bit


def test_a_typo_among_all_the_keys_is_caught_with_a_suggestion(make_recipe: Any) -> None:
    path = full_recipe(make_recipe, training={"neftune_noise_alpa": 5}, lora={"init_lora_weigths": "pissa"},
                       quantization={"llm_int8_treshold": 5.0})
    _, problems = check_recipe(str(path))
    by_path = {p.path: p.message for p in problems}
    assert set(by_path) == {"$.training.neftune_noise_alpa", "$.lora.init_lora_weigths",
                            "$.quantization.llm_int8_treshold"}
    assert "Did you mean 'neftune_noise_alpha'?" in by_path["$.training.neftune_noise_alpa"]
    assert "Did you mean 'init_lora_weights'?" in by_path["$.lora.init_lora_weigths"]
    assert "Did you mean 'llm_int8_threshold'?" in by_path["$.quantization.llm_int8_treshold"]
    # the training section has ~100 keys: the message points to the reference instead of listing them
    assert "keys, listed by `finsft schema`" in by_path["$.training.neftune_noise_alpa"]
    assert len(by_path["$.training.neftune_noise_alpa"]) < 200


def test_a_wrong_value_of_a_library_key_is_caught(make_recipe: Any) -> None:
    path = make_recipe(training={"logging_strategy": "step", "adam_beta2": "high"},
                       lora={"init_lora_weights": "pisa", "rank_pattern": [1]})
    _, problems = check_recipe(str(path))
    by_path = {p.path: p.message for p in problems}
    assert "Did you mean 'steps'?" in by_path["$.training.logging_strategy"]
    assert "expected number" in by_path["$.training.adam_beta2"]
    assert "Did you mean 'pissa'?" in by_path["$.lora.init_lora_weights"]
    assert "$.lora.rank_pattern" in by_path


def test_a_field_finsft_sets_is_refused_with_the_reason(make_recipe: Any) -> None:
    _, problems = check_recipe(str(make_recipe(training={"output_dir": "x", "bf16": True},
                                               lora={"task_type": "SEQ_CLS"})))
    by_path = {p.path: p.message for p in problems}
    assert by_path["$.training.bf16"] == "'bf16' of trl.SFTConfig cannot be set in a recipe: set by training.precision"
    assert "output_dir" in by_path["$.training.output_dir"] and "run folder" in by_path["$.training.output_dir"]
    assert "CAUSAL_LM" in by_path["$.lora.task_type"]


def test_library_defaults_are_not_filled_in(make_recipe: Any) -> None:
    recipe = load_recipe(str(make_recipe(training={"adam_beta2": 0.95})))
    assert recipe["training"]["adam_beta2"] == 0.95 and "adam_beta1" not in recipe["training"]
    assert recipe["training"]["seed"] == 42 and recipe["training"]["early_stopping_patience"] is None


def test_set_library_keys_reach_the_library_objects(make_recipe: Any, tmp_path: Any) -> None:
    from peft.tuners.lora.config import EvaConfig

    recipe = load_recipe(str(make_recipe(
        training={"neftune_noise_alpha": 5, "adam_beta2": 0.95, "lr_scheduler_kwargs": {"min_lr": 1e-6},
                  "lr_scheduler_type": "cosine_with_min_lr", "logging_strategy": "epoch", "torch_compile": False},
        lora={"init_lora_weights": "pissa_niter_4", "rank_pattern": {"q_proj": 8}, "exclude_modules": ["lm_head"],
              "eva_config": {"rho": 1.5}},
        quantization={"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head"], "llm_int8_threshold": 5.0})))
    plan = plan_run(recipe, CPU, SMALL)
    sft = get_sft_config(recipe, plan, str(tmp_path))
    assert sft.neftune_noise_alpha == 5 and sft.adam_beta2 == 0.95 and sft.lr_scheduler_kwargs == {"min_lr": 1e-6}
    assert val(sft.logging_strategy) == "epoch"
    lora = get_peft_config(recipe)
    assert lora.init_lora_weights == "pissa_niter_4" and lora.rank_pattern == {"q_proj": 8}
    assert isinstance(lora.eva_config, EvaConfig) and lora.eva_config.rho == 1.5
    quant = get_quantization_config(recipe, plan)
    assert quant.llm_int8_skip_modules == ["lm_head"] and quant.llm_int8_threshold == 5.0 and quant.load_in_8bit


def test_tracking_keys_reach_the_sft_config(make_recipe: Any, tmp_path: Any) -> None:
    recipe = load_recipe(str(make_recipe(training={"report_to": ["tensorboard"]})))
    sft = get_sft_config(recipe, plan_run(recipe, CPU, SMALL), str(tmp_path))
    assert sft.report_to == ["tensorboard"] and sft.run_name == "tiny"  # the recipe's name
    recipe = load_recipe(str(make_recipe(training={"run_name": "lr-sweep-1"})))
    sft = get_sft_config(recipe, plan_run(recipe, CPU, SMALL), str(tmp_path))
    assert sft.report_to == [] or sft.report_to in ("none", ["none"])
    assert sft.run_name == "lr-sweep-1"


# ---------------------------------------------------------------------- evaluation, best model, stopping

VALIDATION = {"max_samples": 24, "validation_size": 8}


def test_early_stopping_compiles_to_best_model_settings(make_recipe: Any, tmp_path: Any) -> None:
    recipe = load_recipe(str(make_recipe(data=VALIDATION, training={"eval_steps": 2,
                                                                    "early_stopping_patience": 2})))
    sft = get_sft_config(recipe, plan_run(recipe, CPU, SMALL), str(tmp_path), has_eval=True)
    assert val(sft.eval_strategy) == "steps" and val(sft.save_strategy) == "steps"
    assert sft.save_steps == 2 and sft.load_best_model_at_end and sft.metric_for_best_model == "loss"
    # without a validation split (the start-up probe) the best-model settings are left out
    probe = get_sft_config(recipe, plan_run(recipe, CPU, SMALL), str(tmp_path), has_eval=False)
    assert val(probe.eval_strategy) == "no" and not probe.load_best_model_at_end


def test_explicit_strategies_and_metric_are_kept(make_recipe: Any, tmp_path: Any) -> None:
    recipe = load_recipe(str(make_recipe(data=VALIDATION, training={
        "eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True,
        "metric_for_best_model": "eval_loss", "greater_is_better": False})))
    sft = get_sft_config(recipe, plan_run(recipe, CPU, SMALL), str(tmp_path), has_eval=True)
    assert (val(sft.eval_strategy), val(sft.save_strategy)) == ("epoch", "epoch")
    assert sft.metric_for_best_model == "eval_loss" and sft.load_best_model_at_end
    probe = get_sft_config(recipe, plan_run(recipe, CPU, SMALL), str(tmp_path), has_eval=False)
    assert not probe.load_best_model_at_end and probe.metric_for_best_model is None


RULES = {
    "early stopping without evaluation": (
        {"data": VALIDATION, "training": {"early_stopping_patience": 2}},
        "$.training.early_stopping_patience", "does not evaluate during training"),
    "early stopping without a validation set": (
        {"training": {"early_stopping_patience": 2, "eval_strategy": "epoch"}},
        "$.training.eval_strategy", "needs a validation set"),
    "evaluation without a validation set": (
        {"training": {"eval_strategy": "epoch"}}, "$.training.eval_strategy", "needs a validation set"),
    "best model with mismatched strategies": (
        {"data": VALIDATION, "training": {"eval_steps": 5, "save_strategy": "epoch", "load_best_model_at_end": True}},
        "$.training.save_strategy", "save_strategy is \"epoch\" but eval_strategy is \"steps\""),
    "best model with save_steps off the evaluations": (
        {"data": VALIDATION, "training": {"eval_steps": 4, "save_steps": 6, "load_best_model_at_end": True}},
        "$.training.save_steps", "save_steps (6) must be a multiple of eval_steps (4)"),
    "a metric finsft does not compute": (
        {"data": VALIDATION, "training": {"eval_steps": 4, "metric_for_best_model": "bleu"}},
        "$.training.metric_for_best_model", "not computed"),
    "save best without evaluation": (
        {"training": {"save_strategy": "best"}}, "$.training.save_strategy", "does not evaluate"),
}


@pytest.mark.parametrize("name", RULES)
def test_training_rules(make_recipe: Any, name: str) -> None:
    sections, where, message = RULES[name]
    _, problems = check_recipe(str(make_recipe(**sections)))
    assert [p.path for p in problems] == [where], [str(p) for p in problems]
    assert message in problems[0].message


def test_the_schema_file_is_written_compactly() -> None:
    text = ls.schema_path().read_text(encoding="utf-8")
    assert json.loads(text) == schema()
    assert '"examples": ["auto"]' in text  # short lists stay on one line
    assert max(len(line) for line in text.splitlines() if '"description"' not in line) <= 118


def test_finsfts_own_keys_bind_to_the_library_constructors() -> None:
    """finsft's own lora / quantization / training keys that carry a library name bind to that library's
    constructor with their schema defaults (as torchtune's config validation does): a renamed library argument
    fails here, not in a user's run."""
    import inspect

    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    # finsft's own settings (compiled into several library arguments, or into callbacks)
    finsft_only = {"training": {"precision", "group_by_length", "gradient_checkpointing", "early_stopping_patience",
                                "early_stopping_threshold", "eval_task_samples", "supervised_lm_head"}}
    props = schema()["properties"]
    for section, cls in (("lora", LoraConfig), ("quantization", BitsAndBytesConfig), ("training", SFTConfig)):
        params = inspect.signature(cls).parameters
        own = {k: v.get("default") for k, v in props[section]["properties"].items()
               if "x-library" not in v and k not in finsft_only.get(section, set())}
        missing = sorted(set(own) - set(params))
        assert not missing, f"{section}: {missing} are not arguments of {cls.__name__}"
        values = {k: v for k, v in own.items() if v != "auto"}
        inspect.signature(cls).bind(**values)
