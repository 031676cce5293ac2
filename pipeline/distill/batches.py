"""The Stage-2 batch contract: which cache fields a run reads, how reads become padded tensors, and the cache
opening with its provenance check. Shared by training and evaluation; imports no loss code.

Row contract (cache/schema.py): row r of a sequence is the teacher's distribution over the token after the
r-th supervised position p_r, so it sits at student position p_r, whose logits predict that same token.
Batches keep the teacher rows compact, in row order, with their positions:

    row_pos (B, M) = p_r (0 on padding rows),  row_mask (B, M) = row exists,  teacher_* (B, M, ...)

The per-token losses read rows flattened to (R, ...) = x[row_mask], the sequence-level OT losses read them
per sequence (B, M, ...); neither needs them scattered over all L positions.
"""

from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from cache.errors import CacheMismatchError
from cache.reader import TeacherCache, describe, open_cache
from pipeline.config.distill import DistillConfig
from pipeline.data.records import IGNORE, tokenizer_hash
from pipeline.losses.kl import LOG_FLOOR

# Every loss term Stage 2 logs, in the order of the loss table (pipeline/distill/terms.py TERMS, which checks it
# on import): the loss curves' first columns and the run's metrics. Here rather than there because evaluation draws
# the curves and must not import loss code.
TERM_NAMES = ("uld", "tok_ot", "ce", "kl", "chunk_kl", "alm", "ot_hidden", "ot_logits")


class Batch(TypedDict, total=False):
    """One Stage-2 batch (a plain dict at run time, so Trainer / accelerate move it between devices)."""

    input_ids: torch.Tensor  # (B, L) long, right-padded with the tokenizer's pad id
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long: input_ids at p_r + 1 for every row r, else IGNORE
    row_pos: torch.Tensor  # (B, M) long: the student position of each teacher row
    row_mask: torch.Tensor  # (B, M) bool
    teacher_ids: torch.Tensor  # (B, M, k) long        only when KL or OT on logits is on
    teacher_logprobs: torch.Tensor  # (B, M, k) float32     (log-softmax over the full vocabulary)
    teacher_tail: torch.Tensor  # (B, M) float32        log of the mass outside the top-k
    teacher_observed: torch.Tensor  # (B, M) float32  log p of the observed next token (cache schema >= 4)
    teacher_hidden: torch.Tensor  # (B, M, D) float32     only for OT on hidden states or the exact teacher (decoded)
    teacher_code: torch.Tensor  # (B, M, r) float32     the exact teacher from a low-rank cache's coefficients
    # cross-tokenizer batches only (pipeline/distill/crosstok.py): input_ids / labels / row_pos are the student's
    # own tokens and rows (B, N); the teacher rows keep their cache order (B, M)
    teacher_mask: torch.Tensor  # (B, M) bool: teacher row exists and lies in the text both sides cover
    student_keep: torch.Tensor  # (B, N) bool: student row lies in the text both sides cover
    aligned: torch.Tensor  # (B, N) long: the teacher row aligned with student row i, or -1
    teacher_sids: torch.Tensor  # (B, M, k) long: teacher top-k ids mapped to student ids, -1 = unmapped
    alm_student: torch.Tensor  # (B, N) long: the chunk of each student row (crosstok.alm_chunks), -1 = none
    alm_teacher: torch.Tensor  # (B, M) long: the chunk of each teacher row, -1 = none
    # the chunk-level events of each student row (pipeline/distill/chunks.py), -1 / False = none
    chunk_first: torch.Tensor  # (B, N) long: the teacher row its token starts at
    chunk_last: torch.Tensor  # (B, N) long: the teacher row its token ends at
    ev_groups: torch.Tensor  # (B, N, k+1) long: teacher ids of the first-piece groups
    ev_singles: torch.Tensor  # (B, N, k+2) long: student ids of the completions, observed completion, run-end
    ev_boundary: torch.Tensor  # (B, N, k) bool: last-row slots after which the student's token ends


CHUNK_FIELDS = {
    "alm_student": "N",
    "alm_teacher": "M",
    "chunk_first": "N",
    "chunk_last": "N",
    "ev_groups": "N",
    "ev_singles": "N",
    "ev_boundary": "N",
}  # cross-tokenizer per-row fields and the side whose rows they follow


