"""Helpers for tests and benchmarks: a tiny random Llama model with a real BPE tokenizer, built locally in
seconds (no hub)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Instruction: What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
    "Input: Answer: Sentiment: negative neutral positive mildly moderately strong",
    "Utilize your financial knowledge, give your answer or opinion to the input question or subject . "
    "Answer format is not limited.",
    "The company reported higher revenue and raised its guidance; shares rose 5% after earnings.",
    "Profit fell and the bank cut its dividend; analysts downgraded the stock.",
    "How do I deposit a cheque? You can use the bank's app or visit a branch with your ID.",
]


def build_tiny_model(folder: str | Path, *, texts: Iterable[str] = (), hidden: int = 64, layers: int = 2,
                     vocab_size: int = 600, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM and a byte-level BPE tokenizer (with BOS/EOS/PAD and a ChatML chat
    template) trained on finance-like text. Returns the folder, loadable with from_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*_CORPUS, *texts], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=bos, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(folder)
    return folder


def write_jsonl(path: str | Path, rows: Iterable[dict[str, object]]) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
