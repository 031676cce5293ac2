"""Memory model of Stage 1 and Stage 2: bytes per component, pure arithmetic from a model's config.json.

Each formula counts the tensors that this repository's code (named at the formula) and the libraries it calls
keep alive, and tests/test_plan.py checks them against memory measured on the CPU. Units are bytes; `a` is the
byte width of the compute dtype: 2 (bf16) on a GPU, 4 (fp32) on the CPU where the tests measure. Only the
standard library is imported (and cache.errors, which imports nothing), so planning a 7B model needs neither
torch nor a GPU.
"""

import math
from dataclasses import dataclass

from cache.errors import OtkdError

SUPPORTED = ("qwen2", "qwen3", "llama")
"""HF decoders with one layer structure (pre-RMSNorm, GQA attention with rotary embeddings, SwiGLU MLP): Qwen2,
Qwen3 (+ per-head q/k RMSNorm) and Llama (Llama 2/3.x, SmolLM/SmolLM2). What differs is only which projections have
a bias, read from config.json in Arch.from_config; Llama 3's rope_scaling changes no tensor size."""


class PlanError(OtkdError, ValueError):
    """The params file asks for something the planner cannot budget (an unknown architecture or optimizer,
    models that cannot share a tokenizer without distill.cross_tokenizer, a model whose config.json it cannot
    find)."""


