"""Score a model on template rows.

Classification templates: ``likelihood`` ranks the label strings by the model's log-likelihood after the prompt;
``generate`` decodes greedily and maps the text to a label as FinGPT's benchmarks do; ``fingpt`` (the FinGPT
sentiment suite's default) is FinGPT's benchmark procedure itself, row for row. Generation templates are
scored on greedy generations (ROUGE-L, token F1, length against the reference) and on the perplexity of the
reference answers (the loss on the answer tokens only, tokenized and truncated as for training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from finsft.data import Formatter, encode_completions, encode_prompt, tokenize_rows
from finsft.errors import FinsftError
from finsft.evaluation.metrics import (
    classification_metrics,
    gold_label,
    map_answer,
    qa_metrics,
    uses_fingpt_mapping,
)
from finsft.recipe import Recipe
from finsft.templates import Template, to_three_class

Progress = Callable[[int, int], None]
# The FinGPT sentiment suite's generation scorer: FinGPT's benchmark procedure, row for row (generate_fingpt).
FINGPT_SCORER = "fingpt"


@dataclass
class EvalResult:
    scorer: str
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def label_texts(formatter: Formatter) -> list[str]:
    """The text that follows the prompt for each label (without the end-of-sequence token)."""
    t = formatter.template
    assert t.labels is not None
    if formatter.chat:
        return [lab for lab in t.labels]
    return [t.render_label(lab) for lab in t.labels]


def _by_length(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Indices of ``seqs`` from longest to shortest: batches of similar length waste little on padding."""
    return sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))


