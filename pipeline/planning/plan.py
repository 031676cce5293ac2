"""VRAM planner: the GPU memory budget of Stage 1 and Stage 2 for a params file, before any GPU is rented.

Pure arithmetic on the models' config.json (a local checkpoint folder, or for hub names the copies shipped
as package data in pipeline/planning/models) and the otkd Config: pipeline/planning/memory.py has the
per-component formulas, this file adds them up per stage, gives the verdict on a GPU of `gpu_gb` GiB and the
longest sequence that still fits.

Every assumption is listed in ASSUMPTIONS below, printed under the table and written into the JSON, so that
the metric says what it assumed (docs/design.md "The VRAM planner" explains them).
"""

import json
import textwrap
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cache.codecs import parse as parse_codec
from pipeline.config.params import Config
from pipeline.planning import memory as mm
from pipeline.versions import versions

GIB = 2**30
# Hub models' config.json, <org>--<name>/config.json: package data (pyproject.toml), so a `pip install .` has them.
MODELS_DIR = resources.files(__package__) / "models"
CUDA_CONTEXT_GIB = 0.5
MARGIN = 0.10
ASSUMPTIONS = [
    "GiB = 2^30 bytes; the GPU's whole memory is usable (an RTX 4090's 24 GiB)",
    f"CUDA context + cuBLAS/cuDNN workspaces: {CUDA_CONTEXT_GIB} GiB, outside PyTorch's allocator",
    f"allocator margin: {MARGIN:.0%} of the allocated peak (fragmentation of PyTorch's caching allocator)",
    "compute dtype 'auto' = bf16 (2 B per element), Stage 2 under bf16 autocast",
    (
        "NF4 = bitsandbytes 4-bit with double quantisation: 0.5 B + 0.127 bit of absmax per weight; embeddings, "
        "lm_head, norms and biases stay unquantised (fp32 after peft's prepare_model_for_kbit_training)"
    ),
    "LoRA adapters are fp32 (peft upcasts them); the teacher->student projections P (and P_e) are fp32",
    "Adam states: adamw_torch 2 x the parameter's dtype; 8-bit (paged) 2 B + fp32 absmax per 256, resident",
    "worst-case rows: every position of every sequence is supervised (N = M = sequence length for OT)",
    (
        "Stage 2 batches are padded to the longest sequence (= the sequence length); batch_size > 1 means padding, "
        "so SDPA gets a mask: K/V repeated to all heads and an additive mask of L^2 per sequence per layer"
    ),
    "attention is SDPA's fused kernel (flash / memory-efficient): no L x L scores are stored",
    (
        "activations: HF Qwen2/Qwen3/Llama decoder layers, counted tensor by tensor (Korthikanti et al. 2022's "
        "method); with gradient checkpointing each layer keeps its input, and one layer is recomputed at a time"
    ),
    "backward working set of a layer = its saved activations again (their gradients)",
    (
        "OT: Sinkhorn converges within ot.max_iter (else +1 B x N x M fp32), the implicit gradient's float32 CG "
        "converges (a float64 re-solve is not counted), a block's teacher top-k ids are all distinct"
    ),
    "working sets that never coexist (loss chunk, OT, a layer's backward; Stage 1: forward, head) count once",
    "Stage 1 forwards cache.batch_tokens padded tokens (at least one sequence) with no KV cache",
    "vocabulary V = the logits width from config.json (the tokenizer's real size is <= 0.3% smaller)",
    "data loader: the batch and its gathered copies on the GPU; worker processes use host memory only",
    (
        "cross-tokenizer (distill.cross_tokenizer): Stage 1 runs on the teacher's vocabulary and hidden size, Stage 2 "
        "on the student's vocabulary; each side holds at most the sequence length of its own tokens (N, M <= L); the "
        "teacher's top-k ids mapped to student ids are as large as the cached ids; the token-level OT holds Stage 1's "
        "teacher embedding rows of the cached ids (worst case: all V, fp32), and what it saves for its backward is "
        "counted as resident (it runs before the other loss terms); its vocabulary passes are chunked like the loss"
    ),
    (
        "exact teacher (distill.teacher_head, w_kl > 0): Stage 2 holds the teacher's lm_head in the checkpoint's dtype "
        "(config torch_dtype, bf16 if none) with as many rows as the teacher's tokenizer has tokens - the size Stage 1 "
        "recorded in the cache, or config vocab_size before the cache exists (the label says which); the batch carries "
        "the teacher's decoded hidden states (fp32), and the loss a gathered copy of the supervised rows'; from a "
        "low-rank cache (cache.hidden_codec pca/svd/fisher:r) the head is folded into the basis: r columns, and the "
        "rows are r coefficients"
    ),
]


