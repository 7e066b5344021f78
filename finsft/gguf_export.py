"""Export a model folder (safetensors, as ``finsft merge`` writes it) to a GGUF file that llama.cpp, Ollama and LM
Studio load, with an Ollama ``Modelfile`` beside it.

No compiler and no copy of llama.cpp: the ``gguf`` package's writer, tensor-name map and numpy quantizers do the
work. The export streams: tensors are read lazily from the safetensors shards (``safe_open``), converted and
quantized a block of rows at a time and written straight into the file, so the memory needed is about one
tensor, never the model (measured: benchmarks/gguf_export.py).

What llama.cpp expects, and what is done for it:

- tensor names: ``gguf.get_tensor_name_map`` of the architecture (``model.layers.0.self_attn.q_proj.weight`` ->
  ``blk.0.attn_q.weight``);
- the llama architecture (Llama, SmolLM2, Mistral) rotates query/key pairs in interleaved order: the q and k
  projection rows are permuted per head (transformers reverses it when it loads a GGUF);
- Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp multiplies by the weight: norms are written plus one;
- 1-D tensors (norms) stay float32; a quantized type applies to 2-D weights whose rows are whole blocks; for the
  4- and 5-bit types the token embedding and output matrix are written in q8_0 (as llama.cpp's quantizer and the
  embedded SmolLM2 Q4_1 file do: they are the most sensitive weights);
- the tokenizer: copied key by key from the GGUF the base model came from when its vocabulary is the run's
  (exactly what llama.cpp had), else built from the Hugging Face tokenizer: byte-level BPE with merges
  (``tokenizer.ggml.model = gpt2``) or a SentencePiece-style vocabulary with scores (``llama``), token types
  (control for special tokens), BOS/EOS/UNK/PAD ids, whether BOS is added, and the chat template.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finsft.errors import FinsftError
from finsft.files import read_text, streamed_file, write_file

# The types offered, and the llama.cpp file type each one declares.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
DEFAULT_TYPE = "q8_0"
# Hugging Face architectures exported, and the llama.cpp architecture each becomes (llama.cpp runs Mistral as llama).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "GemmaForCausalLM": "gemma",
}
# Bytes per element of each type on disk (block bytes / block size), for the disk estimate.
_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                     "q4_1": 20 / 32, "q4_0": 18 / 32}
# Rows converted per step: bounds the float32 working copy (4,096 rows of a 4,096-wide matrix: 64 MiB).
_ROW_BYTES_PER_STEP = 64 * 2**20
MODELFILE = "Modelfile"


class ExportError(FinsftError):
    """An export that cannot be done, said before any work where possible."""


def gguf_file_name(qtype: str, stem: str = "model") -> str:
    return f"{stem}.{qtype}.gguf"


def parse_types(value: str) -> list[str]:
    """``--gguf q8_0,q4_1`` -> ["q8_0", "q4_1"]; unknown types are an error naming the allowed ones."""
    types = [t.strip().lower() for t in value.split(",") if t.strip()]
    bad = [t for t in types if t not in GGUF_TYPES]
    if not types or bad:
        raise ExportError(f"--gguf {value!r}: {'unknown type ' + ', '.join(bad) if bad else 'no type given'}; "
                          f"allowed: {', '.join(GGUF_TYPES)} (comma-separated for several)")
    return list(dict.fromkeys(types))


def check_architecture(config: Mapping[str, Any], where: str) -> str:
    """The llama.cpp architecture for a Hugging Face config, or an error naming the supported ones."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        model_type = config.get("model_type")
        raise ExportError(f"{where}: architecture {arch or model_type or 'unknown'} cannot be exported to GGUF by "
                          f"finsft; supported: {', '.join(SUPPORTED_ARCHITECTURES)} (Llama family incl. SmolLM2 and "
                          "Mistral, and Gemma)")
    scaling: Mapping[str, Any] = config.get("rope_scaling") or {}
    params: Mapping[str, Any] = config.get("rope_parameters") or {}
    if not isinstance(scaling, Mapping) or not isinstance(params, Mapping):
        raise ExportError(f"{where}: rope_scaling / rope_parameters must be objects")
    rope_type = (scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default")
    if rope_type not in ("default", "linear"):
        raise ExportError(f"{where}: rope scaling '{rope_type}' is not exported by finsft (llama.cpp needs extra "
                          "tensors for it); models with default or linear rope export")
    return SUPPORTED_ARCHITECTURES[arch]


def _rope_theta(config: Mapping[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _tied(config: Mapping[str, Any]) -> bool:
    tied = config.get("tie_word_embeddings")
    return bool(config.get("model_type") == "gemma" if tied is None else tied)


def weight_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensors of a supported model and their shapes, from its config alone."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd, vocab = _head_dim(config), config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not _tied(config):
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                       p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
    return shapes


def tensor_type(hf_name: str, shape: Sequence[int], qtype: str) -> tuple[str, str]:
    """The GGUF type of one tensor for the file type ``qtype``, with the reason when it differs."""
    if len(shape) < 2:
        return "f32", "1-D tensors (norms) stay float32, as llama.cpp writes them"
    if qtype in ("f32", "f16", "bf16"):
        return qtype, ""
    embedding = hf_name in ("model.embed_tokens.weight", "lm_head.weight")
    chosen = "q8_0" if qtype.startswith(("q4", "q5")) and embedding else qtype
    if shape[-1] % 32:
        return "f16", f"rows of {shape[-1]} values are not whole blocks of 32: f16"
    if chosen != qtype:
        return chosen, "the token embedding and output matrix stay q8_0 in 4/5-bit files (llama.cpp's rule)"
    return chosen, ""


def estimate_bytes(config: Mapping[str, Any], qtype: str) -> int:
    """The size of the GGUF file for ``qtype``: the weights as written plus ~1% for the header and vocabulary."""
    total = 0.0
    for name, shape in weight_shapes(config).items():
        t, _ = tensor_type(name, shape, qtype)
        total += math.prod(shape) * _BYTES_PER_WEIGHT[t]
    return int(total * 1.01) + 2**20


def check_disk(folder: Path, needed: int, what: str) -> None:
    """Enough free space where ``folder`` will be (its nearest existing parent), or an error with both numbers."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ExportError(f"not enough disk space for {what} in {folder}: needs about {needed / 2**30:.2f} GiB, "
                          f"{free / 2**30:.2f} GiB free on that disk; free space or choose another --out")


# ------------------------------------------------------------------------------------------------ tokenizer


@dataclass
class TokenizerMeta:
    """The ``tokenizer.*`` key/values of a GGUF file, with where they came from."""

    values: list[tuple[str, Any, Any, Any]] = field(default_factory=list)  # key, value, type, sub type
    source: str = ""

    def add(self, key: str, value: Any, vtype: Any, sub: Any = None) -> None:
        self.values.append((key, value, vtype, sub))


def tokenizer_from_gguf(gguf_path: str | Path, tokenizer: Any, n_vocab: int) -> TokenizerMeta | None:
    """The tokenizer keys of the GGUF file the base model came from, when its vocabulary is ``tokenizer``'s
    (token for token) and the model's size; None otherwise (the Hugging Face tokenizer is then exported)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    gguf_tokens = tokens.contents()
    if len(gguf_tokens) != n_vocab or gguf_tokens != tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        return None
    meta = TokenizerMeta(source=f"copied from {Path(gguf_path).name} (the GGUF the base model came from: the same "
                                f"{len(gguf_tokens):,} tokens)")
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if f.types[0] == GGUFValueType.ARRAY:
            meta.add(key, f.contents(), GGUFValueType.ARRAY, f.types[-1])
        else:
            meta.add(key, f.contents(), f.types[0])
    return meta


_LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _pre_tokenizer_name(spec: Mapping[str, Any] | None) -> tuple[str, str]:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (``tokenizer.ggml.pre``), with the reason."""
    if not spec:
        return "default", "the tokenizer has no pre-tokenizer"
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", "ByteLevel with GPT-2's split"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm", "single digits, then ByteLevel (SmolLM's pre-tokenizer)"
    if kinds[:1] == ["Split"] and str(parts[0].get("pattern", {}).get("Regex", "")).startswith(_LLAMA3_SPLIT_START):
        return "llama-bpe", "Llama 3's split regex"
    return "default", f"pre-tokenizer {kinds} is not one finsft maps to llama.cpp's names: llama.cpp's default split"


def tokenizer_from_hf(tokenizer: Any, folder: Path, n_vocab: int) -> TokenizerMeta:
    """The GGUF tokenizer keys built from a Hugging Face fast tokenizer saved in ``folder``."""
    from gguf import GGUFValueType, TokenType

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json: the GGUF needs the tokenizer (save it with "
                          "tokenizer.save_pretrained)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or \
        "ByteLevel" in json.dumps(spec.get("decoder"))
    meta = TokenizerMeta()
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    if model.get("type") == "BPE" and byte_level and not model.get("byte_fallback"):
        pre, why = _pre_tokenizer_name(spec.get("pre_tokenizer"))
        meta.source = f"the Hugging Face tokenizer: byte-level BPE with merges (pre-tokenizer '{pre}': {why})"
        vocab = tokenizer.get_vocab()
        by_id = {i: t for t, i in vocab.items()}
        tokens, types = [], []
        for i in range(n_vocab):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(int(TokenType.UNUSED))
            else:
                tokens.append(by_id[i])
                a = added.get(i)
                types.append(int(TokenType.NORMAL if a is None else
                                 TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        meta.add("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING)
        meta.add("tokenizer.ggml.pre", pre, GGUFValueType.STRING)
        meta.add("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
        meta.add("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32)
        meta.add("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        from gguf.vocab import LlamaHfVocab

        meta.source = "the Hugging Face tokenizer: SentencePiece-style vocabulary with scores (LlamaHfVocab)"
        hf = LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, kind in hf.all_tokens():
            tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
            scores.append(float(score))
            types.append(int(kind))
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(int(TokenType.UNUSED))
        meta.add("tokenizer.ggml.model", "llama", GGUFValueType.STRING)
        meta.add("tokenizer.ggml.pre", "default", GGUFValueType.STRING)
        meta.add("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
        meta.add("tokenizer.ggml.scores", scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        meta.add("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    else:
        raise ExportError(f"{path}: tokenizer model {model.get('type')!r} is not exported to GGUF by finsft; "
                          "supported: byte-level BPE (Llama 3, SmolLM2) and SentencePiece-style BPE with byte "
                          "fallback (Llama 2, Mistral, Gemma)")
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            meta.add(f"tokenizer.ggml.{key}_token_id", int(token_id), GGUFValueType.UINT32)
    ids = tokenizer("a")["input_ids"]
    meta.add("tokenizer.ggml.add_bos_token", bool(ids and ids[0] == tokenizer.bos_token_id
                                                   and tokenizer.bos_token_id is not None), GGUFValueType.BOOL)
    meta.add("tokenizer.ggml.add_eos_token", bool(len(ids) > 1 and ids[-1] == tokenizer.eos_token_id),
             GGUFValueType.BOOL)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        meta.add("tokenizer.chat_template", tokenizer.chat_template, GGUFValueType.STRING)
    return meta


# ------------------------------------------------------------------------------------------------ weights


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportError(f"{folder} holds no safetensors weights (model.safetensors or an index of shards): export "
                      "a merged model folder written by finsft merge or save_pretrained")


@dataclass
class _Planned:
    hf_name: str
    gguf_name: str
    shard: Path
    shape: tuple[int, ...]
    qtype: str
    reason: str
    transform: str  # "", "q", "k" (llama permutation), "norm+1" (Gemma)


def _plan_tensors(folder: Path, config: Mapping[str, Any], arch: str, qtype: str) -> list[_Planned]:
    import gguf
    from safetensors import safe_open

    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma": gguf.MODEL_ARCH.GEMMA}[arch]
    names = gguf.get_tensor_name_map(model_arch, config["num_hidden_layers"])
    tied = _tied(config)
    planned: list[_Planned] = []
    for shard in _shards(folder):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue
                gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"{shard.name}: tensor {name} has no GGUF name for the {arch} architecture")
                shape = tuple(f.get_slice(name).get_shape())
                t, reason = tensor_type(name, shape, qtype)
                transform = ""
                if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
                    transform = "q"
                elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
                    transform = "k"
                elif arch == "gemma" and name.endswith("norm.weight"):
                    transform = "norm+1"
                planned.append(_Planned(name, gguf_name, shard, shape, t, reason, transform))
    order = {n: i for i, n in enumerate(weight_shapes(config))}
    planned.sort(key=lambda p: order.get(p.hf_name, len(order)))
    return planned


def _nbytes(shape: Sequence[int], qtype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]]
    return math.prod(shape) // block * size


def _chunks(p: _Planned, f: Any, config: Mapping[str, Any]) -> Iterator[Any]:
    """The tensor as float32 numpy blocks of whole rows, transformed for llama.cpp."""
    import torch

    part = f.get_slice(p.hf_name)
    rows = p.shape[0]
    cols = math.prod(p.shape[1:]) if len(p.shape) > 1 else 1
    step = max(1, _ROW_BYTES_PER_STEP // (4 * cols))
    if p.transform in ("q", "k"):
        hd = _head_dim(config)
        step = max(hd, step - step % hd)  # whole heads: the permutation stays inside a head
    for start in range(0, rows, step):
        t = part[start:min(rows, start + step)].to(torch.float32)
        if p.transform in ("q", "k"):
            hd = _head_dim(config)
            n = t.shape[0] // hd
            t = t.reshape(n, 2, hd // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        elif p.transform == "norm+1":
            t = t + 1
        yield t.numpy()


@dataclass
class ExportReport:
    path: Path
    qtype: str
    bytes: int
    tensors: int
    tokenizer: str
    types: dict[str, int]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "type": self.qtype, "bytes": self.bytes, "tensors": self.tensors,
                "tensor_types": self.types, "tokenizer": self.tokenizer, "notes": self.notes}


def export_gguf(folder: str | Path, out_file: str | Path, qtype: str, *, tokenizer: Any | None,
                source_gguf: str | Path | None = None, name: str | None = None,
                log: Callable[[str], None] = print) -> ExportReport:
    """Write ``folder`` (a model saved with save_pretrained) as a GGUF file of type ``qtype`` to ``out_file``.

    ``tokenizer`` is the Hugging Face tokenizer saved in ``folder`` (None writes the weights only: llama.cpp cannot
    run such a file; it is for measuring the export of random-weight models that have no tokenizer).
    ``source_gguf``: the GGUF the base model came from, whose tokenizer keys are copied when its vocabulary is
    the same. The file is written under a temporary name in the same folder and renamed into place.
    """
    import gguf
    import numpy as np
    from safetensors import safe_open

    folder, out_file = Path(folder), Path(out_file)
    if qtype not in GGUF_TYPES:
        raise ExportError(f"GGUF type {qtype!r} is not offered; allowed: {', '.join(GGUF_TYPES)}")
    if out_file.exists() or out_file.is_symlink():
        raise ExportError(f"{out_file} exists; finsft does not replace it: choose another file name or folder")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = check_architecture(config, str(folder / "config.json"))
    planned = _plan_tensors(folder, config, arch, qtype)
    notes = sorted({f"{p.qtype}: {p.reason}" for p in planned if p.reason})
    meta: TokenizerMeta | None = None
    if tokenizer is not None:
        if source_gguf is not None:
            meta = tokenizer_from_gguf(source_gguf, tokenizer, config["vocab_size"])
            if meta is None:
                notes.append(f"tokenizer: the vocabulary differs from {Path(source_gguf).name}'s: built from the "
                             "Hugging Face tokenizer instead")
        if meta is None:
            meta = tokenizer_from_hf(tokenizer, folder, config["vocab_size"])
    kept = f"nothing was written to {out_file}"
    then = "free disk space (the merge preflight says how much) and run the export again"
    with streamed_file(out_file, kept=kept, then=then) as writer_tmp:
        writer = gguf.GGUFWriter(str(writer_tmp), arch)
        try:
            _add_model_keys(writer, config, arch, qtype, name or folder.name)
            if meta is not None:
                for key, value, vtype, sub in meta.values:
                    writer.add_key_value(key, value, vtype, sub_type=sub)
            for p in planned:
                writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype),
                                       raw_dtype=gguf.GGMLQuantizationType[p.qtype.upper()])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            assert writer.fout is not None
            fout = writer.fout[0]
            open_shard: tuple[Path, Any] | None = None
            for i, p in enumerate(planned):
                if open_shard is None or open_shard[0] != p.shard:
                    if open_shard is not None:
                        open_shard[1].__exit__(None, None, None)
                    handle = safe_open(str(p.shard), framework="pt")
                    open_shard = (p.shard, handle.__enter__())
                writer.write_padding(fout, fout.tell())
                start = fout.tell()
                qt = gguf.GGMLQuantizationType[p.qtype.upper()]
                for block in _chunks(p, open_shard[1], config):
                    gguf.quants.quantize(block, qt).tofile(fout)
                written = fout.tell() - start
                if written != _nbytes(p.shape, p.qtype):
                    raise ExportError(f"{p.hf_name}: wrote {written} bytes, expected {_nbytes(p.shape, p.qtype)}")
                writer.write_padding(fout, written)
                if (i + 1) % 50 == 0:
                    log(f"  {i + 1}/{len(planned)} tensors written")
            if open_shard is not None:
                open_shard[1].__exit__(None, None, None)
            writer.close()
        except BaseException:
            writer.close()
            raise
    counts: dict[str, int] = {}
    for p in planned:
        counts[p.qtype] = counts.get(p.qtype, 0) + 1
    return ExportReport(out_file, qtype, out_file.stat().st_size, len(planned),
                        meta.source if meta else "none (weights only)", counts, notes)


def _add_model_keys(writer: Any, config: Mapping[str, Any], arch: str, qtype: str, name: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(int(config["vocab_size"]))
    hd = _head_dim(config)
    if arch == "llama":
        writer.add_rope_dimension_count(hd)
    if arch == "gemma" or hd * int(config["num_attention_heads"]) != int(config["hidden_size"]):
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[qtype]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}


# ------------------------------------------------------------------------------------------------ Modelfile


def _go_literal(text: str) -> str:
    """Text as a literal inside an Ollama (Go) template: ``{{`` would open an action."""
    return text.replace("{{", "{{ \"{{\" }}")


def render_modelfile(template: Any, gguf_name: str, eos_token: str | None) -> str:
    """An Ollama Modelfile for a finsft template: TEMPLATE is the template's prompt with the row's text as
    ``{{ .Prompt }}`` (fields with defaults filled in), stop on EOS (and on a newline for one-word labels), and
    temperature 0 for classification."""
    from finsft.templates import format_fields

    lines = ["# Written by finsft: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if template.messages_field or template.conversational:
        lines.append("# Chat model: Ollama uses the chat template stored in the GGUF (tokenizer.chat_template).")
    else:
        fields = format_fields(template.prompt)
        free = [f for f in dict.fromkeys(fields) if f not in template.defaults]
        if len(free) > 1:
            raise ExportError(f"template '{template.name}' fills {len(free)} fields from each row ({', '.join(free)});"
                              " an Ollama prompt is one text: use a template with one field for the row's text")
        values = {k: _go_literal(v) for k, v in template.defaults.items()}
        if free:
            values[free[0]] = "{{ .Prompt }}"
        body = template.prompt.format_map(values) if fields else _go_literal(template.prompt) + "{{ .Prompt }}"
        if '"""' in body:
            raise ExportError(f"template '{template.name}': its prompt holds \"\"\", which a Modelfile cannot quote")
        lines.append(f'TEMPLATE """{body}"""')
    if eos_token:
        lines.append(f"PARAMETER stop {json.dumps(eos_token)}")
    if template.is_classification:
        if all("\n" not in label for label in template.labels or ()):
            lines.append('PARAMETER stop "\\n"')
        lines.append("PARAMETER temperature 0")
        longest = max(len(label) for label in template.labels or ("",))
        lines.append(f"PARAMETER num_predict {max(8, longest)}")
    return "\n".join(lines) + "\n"


def run_section(files: Sequence[str], modelfile: str, name: str, template: Any) -> str:
    """The model card section that says how to run the GGUF files."""
    first = files[0]
    example = "Shares fell 8% after the bank cut its dividend."
    prompt = "" if template.messages_field or template.conversational else \
        template.render_prompt({template.label_field: "", **{f: example for f in template.required_fields}})
    lines = ["", "## Run it on your machine (GGUF)", "",
             "Files: " + ", ".join(f"`{f}`" for f in files) + f"; `{modelfile}` for Ollama.", "",
             "```bash", f"ollama create {name} -f {modelfile}", f"ollama run {name} {json.dumps(example)}", "```",
             "", "With llama.cpp:", "", "```bash",
             f"llama-cli -m {first} -no-cnv -e --temp 0 -n 8 -p {json.dumps(prompt)}" if prompt else
             f"llama-cli -m {first} -cnv", "```", "",
             "(`ollama create` reads the Modelfile's `FROM` relative to the Modelfile.) Score it with finsft: "
             f'set the recipe\'s `model.name_or_path` to the path of `{first}`, then `finsft eval RECIPE`.', ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the command's part


def light_check(recipe: Any) -> None:
    """Before anything is loaded (no torch): the recipe's model is an architecture finsft exports, where that can be
    read from files alone (a GGUF's header, a local folder's config.json). A hub model is checked from its config
    before any weights load."""
    import struct

    from finsft.models import _package_dir, gguf_metadata, gguf_reference
    from finsft.recipe import PACKAGE_PREFIX

    ref, gguf_file = gguf_reference(recipe.model)
    try:
        folder = _package_dir(ref[len(PACKAGE_PREFIX):]) if ref.startswith(PACKAGE_PREFIX) else ref
        if gguf_file:
            path = os.path.join(folder, gguf_file)
            arch = gguf_metadata(path).get("general.architecture") if os.path.isfile(path) else None
            config = None
        elif os.path.isfile(os.path.join(folder, "config.json")):
            config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
        else:
            return
    except (OSError, ValueError, struct.error, FinsftError):
        return  # an unreadable model: loading it reports that, with its own message
    if gguf_file:
        if arch is not None and arch not in set(SUPPORTED_ARCHITECTURES.values()):
            raise ExportError(f"model {gguf_file}: architecture {arch} cannot be exported to GGUF by finsft; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    elif isinstance(config, dict):
        check_architecture(config, os.path.join(folder, "config.json"))


def source_gguf_path(recipe: Any) -> str | None:
    """The GGUF file the recipe's base model comes from, if any (its tokenizer keys are copied when they fit)."""
    from finsft.models import _package_dir, gguf_reference
    from finsft.recipe import PACKAGE_PREFIX

    ref, gguf_file = gguf_reference(recipe.model)
    if not gguf_file:
        return None
    folder = _package_dir(ref[len(PACKAGE_PREFIX):]) if ref.startswith(PACKAGE_PREFIX) else ref
    return os.path.join(folder, gguf_file)


def _write_text(path: Path, text: str) -> None:
    """A new text file through finsft's writing gate (written whole, an existing file never replaced)."""
    if path.exists() or path.is_symlink():
        raise ExportError(f"{path} exists; finsft does not replace it")
    write_file(path, text, kept="the files written before it are kept")


def ollama_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()).strip("-.")
    return cleaned or "finsft-model"


GGUF_FOLDER = "gguf"


def write_exports(folder: Path, out_dir: Path, types: Sequence[str], *, tokenizer: Any, template: Any,
                  name: str, source_gguf: str | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every file the export adds to ``out_dir`` (a folder finsft made), in its own ``gguf/`` subfolder (so that a
    program given that folder sees the GGUF's tokenizer, not the merged folder's tokenizer.json): one GGUF per
    type, an Ollama Modelfile per GGUF (``Modelfile`` for the first type, ``Modelfile.TYPE`` for the others),
    ``finsft_gguf.json`` (what was written and why); and a section of the model card (``out_dir/README.md``)
    saying how to run them. All writes of the export go through here."""
    target_dir = out_dir / GGUF_FOLDER
    if target_dir.is_symlink() or (target_dir.exists() and any(target_dir.iterdir())):
        raise ExportError(f"{target_dir} exists and is not empty; finsft never replaces a folder")
    target_dir.mkdir(parents=True, exist_ok=True)
    low = [t for t in types if t.startswith(("q4", "q5"))]
    if low:
        log(f"note: {', '.join(low)} round weights to 4-5 bits: a LoRA fine-tune's change can be smaller than that "
            "step and be rounded away (measured: the quickstart run's q4_1 file scored 0.35 accuracy, its merged "
            "model and q8_0 file 0.75). Score the file with finsft eval before you ship it.")
    reports, files, modelfiles = [], [], []
    eos = getattr(tokenizer, "eos_token", None)
    for i, qtype in enumerate(types):
        target = target_dir / gguf_file_name(qtype)
        log(f"writing {target} ({qtype}) ...")
        report = export_gguf(folder, target, qtype, tokenizer=tokenizer, source_gguf=source_gguf, name=name,
                             log=log)
        modelfile = MODELFILE if i == 0 else f"{MODELFILE}.{qtype}"
        _write_text(target_dir / modelfile, render_modelfile(template, target.name, eos))
        reports.append({**report.as_dict(), "modelfile": modelfile})
        files.append(f"{GGUF_FOLDER}/{target.name}")
        modelfiles.append(f"{GGUF_FOLDER}/{modelfile}")
        log(f"  {target.name}: {report.bytes / 2**20:.1f} MiB, {report.tensors} tensors "
            f"({', '.join(f'{n} {t}' for t, n in sorted(report.types.items()))}); tokenizer {report.tokenizer}")
    summary = {"gguf": reports, "template": template.name, "ollama_name": ollama_name(name)}
    _write_text(target_dir / "finsft_gguf.json", json.dumps(summary, indent=2) + "\n")
    card = out_dir / "README.md"
    section = run_section(files, modelfiles[0], ollama_name(name), template)
    if card.is_file():  # the card finsft wrote for this folder
        write_file(card, read_text(card, "model card") + section, replace=True,
                   kept="the card is as it was; the GGUF files are written")
    else:
        _write_text(card, "# " + name + "\n" + section)
    return summary
