"""The validated recipe object and typed views of its sections.

The views name finsft's own keys (the library keys of training/lora/quantization that the schema generates from
the libraries are passed through untyped), so that mypy catches a renamed key; the schema stays the one place for
defaults and documentation (``tests/test_architecture.py`` checks the views against the schema).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

from finsft.errors import Problem


class ModelSection(TypedDict):
    name_or_path: str
    gguf_file: str | None
    revision: str | None
    trust_remote_code: bool
    dtype: str
    attn_implementation: str


class QuantizationSection(TypedDict):
    load_in_4bit: bool
    load_in_8bit: bool
    bnb_4bit_quant_type: str
    bnb_4bit_use_double_quant: bool
    bnb_4bit_compute_dtype: str
    bnb_4bit_quant_storage: str


class LoraSection(TypedDict):
    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: str | list[str]
    layers_to_transform: list[int] | None
    bias: Literal["none", "all", "lora_only"]
    use_rslora: bool
    use_dora: bool
    modules_to_save: list[str] | None


class DataSource(TypedDict):
    path: str
    name: str | None
    data_dir: str | None
    data_files: str | list[str] | dict[str, str] | None
    split: str
    columns: dict[str, str]
    label_map: dict[str, str]
    fraction: float


class DataSection(TypedDict):
    path: str | None
    datasets: list[DataSource] | None
    split: str
    columns: dict[str, str]
    label_map: dict[str, str]
    max_samples: int | None
    shuffle: bool
    validation_path: str | None
    validation_size: float
    group_by: str
    drop_eval_overlap: bool
    balance: str


class TemplateSection(TypedDict):
    name: str
    labels: str | list[str] | None
    prompt: str | None
    completion: str | None
    chat_template: bool
    system: str | None
    completion_only_loss: bool


class TrainingSection(TypedDict):
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler_type: str
    warmup_steps: float
    weight_decay: float
    max_grad_norm: float
    optim: str
    max_length: int | None
    packing: bool | str
    group_by_length: bool | str
    gradient_checkpointing: bool | str
    precision: str
    use_liger_kernel: bool | str
    supervised_lm_head: bool | str
    tf32: bool | str
    logging_steps: int
    eval_steps: int | None
    eval_strategy: str
    save_steps: int | None
    save_total_limit: int | None
    save_strategy: str
    early_stopping_patience: int | None
    early_stopping_threshold: float
    eval_task_samples: int
    seed: int
    dataloader_num_workers: int
    report_to: str | list[str]
    run_name: str | None


class EvaluationSetSection(TypedDict):
    path: str
    name: str | None
    split: str
    columns: dict[str, str]
    template: str | None
    labels: str | list[str] | None
    label_map: dict[str, str]
    max_samples: int | None


class EvaluationSection(TypedDict):
    path: str | None
    split: str | None
    scorer: str
    max_samples: int | None
    batch_size: int
    max_new_tokens: int | None
    generate_samples: int | None
    before_training: bool
    suite: str | None
    suite_data: str | None
    sets: dict[str, EvaluationSetSection]


class OutputSection(TypedDict):
    dir: str
    save_merged: bool
    plot: bool
    push_to_hub: bool
    hub_model_id: str | None
    hub_private_repo: bool


SECTION_VIEWS: dict[str, type] = {
    "model": ModelSection, "quantization": QuantizationSection, "lora": LoraSection, "data": DataSection,
    "template": TemplateSection, "training": TrainingSection, "evaluation": EvaluationSection,
    "output": OutputSection,
}


@dataclass
class Recipe:
    """A validated recipe: ``config`` has every default filled in; ``raw`` is what the files and overrides say."""

    source: str
    raw: dict[str, Any]
    config: dict[str, Any]
    files: list[str] = field(default_factory=list)  # the recipe and every file it extends, child first
    warnings: list[Problem] = field(default_factory=list)  # allowed, but worth saying (e.g. trust_remote_code)
    # Without template.name: the data format found (finsft.data_formats) and why; None when the recipe names its
    # template, or when its data cannot be read before the run (a hub id, Parquet: the run decides).
    data_format: str | None = None

    @property
    def template_pending(self) -> bool:
        """The recipe names no template and its data format is decided when the data loads."""
        section = self.raw.get("template")
        return not (isinstance(section, dict) and "name" in section) and self.data_format is None

    def __getitem__(self, key: str) -> Any:
        return self.config[key]

    @property
    def name(self) -> str:
        """The recipe's "name", or its file's stem when it has none (not the schema's generic default)."""
        return str(self.raw.get("name") or Path(self.source).stem)

    @property
    def model(self) -> ModelSection:
        return cast(ModelSection, self.config["model"])

    @property
    def quantization(self) -> QuantizationSection | None:
        return cast("QuantizationSection | None", self.config["quantization"])

    @property
    def lora(self) -> LoraSection | None:
        return cast("LoraSection | None", self.config["lora"])

    @property
    def data(self) -> DataSection:
        return cast(DataSection, self.config["data"])

    @property
    def template(self) -> TemplateSection:
        return cast(TemplateSection, self.config["template"])

    @property
    def training(self) -> TrainingSection:
        return cast(TrainingSection, self.config["training"])

    @property
    def evaluation(self) -> EvaluationSection | None:
        return cast("EvaluationSection | None", self.config["evaluation"])

    @property
    def evaluation_settings(self) -> EvaluationSection:
        """The evaluation section, or the schema's defaults for it when the recipe has none (``finsft eval``
        scores a recipe without one)."""
        if self.config["evaluation"] is not None:
            return cast(EvaluationSection, self.config["evaluation"])
        from finsft.recipe.schema import apply_defaults, schema

        return cast(EvaluationSection, apply_defaults(schema()["properties"]["evaluation"], {}))

    @property
    def output(self) -> OutputSection:
        return cast(OutputSection, self.config["output"])

    def with_changes(self, changes: dict[str, Any]) -> Recipe:
        """A copy with ``changes`` ({"section": {"key": value}}) merged into both ``raw`` and ``config`` (which
        stay in agreement). The caller keeps the recipe valid; ``finsft bench`` uses it for its baseline."""
        raw, config = copy.deepcopy(self.raw), copy.deepcopy(self.config)
        for section, values in changes.items():
            for target in (raw, config):
                if isinstance(values, dict) and isinstance(target.get(section), dict):
                    target[section].update(copy.deepcopy(values))
                else:
                    target[section] = copy.deepcopy(values)
        return Recipe(self.source, raw, config, list(self.files), list(self.warnings), self.data_format)