@dataclass
class Item:
    key: str  # stable name in the JSON / DVC metric
    label: str  # what the table says
    nbytes: float
    transient: bool = False  # a working set that never coexists with the other transients


@dataclass
class Budget:
    """One stage's memory: resident items plus the largest transient working set, then context and margin."""

    title: str
    items: list[Item]

    @property
    def peak(self) -> float:
        return sum(i.nbytes for i in self.items if not i.transient) + max(
            (i.nbytes for i in self.items if i.transient), default=0.0
        )

    @property
    def total(self) -> float:
        return self.peak * (1 + MARGIN) + CUDA_CONTEXT_GIB * GIB


def find_config(name: str) -> dict:
    """config.json of a local checkpoint folder, or of a hub name from the copies shipped in MODELS_DIR."""
    local = Path(name) / "config.json"
    shipped = MODELS_DIR / name.replace("/", "--") / "config.json"
    for f in (local, shipped):
        if f.is_file():
            return json.loads(f.read_text())
    known = sorted(d.name.replace("--", "/") for d in MODELS_DIR.iterdir() if (d / "config.json").is_file())
    raise mm.ModelConfigNotFoundError(
        f"no config.json for model {name!r}: not a local checkpoint folder, and not one of the shipped configs "
        f"({', '.join(known)}); name a local folder holding its config.json, or copy it to "
        f"{MODELS_DIR}/{name.replace('/', '--')}/config.json"
    )


def teacher_name(cfg: Config) -> str:
    """Stage 1's teacher; a teacher SFT output that does not exist yet has its base model's architecture."""
    c, f = cfg.cache, cfg.finetune
    if Path(c.teacher).resolve() == Path(f.out).resolve() and not (Path(c.teacher) / "config.json").is_file():
        return f.base
    return c.teacher


def cached_tokenizer_size(cfg: Config, t: mm.Arch) -> int | None:
    """The teacher tokenizer's size as Stage 1 recorded it in the provenance of distill.cache's train split (the rows
    of the teacher's lm_head that Stage 2 keeps, pipeline/distill/head.py), if that cache exists and was made by a
    teacher of t's logits and hidden sizes; else None. Reads the store's zarr.json only (no zarr, no torch)."""
    f = Path(cfg.distill.cache) / "train.zarr" / "zarr.json"
    try:
        prov = json.loads(f.read_text())["attributes"]["provenance"]
        n = int(prov["tokenizer_size"])
    except (OSError, ValueError, KeyError, TypeError):  # no cache yet, or not one this planner can read
        return None
    same = (prov.get("logits_size"), prov.get("hidden_size")) == (t.vocab, t.hidden)  # this teacher's cache
    return n if same and 0 < n <= t.vocab else None


def dtype_bytes(name: str) -> int:
    return 4 if name == "fp32" else 2  # auto: bf16 on a GPU


def _kind(bits: int, a: int) -> str:
    return {16: "bf16" if a == 2 else "fp32", 8: "int8", 4: "NF4"}[bits]


def stage1(cfg: Config, t: mm.Arch, seq: int) -> Budget:
    c = cfg.cache
    a, bits = dtype_bytes(c.dtype), t.prequantized if t.prequantized != 16 else c.load_in_bits
    tokens = max(c.batch_tokens, seq)
    padded = tokens > seq  # length batching puts several (unequal) sequences in one forward
    chunk = min(c.chunk_rows, tokens)
    # the decoder's output, its supervised rows (worst case: all), the top-k chunk and the batch's top-k results
    head = (
        2 * a * t.hidden * tokens + mm.topk_bytes(tokens, t.vocab, t.vocab, a, c.chunk_rows) + tokens * (12 * c.k + 4)
    )
    return Budget(
        f"Stage 1 - teacher {t.name} ({_kind(bits, a)}), {tokens:,} tokens per forward (sequence {seq:,})",
        [
            Item(
                "weights",
                f"weights ({t.params / 1e9:.2f} B parameters, {_kind(bits, a)})",
                mm.weight_bytes(t, bits, a, False) + mm.dequant_bytes(t, bits, a),
            ),
            Item(
                "forward",
                "forward: one layer's working set (no grad, no KV cache)",
                tokens * mm.infer_layer_bytes(t, a, padded, seq),
                True,
            ),
            Item(
                "head",
                f"head: hidden states + lm_head/top-k chunk ({chunk:,} x {t.vocab:,}) + top-{c.k} rows",
                head,
                True,
            ),
        ],
    )