class ModelConfigNotFoundError(PlanError, FileNotFoundError):
    """No config.json for a model name: neither a local checkpoint folder nor a shipped copy."""


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""bitsandbytes NF4 with double quantisation (blocksize 64): 4-bit codes + one uint8 absmax per 64 weights + one
fp32 second-level absmax per 256 blocks = 4.127 bits per weight (QLoRA, Dettmers et al. 2023, section 3)."""
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096  # bitsandbytes 8-bit Adam: blockwise absmax; smaller tensors stay fp32
STORED_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
"""config.json torch_dtype (transformers >= 4.56 writes it as dtype) -> bytes per element as stored."""
FUSED_SLICE, FUSED_CHUNK_ELEMS = (
    128,
    2**26,
)  # pipeline/losses/chunked.py SLICE, CHUNK_ELEMS (tests check they match)


@dataclass(frozen=True)
class Arch:
    """The numbers of a Qwen2 / Qwen3 / Llama decoder that its memory depends on."""

    name: str
    model_type: str
    hidden: int  # h: width of the residual stream
    layers: int
    heads: int
    kv_heads: int  # grouped-query attention: K/V heads
    head_dim: int
    intermediate: int  # I: width of the SwiGLU MLP
    vocab: int  # logits width (config vocab_size), padded beyond the tokenizer's size
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool  # Qwen2: always; Qwen3 and Llama: attention_bias
    o_bias: bool  # Qwen3 and Llama with attention_bias (never Qwen2)
    mlp_bias: bool  # Llama's mlp_bias: gate/up/down_proj biases (never Qwen2/Qwen3)
    qk_norm: bool  # Qwen3's per-head RMSNorm on q and k
    max_positions: int
    prequantized: int  # 4 / 8 for a bitsandbytes checkpoint (its config has a quantization_config), else 16
    stored_dtype: str = "bfloat16"  # the checkpoint's unquantised tensors: config torch_dtype (bf16 if it says none)

    @classmethod
    def from_config(cls, cfg: dict, name: str) -> "Arch":
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise PlanError(f"{name}: the planner knows {' and '.join(SUPPORTED)} decoders, not model_type {mt!r}")
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        q = cfg.get("quantization_config") or {}
        # Qwen2 ignores attention_bias (q/k/v always biased, o_proj never); Qwen3 / Llama bias all four with it
        attn_bias = mt != "qwen2" and bool(cfg.get("attention_bias", False))
        return cls(
            name,
            mt,
            h,
            cfg["num_hidden_layers"],
            heads,
            cfg.get("num_key_value_heads") or heads,
            cfg.get("head_dim") or h // heads,
            cfg["intermediate_size"],
            cfg["vocab_size"],
            bool(cfg.get("tie_word_embeddings", False)),
            mt == "qwen2" or attn_bias,
            attn_bias,
            mt == "llama" and bool(cfg.get("mlp_bias", False)),
            mt == "qwen3",
            cfg.get("max_position_embeddings", 32768),
            4 if q.get("load_in_4bit") else 8 if q.get("load_in_8bit") else 16,
            str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        )

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per decoder layer: projection -> (in_features, out_features, has bias), as HF's modeling_qwen2/3/llama."""
        h, hq, hkv, inter = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, hq, self.qkv_bias),
            "k_proj": (h, hkv, self.qkv_bias),
            "v_proj": (h, hkv, self.qkv_bias),
            "o_proj": (hq, h, self.o_bias),
            "gate_proj": (h, inter, self.mlp_bias),
            "up_proj": (h, inter, self.mlp_bias),
            "down_proj": (inter, h, self.mlp_bias),
        }

    @property
    def linear_weights(self) -> int:
        """Weights of the decoder projections: what bitsandbytes quantises (lm_head never is)."""
        return self.layers * sum(i * o for i, o, _ in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (if untied), RMSNorm weights and biases: kept unquantised."""
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        biases = sum(o for _, o, b in self.linears().values() if b)
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * (norms + biases) + self.hidden

    @property
    def stored_bytes(self) -> int:
        """Bytes per element of an unquantised tensor as the checkpoint stores it (fp32 4, bf16 / fp16 / unknown 2)."""
        return STORED_BYTES.get(self.stored_dtype, 2)

    @property
    def params(self) -> int:
        return self.linear_weights + self.other_params

    def tensor_sizes(self) -> list[int]:
        """Element counts of every parameter tensor (a tied embedding once): what full fine-tuning optimises."""
        lin = self.linears().values()
        layer = [i * o for i, o, _ in lin] + [o for _, o, b in lin if b] + [self.hidden] * 2
        layer += [self.head_dim] * 2 if self.qk_norm else []
        return [self.vocab * self.hidden] * (1 if self.tied else 2) + layer * self.layers + [self.hidden]


# ---------------------------------------------------------------------------------------------------------
# Weights and trainable state
# ---------------------------------------------------------------------------------------------------------


def weight_bytes(arch: Arch, bits: int, a: int, kbit_prepared: bool) -> float:
    """Model weights on the device. bits 16: every parameter in the compute dtype. 4: NF4 projections; 8: LLM.int8
    (1 B + one fp32 scale per output row). `kbit_prepared`: peft's prepare_model_for_kbit_training (Stage 2's
    QLoRA path, pipeline/distill/student.py) casts every unquantised parameter - embeddings, norms, biases - to fp32."""
    if bits == 16:
        return arch.params * a
    other = arch.other_params * (4 if kbit_prepared else a)
    if bits == 4:
        return arch.linear_weights * NF4_BYTES + other
    rows = arch.layers * sum(o for _, o, _ in arch.linears().values())
    return arch.linear_weights + 4 * rows + other


def dequant_bytes(arch: Arch, bits: int, a: int) -> float:
    """bitsandbytes dequantises one 4-bit weight to the compute dtype per matmul (forward and backward)."""
    return max(i * o for i, o, _ in arch.linears().values()) * a if bits == 4 else 0.0


def lora_sizes(arch: Arch, r: int, targets) -> list[int]:
    """Element counts of peft's LoRA tensors: A (r x in) and B (out x r) per targeted projection per layer."""
    return [
        n for name, (i, o, _) in arch.linears().items() if name in set(targets) for n in (r * i, o * r)
    ] * arch.layers


def optimizer_bytes(sizes: list[int], param_bytes: int, optim: str) -> float:
    """Adam moments for tensors of `sizes` elements. adamw_torch (torch.optim.AdamW): exp_avg and exp_avg_sq
    like the parameter. adamw_8bit / paged_adamw_8bit (bitsandbytes): per tensor of >= 4096 elements two uint8
    states, an fp32 absmax per 256 elements of each and two 256-entry fp32 code books; smaller ones stay fp32.
    Paged states are counted as resident (they only move to host memory under pressure)."""
    if optim == "adamw_torch":
        return 2 * param_bytes * sum(sizes)
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        return sum(2 * n + 8 * math.ceil(n / BNB_BLOCK) + 2 * 256 * 4 if n >= BNB_MIN_8BIT else 8 * n for n in sizes)
    raise PlanError(f"distill.optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")


