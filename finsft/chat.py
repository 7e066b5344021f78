"""Chat data: rows whose ``messages`` column holds a conversation (OpenAI style: a list of {"role", "content"}
with roles system/user/assistant), formatted with the tokenizer's chat template, trained on assistant turns only.

``content`` is a string, or a list of text parts (``[{"type": "text", "text": ...}]``, as OpenAI and TRL write it),
which is used as the concatenation of its texts; any other part (an image, audio) or a value that is not text (a
number, an object) is refused with the file, the line and the reason, never trained as its Python repr.

TRL's ``assistant_only_loss`` needs a chat template with ``{% generation %}`` markers, which most shipped templates
(SmolLM2's, Llama's, Mistral's) lack. finsft computes the mask itself by rendering prefixes: assistant turn ``i``
is the text the template adds between ``messages[:i]`` rendered with the generation prompt and ``messages[:i+1]``
(its content and end-of-turn token; the whitespace that separates turns is not trained). The whole conversation is
tokenized once and a token is trained when its characters overlap an assistant turn, so the ids are exactly those
of the rendered conversation.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from finsft.errors import DataError
from finsft.files import open_readable

ROLES = ("system", "user", "assistant")
# Bad rows named in one message; the rest are counted.
SHOWN = 8


def _role_hint(role: str) -> str:
    close = [r for r in ROLES if r == role.strip().lower()] or difflib.get_close_matches(
        role.strip().lower(), ROLES, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def content_text(content: Any, i: int) -> str:
    """A message's content as text: a string, or the texts of a list of text parts joined. DataError (without
    the row: the caller adds it) for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"has type '{kind}'" if isinstance(kind, str) else f"is {part!r:.80}"
                raise DataError(f"message {i} content part {j} {what}: only text parts "
                                "({\"type\": \"text\", \"text\": \"...\"}) can be trained (a text model has no input "
                                "for images or audio); drop the other parts when preparing the data")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"message {i} content is {type(content).__name__} {content!r:.80}, not text: give a string "
                    "(or a list of {\"type\": \"text\", \"text\": \"...\"} parts); quote numbers, e.g. \"5\"")


def check_conversation(value: Any, where: str = "") -> list[dict[str, str]]:
    """A conversation as a list of {role, content} with text content; DataError naming ``where`` (file and line)
    otherwise."""
    at = f"{where}: " if where else ""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        raise DataError(f"{at}'messages' holds text that looks like JSON ({value[:60]!r}), not a list: the "
                        "conversation was saved as a string. Store the list itself (json.loads each value when "
                        "preparing the file)")
    if not isinstance(value, list) or not value:
        raise DataError(f"{at}'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, "
                        f"got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or "content" not in msg:
            raise DataError(f"{at}message {i} must be an object with string 'role' and 'content', got {msg!r:.120}")
        if msg["role"] not in ROLES:
            raise DataError(f"{at}message {i} has role '{msg['role']}'; allowed: {', '.join(ROLES)}."
                            f"{_role_hint(msg['role'])}")
        try:
            text = content_text(msg["content"], i)
        except DataError as exc:
            raise DataError(f"{at}{exc}") from None
        out.append({"role": msg["role"], "content": text})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{at}the conversation has no assistant message, so nothing to learn from")
    return out


def jsonl_lines(path: str | None, rows: Sequence[int]) -> dict[int, int] | None:
    """The line of each row (1-based) of a JSON Lines file (blank lines hold no row), or None when ``path`` is
    not a local .jsonl file."""
    if not path or not path.lower().endswith(".jsonl") or not os.path.isfile(path):
        return None
    want, out, row = set(rows), {}, 0
    with open_readable(path, "data file") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                row += 1
                if row in want:
                    out[row] = line_no
                    if len(out) == len(want):
                        break
    return out


def check_conversations(values: Sequence[Any], source: str, path: str | None = None) -> list[list[dict[str, str]]]:
    """Every conversation of a data source (in file order), checked; one DataError listing the bad rows (their
    line when ``path`` is a JSON Lines file, else their row) with the reason of each."""
    bad: list[tuple[int, str]] = []
    out = []
    for row, value in enumerate(values, start=1):
        try:
            out.append(check_conversation(value))
        except DataError as exc:
            bad.append((row, str(exc)))
    if not bad:
        return out
    lines = jsonl_lines(path, [r for r, _ in bad[:SHOWN]])
    where = [f"line {lines[r]}" if lines and r in lines else f"row {r}" for r, _ in bad[:SHOWN]]
    shown = "\n  ".join(f"{source}, {w}: {why}" for w, (_, why) in zip(where, bad[:SHOWN], strict=True))
    more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    raise DataError(f"{len(bad)} of {len(values)} conversations in {source} cannot be trained:\n  {shown}{more}")


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """``system`` as the first message when the conversation has none of its own."""
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (content and end of turn)."""
    text = _render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (through.startswith(head) and text.startswith(through)):
            raise DataError("the tokenizer's chat template renders a conversation differently from its prefixes, "
                            "so the assistant turns cannot be located; use prompt/completion data instead")
        end = len(through.rstrip())
        if end > len(head):
            spans.append((len(head), end))
    return text, spans


def conversation_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt, reference) for scoring: every message before the last assistant turn, rendered with the generation
    prompt, and that turn's content."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _render(tokenizer, messages[:last], generation_prompt=True), messages[last]["content"]


def tokenize_conversations(tokenizer: Any, conversations: Sequence[Any], system: str | None,
                           max_length: int | None,
                           log: Callable[[str], None] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """``input_ids`` and a mask (1 on assistant tokens) per conversation. A conversation longer than
    ``max_length`` loses its end; one with no assistant token left within ``max_length`` is dropped (nothing to
    learn from, and an all-masked row breaks the loss). ``log`` gets the counts."""
    ids_out: list[list[int]] = []
    mask_out: list[list[int]] = []
    truncated = dropped = 0
    for row, value in enumerate(conversations, start=1):
        messages = check_conversation(value, f"conversation {row}")
        text, spans = assistant_spans(tokenizer, with_system(messages, system))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(start < e and end > s for s, e in spans)) for start, end in enc["offset_mapping"]]
        if max_length is not None and len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):
                dropped += 1
                continue
            truncated += 1
        ids_out.append(ids)
        mask_out.append(mask)
    if (truncated or dropped) and log is not None:
        log(f"{truncated + dropped} of {len(conversations)} conversations are longer than training.max_length="
            f"{max_length} tokens: {truncated} truncated (their end is not trained), {dropped} dropped (no assistant "
            "token within max_length); raise training.max_length to keep them whole")
    if not ids_out:
        raise DataError(f"every conversation is longer than training.max_length={max_length} before its first "
                        "assistant token, so nothing is left to train on: raise training.max_length")
    return ids_out, mask_out