def stage2(cfg: Config, s: mm.Arch, t: mm.Arch, seq: int) -> Budget:
    d = cfg.distill
    a, bits = dtype_bytes(d.dtype), s.prequantized if s.prequantized != 16 else d.load_in_bits
    kbit, B, k, cross = bits != 16, d.batch_size, cfg.cache.k, d.cross_tokenizer
    exact = bool(d.teacher_head and d.w_kl)  # the exact teacher: KL from cached hidden states through its lm_head
    # a low-rank cache (cache.hidden_codec pca/svd/fisher:r): the head is folded into the code's basis, (V, r) not
    # (V, D), and the exact KL reads the r coefficients (cache/codecs.py fold)
    rank = parse_codec(cfg.cache.hidden_codec)[1] if cfg.cache.hidden_codec != "none" else None
    t_width = rank or t.hidden
    lora = tuple(x for x in d.lora.target_modules if x in s.linears()) if d.mode == "lora" else None
    tokens, res, rows = B * seq, 4 if kbit else a, B * (seq - 1)  # worst case: every position has a row
    # learned D x d projections, fp32: P (teacher hidden states, w_ot), P_e (teacher embedding rows, w_tok_ot)
    named = {n: t.hidden * s.hidden for n, w in (("P", d.w_ot), ("P_e", d.w_tok_ot)) if w}
    proj, projs = list(named.values()), " + ".join(f"{n} ({v / 1e6:.1f} M)" for n, v in named.items())
    items = [
        Item(
            "weights",
            f"weights ({s.params / 1e9:.2f} B parameters, {_kind(bits, a)})",
            mm.weight_bytes(s, bits, a, kbit) + mm.dequant_bytes(s, bits, a),
        )
    ]
    if lora is not None:
        sizes = mm.lora_sizes(s, d.lora.r, lora)
        items += [
            Item(
                "trainable",
                f"LoRA r={d.lora.r} on {len(lora)} projections ({sum(sizes) / 1e6:.1f} M)"
                + (f" + {projs}, fp32" if proj else ", fp32"),
                4 * sum(sizes + proj),
            ),
            Item("gradients", "gradients", 4 * sum(sizes + proj)),
            Item("optimizer", f"optimizer states ({d.optim})", mm.optimizer_bytes(sizes + proj, 4, d.optim)),
        ]
    else:
        sizes = s.tensor_sizes()
        items += [Item("trainable", f"projection {projs}, fp32", 4 * sum(proj))] if proj else []
        items += [
            Item("gradients", "gradients", a * sum(sizes) + 4 * sum(proj)),
            Item(
                "optimizer",
                f"optimizer states ({d.optim})",
                mm.optimizer_bytes(sizes, a, d.optim) + mm.optimizer_bytes(proj, 4, d.optim),
            ),
        ]
    layer = tokens * mm.train_layer_bytes(s, a, kbit, lora, d.lora.r, d.lora.dropout, B > 1, seq)
    out = tokens * (4 + res) * s.hidden  # the final norm's fp32 input and the decoder's output
    if d.gradient_checkpointing:
        items += [
            Item(
                "activations",
                f"activations: the inputs of {s.layers} checkpointed layers",
                s.layers * tokens * res * s.hidden + out,
            ),
            Item("backward", "backward: one recomputed layer + its gradients", 2 * layer, True),
        ]
    else:
        items += [
            Item(
                "activations",
                f"activations: {s.layers} layers x {layer / tokens / 1024:.0f} KiB per token",
                s.layers * layer + out,
            ),
            Item("backward", "backward: one layer's gradients", layer, True),
        ]
    # every teacher-distribution term reads the top-k (pipeline/distill/batches.py cache_fields), the exact KL not
    targets = bool((d.w_kl and not exact) or d.w_ot_logits or d.w_uld or d.w_tok_ot)
    hidden = bool(d.w_ot or (exact and not rank))  # the teacher's hidden states, decoded to fp32 (B, M, D)
    code = bool(exact and rank)  # or a low-rank code's coefficients (B, M, r) for the folded exact teacher
    mapped = cross and targets  # their ids mapped to student ids (batches.collate_cross): as large as the cached ids
    # cross-tokenizer batches also carry per token the row alignment (long) and two row masks (bool): 10 B
    items.append(
        Item(
            "batch",
            "batch on the GPU (ids, labels"
            + (", top-k targets" if targets else "")
            + (", mapped ids" if mapped else "")
            + (", teacher hidden" if hidden else "")
            + (", teacher code)" if code else ")"),
            tokens
            * (
                34
                + 10 * cross
                + 2 * (12 * k + 4) * targets
                + 2 * 8 * k * mapped
                + 4 * t.hidden * hidden
                + 4 * t_width * code
            ),
        )
    )
    if exact:
        # the teacher's lm_head (pipeline/distill/head.py), a DistillModel buffer: sliced to the tokenizer's rows
        n = cached_tokenizer_size(cfg, t)
        where = "cache's tokenizer size" if n else "config vocab_size"  # no cache yet: the logits width
        dt = {"float32": "fp32", "float16": "fp16"}.get(t.stored_dtype, "bf16")
        folded = " folded" if rank else ""  # into the low-rank basis: r columns (see the assumptions)
        items.append(
            Item(
                "teacher_head",
                f"teacher lm_head (exact KL){folded}: {n or t.vocab:,} ({where}) x {t_width:,}, {dt}",
                mm.teacher_head_bytes(n or t.vocab, t_width, t.stored_bytes, bias=bool(rank)),
            )
        )
    if d.w_tok_ot:
        # Stage 1's teacher input-embedding rows of every cached top-k id (pipeline/teacher/cache_teacher.py
        # save_embedding_rows; a DistillModel buffer, fp32) and their index by id: worst case the whole vocabulary
        items.append(
            Item(
                "teacher_emb",
                f"teacher embedding rows of the cached ids (<= {t.vocab:,} x {t.hidden:,}), fp32",
                4 * t.vocab * t.hidden + 8 * t.vocab,
            )
        )
        saved, work = mm.tok_ot_bytes(rows, d.tok_ot_k, k, s.hidden, t.hidden)
        items.append(
            Item("tok_ot", f"token-level OT: saved for its backward ({k} teacher rows of {t.hidden:,} per row)", saved)
        )
        tok_work = Item("tok_ot_work", "token-level OT backward (its gradients beyond the saved)", work, True)
    # Stage 2 computes CE + KL straight from hidden states in row chunks, never (B, L, V) logits: against the cached
    # top-k (fused_ce_kl) or against the exact teacher (fused_ce_exact_kl, which also holds the supervised rows'
    # teacher hidden states, gathered from the batch: rows x D fp32)
    chunk = f"{min(mm.fused_chunk_rows(s.vocab), rows):,} rows x {s.vocab:,} per chunk"
    if exact:
        div = "JSD" if d.jsd_beta else "reverse KL" if d.kl_reverse else "KL"
        items.append(
            Item(
                "loss",
                f"fused CE + exact {div} ({chunk}) + teacher rows",
                mm.exact_loss_bytes(rows, s.vocab, s.vocab, s.hidden, t_width, d.mode == "full", bool(d.jsd_beta))
                + 4 * rows * t_width,
                True,
            )
        )
    else:
        items.append(
            Item(
                "loss",
                f"fused CE+KL ({chunk})",
                mm.fused_loss_bytes(rows, s.vocab, s.vocab, s.hidden, a, d.w_ce, d.w_kl, d.mode == "full"),
                True,
            )
        )
    items += [tok_work] if d.w_tok_ot else []
    if d.w_ot or d.w_ot_logits:
        items.append(
            Item(
                "ot",
                f"OT: Sinkhorn on {B} x {seq:,} x {seq:,}"
                + (" + top-k probabilities by block" if d.w_ot_logits else ""),
                mm.ot_bytes(B, seq, seq, s.vocab, k, bool(d.w_ot), bool(d.w_ot_logits)),
                True,
            )
        )
    return Budget(
        f"Stage 2 - student {s.name} ({_kind(bits, a)}{' + LoRA' if lora is not None else ', full'}), "
        f"{'cross-tokenizer, ' if cross else ''}batch {B} x sequence {seq:,}"
        f"{', gradient checkpointing' if d.gradient_checkpointing else ''}",
        items,
    )


