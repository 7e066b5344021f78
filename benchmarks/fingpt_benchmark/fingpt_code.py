"""FinGPT's own benchmark and training-tokenization code, vendored to check finsft against it (MIT licence: LICENSE
beside this file, Copyright (c) 2024 AI4Finance Foundation Inc.).

Source: AI4Finance-Foundation/FinGPT at commit ec315843, fingpt/FinGPT_Benchmark/benchmarks/fpb.py (format_example,
change_target and the body of test_fpb; tfns.py, fiqa.py and nwgi.py hold the same lines), benchmarks/benchmarks.py
(the tokenizer set-up of main) and utils.py (template_dict, get_prompt, tokenize). Changes, and nothing else:
- ``test_rows`` is test_fpb's loop with the data passed in (a pandas DataFrame with instruction/input/output, already
  prepared as each benchmark prepares its set) instead of read from FinGPT's data folder, ``.cuda()`` replaced by
  ``.to(model.device)`` (the CPU here), and an empty last batch skipped (FinGPT's ``len // batch_size + 1`` steps
  give one when the length is a multiple of the batch size; tokenizing [] would fail);
- ``setup_tokenizer`` is main()'s tokenizer set-up without loading anything;
- ``tokenize`` takes ``max_length`` and ``instruct_template`` instead of FinGPT's ``args``.
finsft's code is never imported here: tests and benchmarks/fingpt_reference.py compare the two.
"""

from __future__ import annotations

from typing import Any

# utils.py
template_dict = {
    'default': 'Instruction: {instruction}\nInput: {input}\nAnswer: '
}


def get_prompt(template, instruction, input_text):  # type: ignore[no-untyped-def]
    if not instruction:
        return input_text

    if template not in template_dict:
        raise KeyError(f"Template '{template}' not found. Available templates: {', '.join(template_dict.keys())}")

    return template_dict[template].format(instruction=instruction, input=input_text)


def tokenize(tokenizer, feature, max_length=512, instruct_template='default'):  # type: ignore[no-untyped-def]
    prompt = get_prompt(
        instruct_template,
        feature['instruction'],
        feature['input']
    )
    prompt_ids = tokenizer(
        prompt,
        padding=False,
        max_length=max_length,
        truncation=True
    )['input_ids']
    target_ids = tokenizer(
        feature['output'].strip(),
        padding=False,
        max_length=max_length,
        truncation=True,
        add_special_tokens=False
    )['input_ids']
    input_ids = prompt_ids + target_ids
    exceed_max_length = len(input_ids) >= max_length
    if input_ids[-1] != tokenizer.eos_token_id and not exceed_max_length:
        input_ids.append(tokenizer.eos_token_id)
    label_ids = [tokenizer.pad_token_id] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return {
        "input_ids": input_ids,
        "labels": label_ids,
        "exceed_max_length": exceed_max_length
    }


# benchmarks/fpb.py (the same in tfns.py, fiqa.py, nwgi.py)
def format_example(example: dict) -> dict:  # type: ignore[type-arg]
    context = f"Instruction: {example['instruction']}\n"
    if example.get("input"):
        context += f"Input: {example['input']}\n"
    context += "Answer: "
    target = example["output"]
    return {"context": context, "target": target}


def change_target(x):  # type: ignore[no-untyped-def]
    if 'positive' in x or 'Positive' in x:
        return 'positive'
    elif 'negative' in x or 'Negative' in x:
        return 'negative'
    else:
        return 'neutral'


# benchmarks/benchmarks.py, main(): the tokenizer set-up (the model is resized when a [PAD] token is added)
def setup_tokenizer(model, tokenizer):  # type: ignore[no-untyped-def]
    tokenizer.padding_side = "left"
    if not tokenizer.pad_token or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({'pad_token': '[PAD]'})
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


# benchmarks/fpb.py, test_fpb() after the data is read
def test_rows(model, tokenizer, instructions, batch_size) -> Any:  # type: ignore[no-untyped-def]
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    instructions[["context", "target"]] = instructions.apply(format_example, axis=1, result_type="expand")
    context = instructions['context'].tolist()

    total_steps = instructions.shape[0] // batch_size + 1
    out_text_list = []
    for i in range(total_steps):
        tmp_context = context[i * batch_size:(i + 1) * batch_size]
        if not tmp_context:  # (finsft) FinGPT's last step is empty when the length divides by the batch size
            continue
        tokens = tokenizer(tmp_context, return_tensors='pt', padding=True, max_length=512, return_token_type_ids=False)
        for k in tokens.keys():  # noqa: SIM118  (FinGPT's line, verbatim)
            tokens[k] = tokens[k].to(model.device)
        res = model.generate(**tokens, max_length=512, eos_token_id=tokenizer.eos_token_id)
        res_sentences = [tokenizer.decode(i, skip_special_tokens=True) for i in res]
        out_text = [o.split("Answer: ")[1] for o in res_sentences]
        out_text_list += out_text
        torch.cuda.empty_cache()

    instructions["out_text"] = out_text_list
    instructions["new_target"] = instructions["target"].apply(change_target)
    instructions["new_out"] = instructions["out_text"].apply(change_target)

    acc = accuracy_score(instructions["new_target"], instructions["new_out"])
    f1_macro = f1_score(instructions["new_target"], instructions["new_out"], average="macro")
    f1_micro = f1_score(instructions["new_target"], instructions["new_out"], average="micro")
    f1_weighted = f1_score(instructions["new_target"], instructions["new_out"], average="weighted")
    return instructions, {"accuracy": acc, "macro_f1": f1_macro, "micro_f1": f1_micro, "weighted_f1": f1_weighted}