# ---------------------------------------------------------------------------------------------------------
# Activations (per token, per decoder layer)
# ---------------------------------------------------------------------------------------------------------
# The method of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (sec. 4:
# 34 s b h bytes per layer for a 16-bit GPT layer, + 5 a s^2 b for attention scores), redone for what HF's
# Qwen2/Qwen3/Llama layers save: RMSNorm upcasts its input to fp32, SwiGLU keeps three I-wide tensors, GQA, rotary
# embeddings, and SDPA's fused attention (memory-efficient / flash kernels keep q, k, v, the output and a
# logsumexp, no s x s scores) - so the s^2 term is only the padding mask's additive bias (below).


def train_layer_bytes(
    arch: Arch, a: int, kbit: bool, lora: tuple | None, r: int, dropout: float, padded: bool, seq: int
) -> float:
    """Bytes one decoder layer saves for the backward, per token (HF Qwen2/Qwen3/Llama layer, peft LoRA, SDPA).

    lora: the targeted projection names (peft LoRA), None = full fine-tuning (every weight trains).
    kbit: the QLoRA path under bf16 autocast: prepare_model_for_kbit_training made the embeddings fp32, and
        bitsandbytes' Linear4bit returns its input's dtype, so the residual stream, the norms' outputs and the
        MLP are fp32, and every LoRA-A input is cast to bf16 separately (one saved copy per adapter).
    padded: a padded batch gives SDPA a mask: HF's repeat_kv copies K and V to every query head, and the fused
        kernel saves the mask as an additive bias, a bytes per (query, key) pair (`seq` keys per token).
    """
    h, inter = arch.hidden, arch.intermediate
    hq, hkv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    res = 4 if kbit else a  # dtype of the residual stream, the norms' outputs and (kbit) the MLP
    full = lora is None

    def inputs(names, width):
        """Saved inputs of the projections `names` that read one `width`-wide tensor."""
        if full:
            return a * width  # nn.Linear saves its input (once) for the weight gradient
        n = sum(x in lora for x in names)
        if dropout > 0:
            return n * (a + 1) * width  # peft drops out per adapter: the dropped input (as lora_A sees it) + mask
        return n * a * width if kbit else a * width * bool(n)  # lora_A reads one shared tensor unless cast

    adapters = 0 if full else a * r * len(lora)  # lora_A outputs, saved by lora_B
    norm = 4 * h + 4 + (a * h if full else 0)  # the fp32 input and rsqrt; a trainable weight also saves x
    attn = norm + inputs(("q_proj", "k_proj", "v_proj"), h)
    if arch.qk_norm:  # Qwen3's per-head q_norm / k_norm, like the layer norms
        attn += (4 + (a if full else 0)) * (hq + hkv) + 4 * (arch.heads + arch.kv_heads)
    kv = hq if padded else hkv
    attn += a * (hq + 2 * kv) + 4 * arch.heads + a * hq  # SDPA: q, k, v, output, fp32 logsumexp
    # o_proj reads SDPA's output as laid out: a copy only when peft casts or drops it out
    attn += inputs(("o_proj",), hq) if not full and (kbit or dropout > 0) else 0
    attn += a * seq if padded else 0
    m = res if kbit else a  # gate, SiLU(gate) and up are saved for the product; the product for down_proj
    mlp = norm + inputs(("gate_proj", "up_proj"), h) + 3 * m * inter + inputs(("down_proj",), inter)
    return attn + mlp + adapters