def longest_fit(budget_at, gpu: float, limit: int, step: int = 128) -> int:
    """Longest sequence (a multiple of `step`, <= limit) whose budget fits in `gpu` bytes; 0 if none does."""
    lo, hi = 0, limit // step
    while lo < hi:  # memory grows with the sequence: binary search
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if budget_at(mid * step).total <= gpu else (lo, mid - 1)
    return lo * step


def plan(cfg: Config, gpu_gb: float = 24.0) -> dict:
    """Both stages' budgets at data.max_length, the verdicts and the longest sequences that fit."""
    t = mm.Arch.from_config(find_config(teacher_name(cfg)), teacher_name(cfg))
    s = mm.Arch.from_config(find_config(cfg.distill.student), cfg.distill.student)
    cross = cfg.distill.cross_tokenizer
    if not cross and (t.vocab < s.vocab - 512 or s.vocab < t.vocab - 512):
        raise mm.PlanError(
            f"teacher {t.name} ({t.vocab} logits) and student {s.name} ({s.vocab}) cannot share a "
            "tokenizer (distill.cross_tokenizer: true distils across tokenizers)"
        )
    gpu, seq = gpu_gb * GIB, cfg.data.max_length
    out = {
        "gpu_gib": gpu_gb,
        "seq_len": seq,
        "cross_tokenizer": cross,
        "vocab": {"teacher": t.vocab, "student": s.vocab},
        "assumptions": ASSUMPTIONS,
    }
    for name, at, arch in (("stage1", lambda n: stage1(cfg, t, n), t), ("stage2", lambda n: stage2(cfg, s, t, n), s)):
        b = at(seq)
        gib = {i.key: i.nbytes / GIB for i in b.items}
        top = max((i for i in b.items if i.transient), key=lambda i: i.nbytes)
        out[name] = {
            "title": b.title,
            "gib": {**gib, "context": CUDA_CONTEXT_GIB, "margin": b.peak * MARGIN / GIB},
            "labels": {i.key: i.label for i in b.items},
            "transient": [i.key for i in b.items if i.transient],
            "peak": top.key,
            "total_gib": b.total / GIB,
            "fits": b.total <= gpu,
            "max_seq_len": longest_fit(at, gpu, arch.max_positions),
        }
    return out