def cache_fields(d: DistillConfig, folded: bool = False) -> list[str]:
    """Only what the enabled losses need is read from disk (the CE baseline reads no teacher rows at all).
    folded: the exact teacher reads a low-rank cache's coefficients (its lm_head folded into the code's basis)."""
    fields = ["input_ids", "supervised"]
    exact_kl = bool(d.w_kl and d.teacher_head)  # the exact teacher reads hidden states instead of the top-k
    if (d.w_kl and not exact_kl) or d.w_ot_logits or d.w_uld or d.w_tok_ot or d.w_chunk_kl:
        fields += ["topk_ids", "topk_logprobs", "tail_logmass"]
    if d.w_chunk_kl or d.w_alm:  # products of the teacher's probabilities along the observed text
        fields += ["observed_logprob"]
    if d.w_ot or (exact_kl and not folded):
        fields += ["hidden"]
    if exact_kl and folded:
        fields += ["hidden_code"]
    return fields


def collate(reads: list[dict], pad_id: int, token_map: torch.Tensor | None = None) -> Batch:
    """`TeacherCache.read` dicts -> a right-padded `Batch` (padding to the longest sequence and most rows).
    Reads that carry the student's own tokens (cross-tokenizer, `crosstok.CrossBlocks`) go to `collate_cross`."""
    if "student_ids" in reads[0]:
        return collate_cross(reads, pad_id, token_map)
    B = len(reads)
    L = max(len(x["input_ids"]) for x in reads)
    pos = [np.flatnonzero(x["supervised"]) for x in reads]
    M = max(len(p) for p in pos)
    out = Batch(
        input_ids=torch.full((B, L), pad_id, dtype=torch.long),
        attention_mask=torch.zeros(B, L, dtype=torch.long),
        labels=torch.full((B, L), IGNORE, dtype=torch.long),
        row_pos=torch.zeros(B, M, dtype=torch.long),
        row_mask=torch.zeros(B, M, dtype=torch.bool),
    )
    teacher_rows(out, reads, M)
    for b, (x, p) in enumerate(zip(reads, pos)):
        n, r = len(x["input_ids"]), len(p)
        ids = torch.as_tensor(x["input_ids"], dtype=torch.long)
        tp = torch.as_tensor(p, dtype=torch.long)
        out["input_ids"][b, :n] = ids
        out["attention_mask"][b, :n] = 1
        out["labels"][b, tp + 1] = ids[tp + 1]  # the row at p predicts token p+1 (never p = n-1)
        out["row_pos"][b, :r] = tp
        out["row_mask"][b, :r] = True
    return out


def teacher_rows(out: Batch, reads: list[dict], M: int) -> None:
    """The teacher's row fields the reads carry, right-padded to M rows, into `out` (in place)."""
    B = len(reads)
    if "topk_ids" in reads[0]:
        k = reads[0]["topk_ids"].shape[1]
        # Fillers on padding rows are never read by the losses (masked); finite values keep it so.
        out["teacher_ids"] = torch.zeros(B, M, k, dtype=torch.long)
        out["teacher_logprobs"] = torch.full((B, M, k), LOG_FLOOR)
        out["teacher_tail"] = torch.full((B, M), LOG_FLOOR)
        for b, x in enumerate(reads):
            r = len(x["topk_ids"])
            out["teacher_ids"][b, :r] = torch.as_tensor(x["topk_ids"])
            out["teacher_logprobs"][b, :r] = torch.as_tensor(x["topk_logprobs"])
            out["teacher_tail"][b, :r] = torch.as_tensor(x["tail_logmass"])
    if "observed_logprob" in reads[0]:  # only when a loss asks for it (cache_fields): stores of schema >= 4
        out["teacher_observed"] = torch.full((B, M), LOG_FLOOR)
        for b, x in enumerate(reads):
            out["teacher_observed"][b, : len(x["observed_logprob"])] = torch.as_tensor(x["observed_logprob"])
    for field, key in (("hidden", "teacher_hidden"), ("hidden_code", "teacher_code")):
        if field in reads[0]:
            out[key] = torch.zeros(B, M, reads[0][field].shape[1])
            for b, x in enumerate(reads):
                out[key][b, : len(x[field])] = torch.as_tensor(x[field])


