"""Prompt templates: how a data row becomes a (prompt, completion) pair.

This module is light (no torch/transformers): `finsft validate` uses it to check template names and settings.
Third-party packages register templates through the ``finsft.templates`` entry point group; each entry point
loads to a :class:`Template` (or a zero-argument callable returning one).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import Any

from finsft.errors import DataError, FinsftError, did_you_mean

ENTRY_POINT_GROUP = "finsft.templates"

FINGPT3 = ("negative", "neutral", "positive")
FINGPT9 = (
    "strong negative",
    "moderately negative",
    "mildly negative",
    "negative",
    "neutral",
    "positive",
    "mildly positive",
    "moderately positive",
    "strong positive",
)
LABEL_SETS: dict[str, tuple[str, ...]] = {"fingpt3": FINGPT3, "fingpt9": FINGPT9}

SENTIMENT_INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
FIQA_INSTRUCTION = (
    "Utilize your financial knowledge, give your answer or opinion to the input question or subject . "
    "Answer format is not limited."
)
# FinGPT's sentiment prompt, token for token (fingpt/FinGPT_Benchmark/utils.py and benchmarks/*.py at ec315843):
# the prompt ends in "Answer: " (trailing space) and the answer is tokenized APART from it, so training sees the
# prompt tokens FinGPT's benchmark code gives the model when it scores (tokenizer(prompt), then generation); joined
# into one string, the trailing space would merge into the answer's first token instead. The answer is a word with
# its leading-space marker (" positive" -> Ġpositive / ▁positive): on the SentencePiece tokenizers FinGPT trained
# (Llama-2) that is the very token its utils.py appends (the dummy prefix); on byte-level BPE (SmolLM2, Llama-3)
# utils.py's bare "positive" after a lone "Ġ" is a pair pre-training never shows (BPE words carry their space), and
# adapters trained on it score lower under FinGPT's own code (README, "FinGPT's tokens"). A custom template with the
# completion "{output}" trains utils.py's bare tokens exactly.
FINGPT_PROMPT = "Instruction: {instruction}\nInput: {input}\nAnswer: "
FINGPT_COMPLETION = " {output}"
# The same prompt without the trailing space, the answer as its continuation (" answer"): the QA template, whose
# prompt and target are tokenized together as one text (a free-text answer is not scored by FinGPT's code).
FINGPT_QA_PROMPT = "Instruction: {instruction}\nInput: {input}\nAnswer:"
FINGPT_QA_COMPLETION = " {output}"


# Largest width or precision a placeholder's format spec may ask for ({input:>1000} pads to 1,000 characters).
MAX_FORMAT_WIDTH = 1000


class TemplateFormatError(FinsftError, ValueError):
    """A template's format string is malformed or unsafe (a ValueError for callers that check format strings)."""


def format_fields(fmt: str) -> list[str]:
    """Field names a format string refers to; raises TemplateFormatError (a ValueError) when the string is
    malformed or unsafe: a placeholder must be a plain field name, and its format spec (``{input:>10}``) may not
    hold another placeholder (which str.format would evaluate, attribute access included) nor a width above
    MAX_FORMAT_WIDTH. Rendering calls this too, so a template that skipped validation is refused at render time."""
    names = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:  # "Single '}' encountered in format string" and the like
        raise TemplateFormatError(f"{exc}; write a literal brace as {{{{ or }}}}") from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or not name.isidentifier():
            raise TemplateFormatError(f"placeholder {{{name}}} must be a field name such as {{input}}")
        if spec:
            _check_spec(name, spec, conversion)
        names.append(name)
    return names


def _check_spec(name: str, spec: str, conversion: str | None) -> None:
    shown = f"{{{name}{'!' + conversion if conversion else ''}:{spec}}}"
    if "{" in spec or "}" in spec:
        raise TemplateFormatError(f"placeholder {shown} has a placeholder inside its format spec; only plain "
                                  f"fields such as {{{name}}} or {{{name}:>10}} are allowed (write a literal "
                                  "brace as {{ or }})")
    for number in re.findall(r"\d+", spec):
        if int(number) > MAX_FORMAT_WIDTH:
            raise TemplateFormatError(f"placeholder {shown} asks for width or precision {int(number)}; at most "
                                      f"{MAX_FORMAT_WIDTH} is allowed (a width pads every row's text to that many "
                                      "characters)")
    try:
        format("text", spec)
    except ValueError as exc:
        raise TemplateFormatError(f"placeholder {shown}: format spec ':{spec}' does not apply to text ({exc})") \
            from exc