def score_likelihood(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], batch_size: int,
                     progress: Progress | None = None, path: str = "auto") -> list[dict[str, float]]:
    """Log-likelihood of each label's tokens after each row's prompt.

    When every label is one distinct token (``path="next_token"``), one forward pass per batch of prompts reads
    the next-token distribution at each prompt's end. Otherwise (``path="sequence"``) each (prompt, label) pair
    is scored in full. Both give the same numbers when both apply; ``path`` forces one (tests compare them).
    """
    import torch

    tok = formatter.tokenizer
    labels = formatter.template.labels
    assert labels is not None
    label_ids = encode_completions(formatter, label_texts(formatter))
    if any(not ids for ids in label_ids):
        raise FinsftError(f"a label of template '{formatter.template.name}' encodes to no tokens")
    single = all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(label_ids)
    if path == "auto":
        path = "next_token" if single else "sequence"
    elif path == "next_token" and not single:
        raise FinsftError("the next-token path needs labels that are distinct single tokens")
    prompts = encode_prompt(tok, [formatter.prompt(r) for r in rows], formatter.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = _device(model)
    out: list[dict[str, float] | None] = [None] * len(prompts)
    order = _by_length(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            first = torch.tensor([ids[0] for ids in label_ids], device=device)
            # The sequence path scores every (prompt, label) pair: about batch_size pairs per forward pass.
            step = batch_size if path == "next_token" else max(1, batch_size // len(label_ids))
            for start in range(0, len(order), step):
                idx = order[start:start + step]
                chunk = [prompts[i] for i in idx]
                if path == "next_token":
                    ids, mask, last = _right_pad(chunk, pad, device)
                    # Only the logits at each prompt's last position are needed: skip the head elsewhere.
                    keep, where = torch.unique(last, return_inverse=True)
                    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                    logp = torch.log_softmax(logits[torch.arange(len(chunk), device=device), where].float(), -1)
                    scores = logp[:, first].tolist()
                else:
                    scores = _sequence_scores(model, chunk, label_ids, pad, device)
                for i, row in zip(idx, scores, strict=True):
                    out[i] = dict(zip(labels, row, strict=True))
                if progress:
                    progress(min(start + step, len(order)), len(order))
    finally:
        model.train(was_training)
    return [s for s in out if s is not None]


def _sequence_scores(model: Any, prompts: list[list[int]], label_ids: list[list[int]], pad: int,
                     device: Any) -> list[list[float]]:
    """For each prompt, the summed log-probabilities of each label's tokens after it (one forward pass)."""
    import torch

    seqs = [p + c for p in prompts for c in label_ids]
    ids, mask, _ = _right_pad(seqs, pad, device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = []
    for n, p in enumerate(prompts):
        row = []
        for k, c in enumerate(label_ids):
            positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=device)
            row.append(float(logp[n * len(label_ids) + k, positions, torch.tensor(c, device=device)].sum()))
        out.append(row)
    return out


def _right_pad(seqs: Sequence[Sequence[int]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids.to(device), mask.to(device), last.to(device)


def _left_pad(seqs: Sequence[Sequence[int]], pad: int, device: Any) -> tuple[Any, Any, int]:
    """Left-padded ids and attention mask of ``seqs`` on ``device``, and the padded width (generation batches)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, width - len(s):] = torch.tensor(s)
        mask[j, width - len(s):] = 1
    return ids.to(device), mask.to(device), width


def generate(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], batch_size: int,
             max_new_tokens: int, progress: Progress | None = None) -> list[str]:
    """Greedy completions of each row's prompt (left-padded batches of similar length), special tokens removed."""
    import torch

    tok = formatter.tokenizer
    prompts = encode_prompt(tok, [formatter.prompt(r) for r in rows], formatter.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = _device(model)
    texts: list[str] = [""] * len(prompts)
    order = _by_length(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask, width = _left_pad([prompts[i] for i in idx], pad, device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=_stop_ids(tok))
                for i, row in zip(idx, out[:, width:], strict=True):
                    texts[i] = tok.decode(row, skip_special_tokens=True).strip()
                if progress:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return texts


# FinGPT's benchmark procedure (fingpt/FinGPT_Benchmark/benchmarks/{fpb,fiqa,tfns,nwgi}.py at ec315843): batches in
# file order, left padding, ``generate(max_length=512, eos_token_id=tokenizer.eos_token_id)``, the whole sequence
# decoded without special tokens, the answer is what follows the first "Answer: " (``o.split("Answer: ")[1]``).
FINGPT_MAX_LENGTH = 512
FINGPT_ANSWER_SPLIT = "Answer: "
FINGPT_PROCEDURE = ("FinGPT's benchmark code (fingpt/FinGPT_Benchmark/benchmarks/*.py at ec315843): greedy generation "
                    "to 512 tokens, the text after 'Answer: ', change_target")


def fingpt_answer(decoded: str) -> str:
    """FinGPT's ``o.split("Answer: ")[1]`` of a decoded prompt + generation; "" where the text has no "Answer: "
    (FinGPT's code would stop with an IndexError; "" maps to neutral)."""
    parts = decoded.split(FINGPT_ANSWER_SPLIT)
    return parts[1] if len(parts) > 1 else ""


def generate_fingpt(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], batch_size: int,
                    progress: Progress | None = None) -> list[str]:
    """Each row's answer exactly as FinGPT's benchmark code reads it: the prompt tokenized as a whole (special
    tokens as the tokenizer adds them), batches of ``batch_size`` in the rows' order, left-padded, greedy
    generation up to FINGPT_MAX_LENGTH tokens in all or the tokenizer's end-of-sequence token, then
    :func:`fingpt_answer` of the decoded sequence."""
    import torch

    tok = formatter.tokenizer
    prompts = encode_prompt(tok, [formatter.prompt(r) for r in rows], formatter.chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = _device(model)
    texts: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                ids, mask, width = _left_pad(prompts[start:start + batch_size], pad, device)
                if width >= FINGPT_MAX_LENGTH:
                    raise FinsftError(f"a prompt of {width} tokens leaves no room for an answer within FinGPT's "
                                      f"max_length of {FINGPT_MAX_LENGTH} tokens")
                out = model.generate(input_ids=ids, attention_mask=mask, max_length=FINGPT_MAX_LENGTH, do_sample=False, pad_token_id=pad,
                                     eos_token_id=tok.eos_token_id)
                texts += [fingpt_answer(tok.decode(seq, skip_special_tokens=True)) for seq in out]
                if progress:
                    progress(min(start + batch_size, len(prompts)), len(prompts))
    finally:
        model.train(was_training)
    return texts


def answer_loss(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], batch_size: int,
                max_length: int | None, progress: Progress | None = None) -> dict[str, Any]:
    """The model's loss on the reference answers: each row is tokenized exactly as for training (prompt, then
    completion with its end token, over-long rows cut as ``max_length`` says) and only the completion tokens count.
    ``answer_loss`` is the mean negative log-likelihood per answer token over all rows together (token-weighted,
    not a mean of per-row means), ``answer_perplexity`` its exp."""
    import datasets
    import torch

    if not rows:
        raise FinsftError("no rows to evaluate")
    fields = [f for f in formatter.template.fields if f in rows[0]]
    table = datasets.Dataset.from_list([{f: r[f] for f in fields} for r in rows])
    encoded = tokenize_rows(table, formatter, max_length)
    ids_list, masks = encoded["input_ids"], encoded["completion_mask"]
    tok = formatter.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = _device(model)
    order = _by_length(ids_list)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, attention, _ = _right_pad([ids_list[i] for i in idx], pad, device)
                target = torch.zeros_like(ids, dtype=torch.bool)
                for j, i in enumerate(idx):
                    target[j, : len(masks[i])] = torch.tensor(masks[i], dtype=torch.bool)
                # position t predicts token t + 1: score the predictions of completion tokens only
                where = target[:, 1:]
                logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1][where].float()
                total += float(torch.nn.functional.cross_entropy(logits, ids[:, 1:][where], reduction="sum"))
                count += int(where.sum())
                if progress:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    if count == 0:
        raise FinsftError("no answer tokens to score: every completion is empty or cut off by max_length")
    mean = total / count
    return {"answer_loss": mean, "answer_perplexity": math.exp(mean), "answer_tokens": count}


def _stop_ids(tok: Any) -> list[int]:
    ids = {tok.eos_token_id}
    for name in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(name) if name in tok.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def resolve_scorer(scorer: str, template: Template) -> str:
    if scorer == FINGPT_SCORER:
        if not template.is_classification:
            raise FinsftError(f"the {FINGPT_SCORER} scorer maps answers to sentiment labels; template "
                              f"'{template.name}' has none")
        return scorer
    if template.language_modeling:
        raise FinsftError(f"template '{template.name}' trains on plain text: it has no prompt and answer to score; "
                          "the validation loss (training.eval_steps) measures it")
    if scorer == "auto":
        return "likelihood" if template.is_classification else "generate"
    if scorer == "likelihood" and not template.is_classification:
        raise FinsftError(f"the likelihood scorer ranks labels; template '{template.name}' has none")
    return scorer


def evaluate_model(model: Any, formatter: Formatter, rows: Sequence[dict[str, Any]], *, scorer: str,
                   batch_size: int, max_new_tokens: int | None, progress: Progress | None = None,
                   max_length: int | None = None, generate_samples: int | None = None) -> EvalResult:
    """Score ``model`` on template rows (dicts of template fields). Generation templates: the answer perplexity
    on every row (tokenized and cut at ``max_length`` as in training), greedy answers for the first
    ``generate_samples`` rows (all when None)."""
    template = formatter.template
    scorer = resolve_scorer(scorer, template)
    if not rows:
        raise FinsftError("no rows to evaluate")
    if template.is_classification:
        assert template.labels is not None
        gold = [gold_label(r[template.label_field], template) for r in rows]
        label_space = ["negative", "neutral", "positive"] if uses_fingpt_mapping(template) else list(template.labels)
        if scorer == "likelihood":
            scores = score_likelihood(model, formatter, rows, batch_size, progress)
            raw = [max(s, key=s.__getitem__) for s in scores]
            pred = [gold_label(p, template) for p in raw]
            preds = [{"input": r.get("input"), "gold": g, "pred": p, "answer": a, "scores": s}
                     for r, g, p, a, s in zip(rows, gold, pred, raw, scores, strict=True)]
        elif scorer == FINGPT_SCORER:
            texts = generate_fingpt(model, formatter, rows, batch_size, progress)
            pred = [to_three_class(t) for t in texts]
            preds = [{"input": r.get("input"), "gold": g, "pred": p, "answer": t}
                     for r, g, p, t in zip(rows, gold, pred, texts, strict=True)]
        else:
            texts = generate(model, formatter, rows, batch_size, max_new_tokens or 8, progress)
            pred = [map_answer(t, template) for t in texts]
            preds = [{"input": r.get("input"), "gold": g, "pred": p, "answer": t}
                     for r, g, p, t in zip(rows, gold, pred, texts, strict=True)]
        return EvalResult(scorer, classification_metrics(gold, pred, label_space), preds)
    loss = answer_loss(model, formatter, rows, batch_size, max_length)
    gen_rows = list(rows[:generate_samples] if generate_samples else rows)
    refs = [template.reference(r) for r in gen_rows]  # a conversation's reference is its last assistant turn
    texts = generate(model, formatter, gen_rows, batch_size, max_new_tokens or 256, progress)
    preds = [{"input": r.get("input"), "reference": ref, "answer": t}
             for r, ref, t in zip(gen_rows, refs, texts, strict=True)]
    return EvalResult(scorer, {**loss, **qa_metrics(texts, refs)}, preds)


def default_max_new_tokens(template: Template, recipe: Recipe) -> int:
    configured = recipe.evaluation_settings["max_new_tokens"]
    return int(configured or (8 if template.is_classification else 256))


def prompt_template(template: Template) -> Template:
    """The template without its completion: what predict needs from a row."""
    return replace(template, completion="")