def collate_cross(reads: list[dict], pad_id: int, token_map: torch.Tensor | None) -> Batch:
    """Cross-tokenizer reads -> a `Batch` of the student's tokens (B, L) and rows (B, N) and the teacher's rows
    (B, M): the two sides are padded separately, `aligned` links them."""
    B = len(reads)
    L = max(len(x["student_ids"]) for x in reads)
    N = max(max(len(x["student_rows"]) for x in reads), 1)
    t_pos = [np.flatnonzero(x["supervised"]) for x in reads]
    M = max(max(len(p) for p in t_pos), 1)
    out = Batch(
        input_ids=torch.full((B, L), pad_id, dtype=torch.long),
        attention_mask=torch.zeros(B, L, dtype=torch.long),
        labels=torch.full((B, L), IGNORE, dtype=torch.long),
        row_pos=torch.zeros(B, N, dtype=torch.long),
        row_mask=torch.zeros(B, N, dtype=torch.bool),
        student_keep=torch.zeros(B, N, dtype=torch.bool),
        aligned=torch.full((B, N), -1, dtype=torch.long),
        teacher_mask=torch.zeros(B, M, dtype=torch.bool),
    )
    teacher_rows(out, reads, M)
    for b, (x, p) in enumerate(zip(reads, t_pos)):
        n, rows, r = len(x["student_ids"]), torch.as_tensor(x["student_rows"], dtype=torch.long), len(p)
        ids = torch.as_tensor(x["student_ids"], dtype=torch.long)
        out["input_ids"][b, :n] = ids
        out["attention_mask"][b, :n] = 1
        out["labels"][b, rows + 1] = ids[rows + 1]
        out["row_pos"][b, : len(rows)] = rows
        out["row_mask"][b, : len(rows)] = True
        out["student_keep"][b, : len(rows)] = torch.as_tensor(x["student_keep"])
        out["aligned"][b, : len(rows)] = torch.as_tensor(x["aligned"])
        out["teacher_mask"][b, :r] = torch.as_tensor(x["teacher_keep"])
    for key, size in CHUNK_FIELDS.items():  # pipeline/distill/chunks.py, crosstok.alm_chunks: -1 / False = none
        if key in reads[0]:
            x0 = np.asarray(reads[0][key])
            fill = False if x0.dtype == bool else -1
            out[key] = torch.full((B, M if size == "M" else N, *x0.shape[1:]), fill, dtype=torch.as_tensor(x0).dtype)
            for b, x in enumerate(reads):
                out[key][b, : len(x[key])] = torch.as_tensor(x[key])
    if "teacher_ids" in out and token_map is not None:
        ids = out["teacher_ids"]
        inside = ids < len(token_map)  # an id beyond the teacher's tokenizer is no token (padded logits)
        out["teacher_sids"] = torch.where(inside, token_map[ids.clamp_max(len(token_map) - 1)], -1)
    return out


class BlockCollator:
    """DataLoader collate_fn over `cache.CacheBlocks` items (each a list of reads): blocks -> one `Batch`.
    token_map: the teacher -> student id map of a cross-tokenizer run (`crosstok.token_map`)."""

    def __init__(self, pad_id: int, token_map: torch.Tensor | None = None):
        self.pad_id, self.token_map = pad_id, token_map

    def __call__(self, blocks: list[list[dict]]) -> Batch:
        return collate([x for block in blocks for x in block], self.pad_id, self.token_map)


def gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) at positions pos (B, M) -> (B, M, ...)."""
    idx = pos.view(*pos.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def open_checked(path: Path, tokenizer, student: str) -> TeacherCache:
    """open_cache + provenance check against the student's tokenizer (by hash: see data.records.tokenizer_hash)."""
    want = tokenizer_hash(tokenizer)
    try:
        return open_cache(path, expect={"tokenizer_hash": want})
    except CacheMismatchError:
        got = describe(path)["provenance"].get("tokenizer_hash")
        raise CacheMismatchError(
            f"teacher cache at {path} was made with another tokenizer (hash {got}) than the student {student} "
            f"uses (hash {want}); the teacher and the student must share one tokenizer, or set "
            "distill.cross_tokenizer=true to distil across tokenizers"
        ) from None


def curves_path(d: DistillConfig, split: str = "train") -> Path:
    """`<plots>/train_<name of out>.tsv`: the distilled and the CE-only students get distinct files; split="eval":
    `eval_<name of out>.tsv`, one row per evaluation on the validation cache (distill.eval_steps)."""
    return Path(d.plots) / f"{split}_{Path(d.out).name}.tsv"