def infer_layer_bytes(arch: Arch, a: int, padded: bool, seq: int) -> float:
    """Peak working set of one decoder layer in a no-grad forward, per token (Stage 1: nothing is saved, the
    largest block's temporaries are): the residual + max(attention block, MLP block)."""
    h, inter = arch.hidden, arch.intermediate
    hq, hkv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attn = a * h + a * (hq + 2 * hkv)  # the normed input; q, k, v after the rotary embedding
    attn += 2 * a * hq if padded else 0  # K and V repeated to every query head (a padding mask disables GQA)
    attn += 2 * a * hq + (1 + a) * seq * padded  # SDPA's output and its (B, L, H*D) copy; bool mask + float bias
    mlp = max(4 * h, a * h + 3 * a * inter)  # RMSNorm's fp32 copy, then act(gate), up and their product
    return a * h + max(attn, mlp)


# ---------------------------------------------------------------------------------------------------------
# Loss paths
# ---------------------------------------------------------------------------------------------------------


def fused_chunk_rows(vocab: int) -> int:
    """pipeline/losses/chunked.py default_chunk_rows: one (rows, V) fp32 buffer holds 2^26 logits."""
    return max(FUSED_SLICE, FUSED_CHUNK_ELEMS // vocab)


def fused_loss_bytes(
    rows: int, vocab: int, vocab_logits: int, d: int, a: int, w_ce: float, w_kl: float, head_trains: bool
) -> float:
    """Peak of pipeline/losses/fused_ce_kl.py fused_ce_kl (forward + its stored gradients), for `rows` supervised rows.

    Per chunk of C rows: the fp32 logits x and their gradient dx (C x V each); both are dropped before the
    next chunk's matmul, so two C x V buffers at most. In one chunk with CE and KL, KL's 128-row logsumexp / exp
    temporaries come on top of x and dx. On a GPU the matmul's bf16 output precedes its fp32 copy. Stored:
    grad_h (R, d) fp32, and grad_W (V_logits, d) fp32 only if the lm_head trains.
    """
    if not rows or not (w_ce or w_kl):
        return 0.0
    c = min(fused_chunk_rows(vocab), rows)
    multi = rows > c
    peak = 4 * c * vocab * 2
    extra = max(
        4 * min(FUSED_SLICE, c) * vocab if (w_ce and w_kl and not multi) else 0,
        a * c * vocab if (a < 4 and multi) else 0,
    )
    return peak + extra + 4 * rows * d + (4 * vocab_logits * d if head_trains else 0)


def exact_loss_bytes(rows: int, vocab: int, vocab_logits: int, d: int, D: int, head_trains: bool, jsd: bool) -> float:
    """Peak of pipeline/losses/exact_kl.py fused_ce_exact_kl with its divergence on (w_kl > 0; forward + its stored
    gradients), for `rows` rows: CE + the divergence to the teacher's exact distribution, rebuilt from its hidden
    states (D wide) by its lm_head.

    Per chunk of C rows (fused_ce_kl's default chunk): the student logits and the teacher's, which become the
    teacher log-probs and then, in place, the gradient (CE's included): two C x V fp32 buffers; on top of them the
    divergence's SLICE-row fp32 temporaries, 3 live at most (4 for the JSD, which also holds log m), and the chunk's
    teacher rows with the uncounted ones zeroed (C x D fp32). Both matmuls run SLICE rows at a time (a bf16 head's
    S x V output is smaller than those temporaries, and freed before them), and a bf16 student's C x V bf16 copy of
    the gradient is taken after its logits are freed: neither adds to the peak. Stored: grad_h (R, d) fp32, and
    grad_W (V_logits, d) fp32 only if the lm_head trains. The teacher's head and hidden states are the caller's
    (Stage 2: the teacher_head buffer and the batch), counted there.
    """
    if not rows:
        return 0.0
    c = min(fused_chunk_rows(vocab), rows)
    temps = 4 * min(FUSED_SLICE, c) * vocab * (4 if jsd else 3)
    return 4 * c * vocab * 2 + temps + 4 * c * D + 4 * rows * d + (4 * vocab_logits * d if head_trains else 0)


def teacher_head_bytes(rows: int, D: int, stored_bytes: int, bias: bool = False) -> float:
    """The exact teacher's lm_head in Stage 2 (pipeline/distill/head.py load_teacher_head, a DistillModel buffer):
    its first `rows` rows (the tokenizer's size) of D, in the checkpoint's dtype, and its bias if it has one (the
    Qwen2 / Qwen3 / Llama heads have none)."""
    return stored_bytes * rows * (D + bias)


def topk_bytes(rows: int, vocab: int, vocab_logits: int, a: int, chunk_rows: int) -> float:
    """pipeline/teacher/topk.py topk_from_hidden per chunk: the lm_head output (a-wide, all V_logits columns), its fp32
    copy over the real vocabulary and logsumexp's full-size temporary (the tail's logsumexp reuses the copy)."""
    c = min(chunk_rows, rows)
    return c * (a * vocab_logits + 8 * vocab) if rows else 0.0


def ot_bytes(B: int, N: int, M: int, vocab: int, k: int, hidden: bool, logits: bool, block: int = 64) -> float:
    """Peak of Stage 2's sequence-level OT terms (pipeline/losses/ot.py ot_hidden_loss, then pipeline/losses/fused_ot.py
    ot_logits_loss_from_hidden), forward and backward. E = the bytes of one (B, N, M) fp32 tensor.

    Forward of each term: the similarity S, the softmax P and the cost C = 1 - P (3E), then pipeline/losses/sinkhorn.py:
    the padding mask (E/4), the shifted cost, the plan, a stage's kernel and its transpose, their copies for
    the working batch when sequences finish (transient) and Newton's squared kernel (6.75E in all, measured
    by tests/test_plan.py). P, C - f - g and the plan stay saved for the backward (3E), whose implicit gradient
    (implicit._grad_from_duals) needs T*C and two temporaries (3E). OT on logits first runs one vocabulary pass for
    the log-normaliser ((rows, V) fp32 as fused_loss chunks it, plus a 128-row temporary; freed before the blocks),
    then per block of teacher tokens builds the student's logits at the block's distinct ids U
    (|U| <= block x k; two N x |U| fp32 tensors: the matmul and its shift, then the probabilities, their
    gather by teacher token and the product with the teacher's: three N x block x k). Its backward holds dS
    and, per block, the probabilities, dS x p and their scatter onto U (three N x block x k; a block's tensors
    are freed before the next block builds its own).
    """
    E = 4 * B * N * M
    saved = 3 * E if hidden else 0.0  # the hidden-state term's saved tensors live until the backward
    phases = [9.75 * E, 6 * E] if hidden else []  # its forward; its backward
    if logits:
        c = min(fused_chunk_rows(vocab), B * N)
        vocab_pass = 4 * c * vocab
        blocks = 4 * N * min(block, M) * k  # one N x block x k fp32 tensor, at most |U| wide
        phases += [
            saved + vocab_pass + 4 * min(FUSED_SLICE, c) * vocab,  # the log-normaliser pass
            saved + E + 3 * blocks,  # S filled block by block
            saved + 9.75 * E,
            saved + 6 * E,  # its Sinkhorn; its implicit gradient
            saved + E + 3 * blocks,
        ]  # dS back through the blocks
    return max(phases, default=0.0)


def tok_ot_bytes(rows: int, n: int, k: int, d: int, D: int) -> tuple[float, float]:
    """The token-level OT of cross-tokenizer distillation (distill.w_tok_ot; pipeline/losses/crosstok.py
    token_ot_loss as terms.tok_ot calls it). Per supervised row it gathers the student's n = tok_ot_k
    embedding rows (d wide) and the teacher's k cached top-k embedding rows (D wide), projects the teacher's by P_e
    (k x d), normalises both sides and solves an n x k problem. Returns (saved, working):

    saved - what its backward keeps from the forward on, next to the other losses' working sets: the teacher rows
        (for P_e's gradient), their projection, the normalised student rows and the plan;
    working - its backward beyond that: five k x d tensors per row (the gradients through the cosine, the
        normalisation and the projection).

    fp32, as measured on the CPU by tests/test_plan.py (under bf16 autocast the saved copies are bf16: ~15% less).
    The student's top n and its bucket log-probabilities are vocabulary passes chunked like the fused CE + KL."""
    return 4 * rows * (k * D + k * d + n * d + n * k), 5 * 4 * rows * k * d