def table(p: dict) -> str:
    """The readable form of `plan`'s result."""
    lines = [f"VRAM plan on a {p['gpu_gib']:g} GiB GPU, in GiB"]
    if p["cross_tokenizer"]:
        lines.append(
            f"cross-tokenizer: Stage 1 on the teacher's vocabulary ({p['vocab']['teacher']:,} logits), "
            f"Stage 2 on the student's ({p['vocab']['student']:,})"
        )
    for name in ("stage1", "stage2"):
        st = p[name]
        lines += ["", st["title"]]
        lines += [
            f"  {st['labels'][key]:<76} {st['gib'][key]:6.2f}" for key in st["labels"] if key not in st["transient"]
        ]
        lines += ["  working sets that never coexist (the largest counts):"]
        lines += [
            f"    {st['labels'][key]:<74} {st['gib'][key]:6.2f}" + ("  <- peak" if key == st["peak"] else "")
            for key in st["transient"]
        ]
        lines += [
            f"  {'CUDA context':<76} {st['gib']['context']:6.2f}",
            f"  {f'allocator margin ({MARGIN:.0%})':<76} {st['gib']['margin']:6.2f}",
            f"  {'total':<76} {st['total_gib']:6.2f}  " + ("fits" if st["fits"] else "DOES NOT FIT"),
            f"  longest sequence that fits: {st['max_seq_len']:,} tokens",
        ]
    lines += ["", "Assumptions:"] + [
        textwrap.fill(x, 116, initial_indent="  - ", subsequent_indent="    ") for x in p["assumptions"]
    ]
    return "\n".join(lines)


def run(cfg: Config, gpu_gb: float = 24.0, out: str | None = None) -> dict:
    """Stage entry: print the table, write the JSON (a DVC metric) if `out` is given."""
    p = plan(cfg, gpu_gb)
    print(table(p))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**p, "versions": versions()}, indent=2))
    return p
