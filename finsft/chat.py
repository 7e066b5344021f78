"""Chat data: rows whose ``messages`` column holds a conversation (OpenAI style: a list of {"role", "content"}
with roles system/user/assistant), formatted with the tokenizer's chat template, trained on assistant turns only.

TRL's ``assistant_only_loss`` needs a chat template with ``{% generation %}`` markers, which most shipped templates
(SmolLM2's, Llama's, Mistral's) lack. finsft computes the mask itself by rendering prefixes: assistant turn ``i``
is the text the template adds between ``messages[:i]`` rendered with the generation prompt and ``messages[:i+1]``
(its content and end-of-turn token; the whitespace that separates turns is not trained). The whole conversation is
tokenized once and a token is trained when its characters overlap an assistant turn, so the ids are exactly those
of the rendered conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finsft.errors import DataError

ROLES = ("system", "user", "assistant")


def check_conversation(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation as a list of {role, content}; DataError naming ``where`` (file and row) otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, "
                        f"got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) \
                or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content', got {msg!r}")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role '{msg['role']}'; allowed: {', '.join(ROLES)}")
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn from")
    return out


def check_conversations(values: Sequence[Any], source: str) -> None:
    for row, value in enumerate(values, start=1):
        check_conversation(value, f"{source}, row {row}")


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
                           max_length: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """``input_ids`` and a mask (1 on assistant tokens) per conversation; over-long ones lose their end."""
    ids_out: list[list[int]] = []
    mask_out: list[list[int]] = []
    for row, value in enumerate(conversations, start=1):
        messages = check_conversation(value, f"conversation {row}")
        text, spans = assistant_spans(tokenizer, with_system(messages, system))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(start < e and end > s for s, e in spans)) for start, end in enc["offset_mapping"]]
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        ids_out.append(ids)
        mask_out.append(mask)
    return ids_out, mask_out