@dataclass(frozen=True)
class Template:
    """A prompt template.

    ``prompt`` and ``completion`` are ``str.format`` strings over the row's fields. ``defaults`` fills fields a
    row may lack (e.g. the instruction). ``labels`` makes it a classification template: the completion field
    ``label_field`` must hold one of them.
    """

    name: str
    description: str
    prompt: str
    completion: str
    defaults: Mapping[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    label_field: str = "output"
    supports_packing: bool = True
    # Chat data: the field holding a conversation (a list of {"role", "content"}), formatted with the tokenizer's
    # chat template and trained on its assistant turns (finsft.chat); prompt and completion are not used.
    messages_field: str | None = None
    # TRL's conversational prompt-completion: the prompt and completion fields hold lists of messages, formatted
    # with the tokenizer's chat template; the loss covers the completion's assistant turns.
    conversational: bool = False
    # TRL's language modelling ("text" data): the completion field's text is trained on whole, with no prompt.
    language_modeling: bool = False
    # The completion is tokenized on its own (stripped, no special tokens) and appended to the prompt's tokens, as
    # FinGPT's utils.py does, instead of as the prompt's continuation. Set where the prompt ends in a space.
    completion_apart: bool = False

    @property
    def fields(self) -> list[str]:
        """Every field the template reads, in order of first use."""
        seen: dict[str, None] = {}
        for name in format_fields(self.prompt) + format_fields(self.completion):
            seen.setdefault(name)
        return list(seen)

    @property
    def completion_lead(self) -> str:
        """The whitespace the completion's format string starts with (kept when the answer is tokenized apart)."""
        return self.completion[: len(self.completion) - len(self.completion.lstrip())]

    @property
    def required_fields(self) -> list[str]:
        return [f for f in self.fields if f not in self.defaults]

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    def render_prompt(self, row: Mapping[str, Any]) -> str:
        """The prompt for a row; only the prompt's fields are needed (a row to predict has no answer)."""
        return self.prompt.format_map(self._values(row, format_fields(self.prompt)))

    def render_completion(self, row: Mapping[str, Any]) -> str:
        return self.completion.format_map(self._values(row, format_fields(self.completion)))

    def reference(self, row: Mapping[str, Any]) -> str:
        """The answer a generation is compared with: the completion field, or a conversation's last assistant
        turn."""
        if self.messages_field or self.conversational:
            messages = row[self.messages_field or self.label_field]
            turns = [m for m in messages if m.get("role") == "assistant"]
            return str(turns[-1]["content"]) if turns else ""
        return str(row[self.label_field])

    def render_label(self, label: str) -> str:
        """The completion text for a label (used to score labels by likelihood)."""
        format_fields(self.completion)  # the same guard as rendering a row
        return self.completion.format_map(_Only(self.label_field, label))

    def _values(self, row: Mapping[str, Any], names: list[str]) -> dict[str, str]:
        values = {}
        for name in names:
            value = row.get(name)
            if value is None or value == "":
                value = self.defaults.get(name, value)
            if value is None:
                raise DataError(f"template '{self.name}' needs field '{name}', which this row lacks")
            if isinstance(value, (list, tuple, dict)):
                raise DataError(f"template '{self.name}': field '{name}' holds {type(value).__name__} "
                                f"{_short(value)}, not text; the template needs a string there")
            values[name] = str(value)
        return values


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Only(dict[str, str]):
    """format_map helper that fills one field and leaves the others empty."""

    def __init__(self, key: str, value: str):
        super().__init__({key: value})

    def __missing__(self, key: str) -> str:
        return ""


BUILTIN: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="fingpt_sentiment",
            description="FinGPT sentiment: instruction + news/tweet -> one label (fingpt3: negative/neutral/positive; "
            "fingpt9 adds mildly/moderately/strong). FinGPT's 'Instruction/Input/Answer: ' prompt, token for token as "
            "FinGPT trains and scores (its trailing space a token of its own); the label follows as a word, tokenized "
            "apart with its leading space.",
            prompt=FINGPT_PROMPT,
            completion=FINGPT_COMPLETION,
            defaults={"instruction": SENTIMENT_INSTRUCTION},
            labels=FINGPT3,
            completion_apart=True,
        ),
        Template(
            name="fiqa_qa",
            description="FinGPT FiQA QA: instruction + financial question -> free-text answer, scored with ROUGE-L "
            "and token F1.",
            prompt=FINGPT_QA_PROMPT,
            completion=FINGPT_QA_COMPLETION,
            defaults={"instruction": FIQA_INSTRUCTION},
        ),
        Template(
            name="chat",
            description="Chat data: a 'messages' column of conversations (list of {role, content}; roles system, "
            "user, assistant), formatted with the tokenizer's chat template; the loss is on assistant turns only.",
            prompt="{messages}",
            completion="",
            label_field="messages",
            messages_field="messages",
        ),
        Template(
            name="prompt_completion",
            description="TRL's standard prompt-completion data: 'prompt' and 'completion' text columns, used as they "
            "are (the completion is appended to the prompt); the loss is on the completion. Found without a "
            "template name.",
            prompt="{prompt}",
            completion="{completion}",
            label_field="completion",
        ),
        Template(
            name="chat_prompt_completion",
            description="TRL's conversational prompt-completion data: 'prompt' and 'completion' hold lists of "
            "{role, content}, formatted with the tokenizer's chat template; the loss is on the completion's "
            "assistant turns. Found without a template name.",
            prompt="{prompt}",
            completion="{completion}",
            label_field="completion",
            conversational=True,
        ),
        Template(
            name="text",
            description="TRL's language modelling data: a 'text' column (filings, news) trained on whole, every "
            "token in the loss (continued pre-training). No task evaluation: the validation loss measures it. "
            "Found without a template name.",
            prompt="",
            completion="{text}",
            label_field="text",
            language_modeling=True,
        ),
        Template(
            name="short_sentiment",
            description="Compact sentiment prompt ('{input}\\nSentiment:'), about a third of FinGPT's prompt length: "
            "more rows per minute when compute is the limit.",
            prompt="{input}\nSentiment:",
            completion=" {output}",
            labels=FINGPT3,
        ),
    )
}

