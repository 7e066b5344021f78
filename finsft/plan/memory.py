"""Peak GPU memory of a training step, from the model's shapes alone (no torch, no weights).

Components, each reported: weights (4-bit/8-bit/16-bit), trainable parameters with their gradients and optimizer
state, activations (bytes autograd saves for backward, per token per layer), the loss head and the backward's
transient buffers, a fixed allowance for the CUDA runtime's workspaces, and the attention mask that SDPA needs
for padding-free (packed) batches. Under FSDP/DeepSpeed ZeRO the sharded components are divided by the number of
processes (per GPU), plus the full weights of the units being computed.

The attention mask: transformers (``masking_utils.create_causal_mask``) detects packed sequences from the
position_ids of a padding-free batch (TRL flattens the batch into one row of T = batch x max_length tokens) and
builds one boolean [1, 1, T, T] mask for the model; every layer's ``scaled_dot_product_attention`` converts it to
an additive mask in the activation dtype and saves that copy for backward (measured with
``saved_tensors_hooks``: one [T, T] bf16 tensor per layer). Gemma-2B at 8 x 512: 18 x 2 x 4096^2 bytes = 0.56
GiB; at 8 x 2048: 9 GiB. flash-attn's variable-length kernel needs no mask; FlexAttention's BlockMask holds a few
int32 per 128 x 128 tile (kilobytes), and both take grouped k/v as they are.

The per-layer activation formula counts the tensors each op saves (calibrated op by op against
``torch.autograd.graph.saved_tensors_hooks`` on real layer shapes: :mod:`finsft.plan.calibrate`,
``benchmarks/activation_memory.py``). Per token and layer, with ``b`` the activation bytes (2 under bf16/fp16
autocast, 4 in fp32), ``r`` the LoRA rank and ``d`` the input width of a LoRA-targeted projection:

- each RMSNorm: its input in fp32, 4h (Liger's norm: the input itself, b*h)
- each LoRA projection: dropout mask d (1 byte, when dropout > 0) + lora_A input b*d + lora_A output b*r
- attention (SDPA / flash / flex): q, k, v, output in b bytes + fp32 log-sum-exp per head; SDPA with a mask (packed
  batches) expands k and v to all heads first
- MLP: activation input, activation output and up output, 3*b*i (Liger's fused GLU: 2*b*i); 4 bytes instead
  of b when ``prepare_model_for_kbit_training`` upcast the norms (their fp32 outputs run the MLP in fp32)

Measured (GPU dropout semantics): Mistral-7B LoRA bf16 62.6 x hidden, Gemma-2B QLoRA 102.6 x hidden, 150.6 x
hidden with the fp32 upcast. Against one H100 (batch 8 x 512, packed, paged_adamw_8bit, r16 on all 7
projections): see ``ANCHORS`` and tests/test_memory.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from finsft.files import UnreadableFile, read_json

GiB = 2**30

# Families that overflow in fp16 (activations beyond 65504): they train in bf16 or fp32 only.
FP16_UNSAFE_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3", "gemma3_text")

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRL_TOKEN_CHUNK = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
RUNTIME_BYTES = GiB // 4  # cuBLAS/cuDNN workspaces, allocator rounding: seen as max_memory_allocated
# The fit threshold. The estimate is of allocated bytes (torch.cuda.max_memory_allocated); PyTorch's caching
# allocator reserves more than it hands out (2 MiB / 20 MiB segments, blocks split and cached across the varying
# shapes of packed batches), and an out-of-memory error comes when *reserved* memory reaches the card. A step fits
# when peak x (1 + ALLOCATOR_MARGIN) <= GPU memory - CUDA_CONTEXT_BYTES.
ALLOCATOR_MARGIN = 0.10  # reserved over allocated
CUDA_CONTEXT_BYTES = GiB // 2  # the CUDA context and kernel images: outside torch's allocator, per process


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a decoder-only transformer, read from its config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        cfg = cfg.get("text_config") or cfg
        hidden = int(cfg["hidden_size"])
        heads = int(cfg.get("num_attention_heads") or max(1, hidden // 128))
        model_type = str(cfg.get("model_type", ""))
        tied = cfg.get("tie_word_embeddings")
        return cls(model_type=model_type, hidden=hidden,
                   intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
                   layers=int(cfg["num_hidden_layers"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads),
                   vocab=int(cfg.get("vocab_size") or 32000),
                   tied_embeddings=bool(model_type in _TIED_BY_DEFAULT if tied is None else tied))

    @classmethod
    def from_legacy(cls, shape: tuple[int, int, int]) -> ModelShape:
        """From (parameters, hidden, layers): a Llama-like guess for the rest (intermediate 8/3 x hidden, MHA),
        with the vocabulary sized so that the parameter count matches."""
        n, hidden, layers = shape
        inter = int(hidden * 8 / 3)
        per_layer = 4 * hidden * hidden + 3 * hidden * inter
        vocab = max(1000, (n - layers * per_layer) // (2 * hidden))
        heads = max(1, hidden // 64)
        return cls("llama", hidden, inter, layers, heads, heads, hidden // heads, int(vocab), False)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def parameters(self) -> int:
        return self.layers * (self.layer_linear_params() + 2 * self.hidden) + self.embedding_params() + self.hidden


def read_model_shape(path: str | Path) -> ModelShape | None:
    """The shape from a config.json file or a model folder holding one; None when there is none (no torch)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        return None
    try:
        return ModelShape.from_config(read_json(p, "model config"))
    except (UnreadableFile, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class MemorySettings:
    """What the estimate depends on besides the shapes."""

    batch: int
    max_length: int
    precision: str  # fp32 | bf16 | fp16
    quantization: str | None  # "4bit" | "8bit" | None
    double_quant: bool = True
    lora_r: int | None = 16  # None: full fine-tune
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_dropout: float = 0.05
    lora_layers: int | None = None  # layers_to_transform count; None = every layer
    gradient_checkpointing: bool = False
    packing: bool = True
    attn_implementation: str = "sdpa"
    use_liger_kernel: bool = False
    optim: str = "adamw_torch"
    kbit_upcast: bool = False  # prepare_model_for_kbit_training (fp32 norms and embedding)
    fused_loss: bool = True  # TRL >= 1.x fused LM head: no [tokens, vocab] logits
    processes: int = 1  # GPUs the sharded components are divided across (finsft.plan.distributed)
    shard_weights: bool = False  # FSDP FULL_SHARD, DeepSpeed ZeRO-3
    shard_gradients: bool = False  # also ZeRO-2, FSDP SHARD_GRAD_OP
    shard_optimizer: bool = False  # also ZeRO-1


@dataclass
class MemoryEstimate:
    """Peak memory of one training step on one device, by component (bytes)."""

    weights: int
    trainable: int  # trainable parameters
    gradients: int
    optimizer: int
    activations: int
    loss_head: int
    backward_transient: int
    runtime: int
    attention_mask: int  # padding-free SDPA: the packed block mask, one copy per layer saved for backward
    gathered: int  # sharded weights: the full weights of the units being computed (and the one prefetched)
    per_layer_bytes_per_token: float
    tokens: int
    gradient_checkpointing: bool
    device_bytes: int | None = None
    processes: int = 1
    advice: list[str] = field(default_factory=list)
    without_checkpointing: int | None = None  # peak bytes with checkpointing off (for the auto decision)

    @property
    def peak(self) -> int:
        return sum(getattr(self, k) for k in COMPONENTS)

    @property
    def usable(self) -> int | None:
        """The largest estimated peak that fits: see ALLOCATOR_MARGIN."""
        return fit_limit(self.device_bytes) if self.device_bytes else None

    @property
    def fits(self) -> bool | None:
        if not self.device_bytes:
            return None
        return self.peak <= fit_limit(self.device_bytes)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(estimated_peak_bytes=self.peak, fits=self.fits,
                 estimated_peak_gib=round(self.peak / GiB, 2),
                 usable_bytes=self.usable, components_gib={k: round(getattr(self, k) / GiB, 3) for k in COMPONENTS})
        return d


COMPONENTS = ("weights", "gathered", "trainable", "gradients", "optimizer", "activations", "attention_mask",
              "loss_head", "backward_transient", "runtime")


def fit_limit(device_bytes: int) -> int:
    """The largest estimated peak (allocated bytes) that fits on a GPU of ``device_bytes``."""
    return int((device_bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_MARGIN))


def attention_mask_bytes(shape: ModelShape, s: MemorySettings) -> int:
    """The packed block mask of padding-free SDPA (see the module docstring): the boolean mask once, and one
    additive copy per layer saved for backward (one layer's under gradient checkpointing). None without packing
    or with flash-attn or FlexAttention."""
    if not s.packing or s.attn_implementation.startswith(("flash", "kernels-community/flash", "flex")):
        return 0
    t = s.batch * s.max_length
    saved_layers = 1 if s.gradient_checkpointing else shape.layers
    return t * t * (1 + saved_layers * _act_bytes(s.precision))


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def layer_activation_bytes(shape: ModelShape, s: MemorySettings) -> float:
    """Bytes saved for backward per token by one decoder layer (see the module docstring)."""
    b = _act_bytes(s.precision)
    h, i = shape.hidden, shape.intermediate
    norms = 2 * ((b * h if s.use_liger_kernel else 4 * h) + 4)
    proj = 0
    if s.lora_r is None:  # full fine-tune: every projection saves its input (q/k/v and gate/up share one)
        proj = b * (2 * h + shape.q_width + i)
    else:
        for name, (d_in, _d_out) in shape.linear_shapes().items():
            if name in s.lora_targets:
                proj += (d_in if s.lora_dropout > 0 else 0) + b * d_in + b * s.lora_r
    expand_kv = s.attn_implementation == "sdpa" and s.packing
    kv = shape.q_width if expand_kv else shape.kv_width
    attention = b * (2 * shape.q_width + 2 * kv) + 4 * shape.heads
    mlp_b = 4 if s.kbit_upcast and s.quantization else b
    mlp = (2 if s.use_liger_kernel else 3) * mlp_b * i
    return float(norms + proj + attention + mlp)


def estimate_memory(shape: ModelShape, s: MemorySettings, device_bytes: int | None = None) -> MemoryEstimate:
    """Peak bytes of one training step (forward + backward + optimizer step) on one device: with sharding
    (``s.processes`` > 1 and a ``shard_*`` flag), what each GPU holds."""
    b = _act_bytes(s.precision)
    weight_b = 4 if s.precision == "fp32" else 2
    linear = shape.layers * shape.layer_linear_params()
    other = shape.parameters() - linear
    if s.quantization == "4bit":
        q_bytes = 0.5 + (1 / 64 + 4 / (64 * 256) if s.double_quant else 4 / 64)
        weights = linear * q_bytes + other * (4 if s.kbit_upcast else weight_b)
    elif s.quantization == "8bit":
        weights = linear * 1.0 + other * (4 if s.kbit_upcast else weight_b)
    else:
        weights = shape.parameters() * weight_b

    if s.lora_r is None:
        n_train = shape.parameters()
        p_bytes = weight_b
        weights = 0  # the trainable parameters are the weights
    else:
        layers = s.lora_layers if s.lora_layers is not None else shape.layers
        n_train = layers * sum(s.lora_r * (a + o) for n, (a, o) in shape.linear_shapes().items()
                               if n in s.lora_targets)
        # PEFT keeps adapters in fp32; TRL casts them to bf16 on quantized models
        p_bytes = 2 if s.quantization and s.precision != "fp32" else 4
    opt = s.optim.lower()
    if "8bit" in opt:
        state = 2.0
    elif "adafactor" in opt:
        state = 0.05 * p_bytes
    elif opt.startswith("sgd"):
        state = 0.0
    else:
        state = 2.0 * (4 if s.lora_r is not None else p_bytes)  # AdamW: two moments in the parameter dtype
    trainable = int(n_train * p_bytes)
    gradients = int(n_train * p_bytes)
    optimizer = int(n_train * state)
    n = max(1, s.processes)
    gathered = 0
    if s.shard_weights and n > 1:
        # Each GPU keeps 1/n of every flat parameter; a wrapped unit (a decoder layer) is gathered whole for its
        # forward and backward, the next one prefetched; the root unit (embeddings, final norm, untied head)
        # stays gathered through the step.
        root = other * (4 if s.kbit_upcast and s.quantization else weight_b)
        layer_bytes = (weights - root + trainable) / shape.layers if s.lora_r is not None else \
            (n_train - other) * p_bytes / shape.layers
        gathered = int(2 * layer_bytes + root)
        weights, trainable = weights / n, trainable // n
    if s.shard_gradients:
        gradients //= n
    if s.shard_optimizer:
        optimizer //= n

    tokens = s.batch * s.max_length
    per_layer = layer_activation_bytes(shape, s)
    h = shape.hidden
    if s.gradient_checkpointing:
        # every layer keeps its input; the layer being recomputed holds its full activations
        activations = shape.layers * b * h * tokens + per_layer * tokens
    else:
        activations = shape.layers * per_layer * tokens
    activations += (4 + b) * h * tokens  # final norm + embedding output
    if s.fused_loss or s.use_liger_kernel:  # one [4096 tokens, 32k vocab] tile and an fp32 hidden gradient
        loss_head = min(tokens, TRL_TOKEN_CHUNK) * min(shape.vocab, TRL_VOCAB_CHUNK) * b + (4 + b) * h * tokens
    else:  # logits, their fp32 copy and log-softmax
        loss_head = tokens * shape.vocab * (b + 4 + 4)
    # backward: gradients of one layer's largest intermediates (the MLP) and of the hidden state
    transient = (2 * b * shape.intermediate + 4 * h) * tokens
    return MemoryEstimate(
        weights=int(weights), trainable=trainable, gradients=gradients, optimizer=optimizer,
        activations=int(activations), loss_head=int(loss_head), backward_transient=int(transient),
        runtime=RUNTIME_BYTES, attention_mask=attention_mask_bytes(shape, s), gathered=gathered,
        per_layer_bytes_per_token=per_layer, tokens=tokens, gradient_checkpointing=s.gradient_checkpointing,
        device_bytes=device_bytes, processes=n)


def fitting_overrides(shape: ModelShape, s: MemorySettings, device_bytes: int, grad_accum: int) -> list[str]:
    """Recipe overrides (``key.path=value``) under which the step fits, each with its estimate; tried in order:
    gradient checkpointing, a smaller batch with more accumulation (same effective batch), a shorter max_length,
    4-bit weights."""
    limit = fit_limit(device_bytes)
    out: list[str] = []

    def est(t: MemorySettings) -> int:
        return estimate_memory(shape, t).peak

    base = replace(s, gradient_checkpointing=True)
    prefix = "" if s.gradient_checkpointing else "training.gradient_checkpointing=true "
    if not s.gradient_checkpointing and est(base) <= limit:
        out.append(f"training.gradient_checkpointing=true ({est(base) / GiB:.1f} GiB)")
        return out
    batch = s.batch
    while batch > 1:
        batch //= 2
        t = replace(base, batch=batch)
        if est(t) <= limit:
            accum = grad_accum * s.batch // batch
            out.append(f"{prefix}training.per_device_train_batch_size={batch} "
                       f"training.gradient_accumulation_steps={accum} ({est(t) / GiB:.1f} GiB)")
            break
    length = s.max_length
    while length > 128:
        length //= 2
        t = replace(base, max_length=length)
        if est(t) <= limit:
            out.append(f"{prefix}training.max_length={length} ({est(t) / GiB:.1f} GiB)")
            break
    if s.quantization != "4bit" and s.lora_r is not None:
        t = replace(base, quantization="4bit", kbit_upcast=False)
        if est(t) <= limit:
            out.append(f"{prefix}quantization.load_in_4bit=true ({est(t) / GiB:.1f} GiB)")
    if not out:
        shard = (f"shard across more than {s.processes} GPUs" if s.shard_weights and s.processes > 1 else
                 "shard with FSDP or DeepSpeed ZeRO-3 across GPUs (finsft plan --accelerate-config "
                 "recipes/accelerate/fsdp.yaml --num-processes N)")
        out.append(f"no single override fits: use a larger GPU, {shard}, or combine 4-bit weights, batch 1 and a "
                   "shorter max_length")
    return out


# One H100 80GB, hand-written TRL (FACTS.md): batch 8 x 512, packed (bfd), paged_adamw_8bit, LoRA r16 on all 7
# projections, dropout 0.05, bf16, SDPA, no Liger. (model config, 4-bit?, checkpointing) -> peak GiB.
ANCHORS: list[tuple[str, bool, bool, float]] = [
    ("google--gemma-2b", True, False, 17.3),
    ("google--gemma-2b", True, True, 3.4),
    ("mistralai--Mistral-7B-v0.1", False, False, 48.1),
    ("mistralai--Mistral-7B-v0.1", False, True, 16.5),
]