CUSTOM = "custom"


def registered_names() -> list[str]:
    """Names of every registered template (built-in and entry points), plus 'custom'. Imports nothing."""
    names = set(BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return [*sorted(names), CUSTOM]


def get_template(name: str) -> Template:
    """A registered template by name (built-ins first, then the entry point group)."""
    if name in BUILTIN:
        return BUILTIN[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            obj = ep.load()
            template = obj() if callable(obj) and not isinstance(obj, Template) else obj
            if not isinstance(template, Template):
                raise FinsftError(f"entry point '{ep.value}' for template '{name}' did not give a finsft Template")
            # The registered name is what recipes and `finsft templates` use.
            return template if template.name == name else replace(template, name=name)
    raise FinsftError(f"unknown template '{name}'.{did_you_mean(name, registered_names())}"
                      f" Registered: {', '.join(registered_names())}")


def resolve_labels(labels: str | Sequence[str] | None, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if labels is None:
        return default
    if isinstance(labels, str):
        return LABEL_SETS[labels]
    return tuple(labels)


def template_from_recipe(section: Mapping[str, Any]) -> Template:
    """The template a (validated) recipe's ``template`` section describes."""
    name = section.get("name", "fingpt_sentiment")
    if name == CUSTOM:
        completion_fields = format_fields(section["completion"])
        base = Template(
            name=CUSTOM,
            description="declarative template from the recipe",
            prompt=section["prompt"],
            completion=section["completion"],
            # A classifier's completion names exactly one field: the label.
            label_field=completion_fields[0] if len(completion_fields) == 1 else "output",
            # A prompt ending in a space keeps it as its own token(s), the answer tokenized apart (FinGPT's way):
            # joined into one text, the space would merge into the answer's first token.
            completion_apart=section["prompt"].endswith((" ", "\t")),
        )
    else:
        base = get_template(name)
    labels = resolve_labels(section.get("labels"), base.labels)
    return replace(base, labels=labels) if labels != base.labels else base


def to_three_class(text: str) -> str:
    """FinGPT's benchmark mapping of an answer to negative/neutral/positive.

    Exactly as FinGPT's benchmarks (tfns.py, fpb.py): 'positive' or 'Positive' anywhere -> positive, else
    'negative' or 'Negative' -> negative, else neutral. The 9-label strings map by the same rule.
    """
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"
