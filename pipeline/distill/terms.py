"""Stage 2's loss terms, listed once: `TERMS` is the table the training step sums and the loss curves log.

Each entry names the DistillConfig weights that switch it on, the values it logs, and a function that gathers the
term's tensors from `StepRows` and calls one pure loss of pipeline/losses/. A function returns its *weighted*
share of the step's loss (so that CE and KL, fused in one pass over the vocabulary, can be one entry) and its
*unweighted* values for logging, each scaled to read as the optimizer step's mean. Adding a term: a pure loss in
pipeline/losses/, its function here, one `Term` line (its logged name also in batches.TERM_NAMES, which evaluation
reads without importing loss code; a mismatch fails on import), one weight in DistillConfig, and its cache field in
batches.cache_fields if it reads one no term read before.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from pipeline.distill.batches import CHUNK_FIELDS, TERM_NAMES, Batch, gather_rows
from pipeline.losses.chunk import alm_loss, chunk_kl, chunk_teacher_events, event_logprobs
from pipeline.losses.crosstok import (
    bucket_kl,
    bucket_logprobs,
    mapped_teacher_buckets,
    student_topk,
    token_ot_loss,
    uld_loss,
)
from pipeline.losses.exact_kl import fused_ce_exact_kl
from pipeline.losses.fused_ce_kl import fused_ce_kl
from pipeline.losses.fused_ot import ot_logits_loss_from_hidden
from pipeline.losses.kl import LOG_FLOOR
from pipeline.losses.ot import ot_hidden_loss

if TYPE_CHECKING:  # the terms read the model's constants (P, the exact teacher's head, ...); model.py imports us
    from pipeline.distill.model import DistillModel

Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TeacherRows:
    """The teacher's side of a batch: its rows (B, M) in cache order and what the cache holds for each. A field is
    None when no enabled term reads it (batches.cache_fields)."""

    mask: torch.Tensor  # (B, M) bool: the row exists (and, across tokenizers, lies in the text both sides cover)
    ids: torch.Tensor | None  # (B, M, k) long: top-k ids, teacher vocabulary
    logprobs: torch.Tensor | None  # (B, M, k) float32: their log-probabilities over the full vocabulary
    tail: torch.Tensor | None  # (B, M) float32: log of the mass outside the top-k
    observed: torch.Tensor | None  # (B, M) float32: log p of the observed next token
    hidden: torch.Tensor | None  # (B, M, D) float32: final hidden state
    code: torch.Tensor | None  # (B, M, r) float32: a low-rank cache's coefficients (the exact teacher's input)
    sids: torch.Tensor | None  # (B, M, k) long: top-k ids mapped to student ids, -1 = unmapped (cross only)

    @classmethod
    def of(cls, batch: Batch) -> "TeacherRows":
        get = batch.get
        mask = batch["teacher_mask"] if "teacher_mask" in batch else batch["row_mask"]
        return cls(
            mask,
            get("teacher_ids"),
            get("teacher_logprobs"),
            get("teacher_tail"),
            get("teacher_observed"),
            get("teacher_hidden"),
            get("teacher_code"),
            get("teacher_sids"),
        )


@dataclass(frozen=True)
class StepRows:
    """What every term reads: the student's rows (B, N) and the teacher's (B, M), how they pair, the lm_head, and
    the counts that make each term a mean over the whole optimizer step (see DistillModel.forward)."""

    rows: torch.Tensor  # (B, N, d) the student's final (post-norm) hidden state at each of its rows
    row_mask: torch.Tensor  # (B, N) bool
    next_ids: torch.Tensor  # (B, N) long: the token each student row predicts
    keep: torch.Tensor  # (B, N) bool: the row lies in the text both sides cover (every row for one tokenizer)
    aligned: torch.Tensor  # (B, N) long: the teacher row aligned with each student row, -1 = none
    by_index: torch.Tensor  # (B, N) long: ULD's pairing, by index over the rows both sides keep, -1 = none
    teacher: TeacherRows
    chunks: dict  # the cross-tokenizer chunk fields (batches.CHUNK_FIELDS) the batch carries
    head_weight: torch.Tensor  # (V_logits, d) the student's lm_head
    head_bias: torch.Tensor | None
    n_items: torch.Tensor | int  # the optimizer step's supervised rows (CE/KL-like terms divide their sums by it)
    n_micro: int  # the step's micro-batches over all ranks (per-sequence means divide by it)
    cross: bool  # student and teacher tokenize differently (N != M)

    @classmethod
    def of(cls, batch: Batch, hidden, head, num_items_in_batch=None, n_micro: int = 1) -> "StepRows":
        """hidden: (B, L, d) the student's final hidden states over the batch's tokens; head: its lm_head."""
        row_pos, row_mask = batch["row_pos"], batch["row_mask"]  # (B, N)
        B, N = row_mask.shape
        ar = torch.arange(N, device=row_mask.device).expand(B, N)
        teacher = TeacherRows.of(batch)
        cross = "teacher_mask" in batch
        if cross:
            keep, aligned = batch["student_keep"], batch["aligned"]
            n_keep_t = teacher.mask.sum(-1, keepdim=True)  # (B, 1)
            by_index = torch.where(row_mask & keep & (ar < n_keep_t), ar, -1)  # the anchors' ULD rule
        else:  # one tokenizer: every row is aligned with itself
            keep, aligned = torch.ones_like(row_mask), torch.where(row_mask, ar, -1)
            by_index = aligned
        return cls(
            rows=gather_rows(hidden, row_pos),  # (B, N, d)
            row_mask=row_mask,
            next_ids=gather_rows(batch["input_ids"], row_pos + 1),  # (B, N)
            keep=keep,
            aligned=aligned,
            by_index=by_index,
            teacher=teacher,
            chunks={k: batch[k] for k in CHUNK_FIELDS if k in batch},
            head_weight=head.weight,
            head_bias=getattr(head, "bias", None),
            n_items=row_mask.sum() if num_items_in_batch is None else num_items_in_batch,
            n_micro=n_micro,
            cross=cross,
        )


# -- the terms: (model, step) -> (weighted share of the loss, unweighted parts to log) --------------------------


def ce_kl(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """One tokenizer: CE and KL fused in one chunked pass over the vocabulary, KL against the cached top-k + tail
    bucket, or against the exact teacher rebuilt from its cached hidden state (distill.teacher_head)."""
    cfg, t, mask = m.cfg, s.teacher, s.row_mask
    common = dict(
        w_ce=cfg.w_ce,
        w_kl=cfg.w_kl,
        temperature=cfg.temperature,
        reverse=cfg.kl_reverse,
        vocab_size=m.vocab_size,
        num_items=s.n_items,
        bias=s.head_bias,
    )
    if m.teacher_head and cfg.w_kl:
        # a low-rank code's coefficients, with the basis folded into teacher_weight: no D-wide hidden state
        t_h = (t.code if t.code is not None else t.hidden)[mask]  # (R, D) or (R, r)
        loss, terms = fused_ce_exact_kl(
            s.rows[mask],
            s.head_weight,
            t_h,
            m.teacher_weight,
            s.next_ids[mask],
            mask[mask],
            jsd_beta=cfg.jsd_beta,
            teacher_bias=m.teacher_bias,
            **common,
        )
    else:
        # the CE baseline reads no teacher rows; KL is off then and they are never used
        cached = (t.ids[mask], t.logprobs[mask], t.tail[mask]) if t.ids is not None else (None,) * 3  # (R, k) x2, (R,)
        loss, terms = fused_ce_kl(
            s.rows[mask], s.head_weight, s.next_ids[mask], *cached, mask[mask], tail=cfg.kl_tail, **common
        )
    return loss, {k: v * s.n_micro for k, v in terms.items()}  # a micro-batch's share -> the step's mean


def ce(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """Across tokenizers: CE on the student's own next tokens."""
    mask = s.row_mask
    value, terms = fused_ce_kl(
        s.rows[mask],
        s.head_weight,
        s.next_ids[mask],
        w_ce=1.0,
        w_kl=0.0,
        vocab_size=m.vocab_size,
        num_items=s.n_items,
        bias=s.head_bias,
    )
    return m.cfg.w_ce * value, {"ce": terms["ce"] * s.n_micro}


def mapped_kl(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """Across tokenizers: KL at aligned rows over the teacher's top-k mapped to identical student strings, plus one
    bucket for the rest."""
    cfg, t = m.cfg, s.teacher
    sel = s.aligned >= 0  # (B, N)
    b_idx = _batch_index(sel)[sel]
    j = s.aligned[sel]  # (R_a,)
    sids = t.sids[b_idx, j]  # (R_a, k)
    mapped = sids >= 0
    sp = bucket_logprobs(
        s.rows[sel],
        s.head_weight,
        torch.where(mapped, sids, 0),
        mapped,
        vocab_size=m.vocab_size,
        bias=s.head_bias,
        scale=cfg.temperature,
    )  # (R_a, k+1)
    tp = mapped_teacher_buckets(t.logprobs[b_idx, j], t.tail[b_idx, j], mapped)
    value = bucket_kl(
        sp, tp, mapped, torch.ones_like(j, dtype=torch.bool), temperature=cfg.temperature, num_items=s.n_items
    )
    aligned_share = sel.sum() / s.row_mask.sum().clamp_min(1)  # share of the student rows aligned
    return cfg.w_kl * value, {"kl": value * s.n_micro, "kl_aligned_rows": aligned_share}


def chunk_kl_term(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """Across tokenizers: KL over the exact chunk-level events at the student rows that have them
    (pipeline/losses/chunk.py; which rows and ids: pipeline/distill/chunks.py)."""
    x, t = s.chunks, s.teacher
    sel = (x["chunk_first"] >= 0) & s.row_mask  # (B, N)
    b_idx = _batch_index(sel)[sel]
    obs = t.observed.double()  # (B, M): sums of up to a sequence of log-probs, exact enough in float64
    j0, j1 = x["chunk_first"][sel], x["chunk_last"][sel]  # (R_e,) first / last teacher row of each token
    cum = obs.cumsum(1) - obs  # (B, M) exclusive: the observed log-probs of the rows before
    prefix = cum[b_idx, j1] - cum[b_idx, j0]  # (R_e,) rows j0 .. j1-1
    chunk = prefix + obs[b_idx, j1]
    groups, singles = x["ev_groups"][sel], x["ev_singles"][sel]  # (R_e, k+1), (R_e, k+2)
    ok = torch.cat([groups >= 0, singles >= 0], -1)  # (R_e, 2k+3)
    tp = chunk_teacher_events(
        t.logprobs[b_idx, j0].float(),
        obs[b_idx, j0].float(),
        t.logprobs[b_idx, j1].float(),
        prefix.float(),
        chunk.float(),
        x["ev_boundary"][sel],
        ok,
    )  # (R_e, 2k+4)
    sp = event_logprobs(
        s.rows[sel],
        s.head_weight,
        groups,
        singles,
        m.first_piece,
        n_teacher=m.n_teacher,
        vocab_size=m.vocab_size,
        bias=s.head_bias,
    )  # (R_e, 2k+4)
    value = chunk_kl(sp, tp, ok, torch.ones_like(j0, dtype=torch.bool), num_items=s.n_items)
    share = sel.sum() / s.row_mask.sum().clamp_min(1)  # share of the student rows with events
    return m.cfg.w_chunk_kl * value, {"chunk_kl": value * s.n_micro, "chunk_rows": share}


def alm(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """Across tokenizers: the likelihoods of the chunks both sides start and end at, matched (crosstok.alm_chunks)."""
    s_id, t_id = s.chunks["alm_student"], s.chunks["alm_teacher"]  # (B, N), (B, M) chunk ids, -1 = none
    sel, t_sel = (s_id >= 0) & s.row_mask, t_id >= 0
    n_chunks = int(s_id.max()) + 1 if sel.any() else 0
    s_lp = bucket_logprobs(
        s.rows[sel], s.head_weight, s.next_ids[sel][:, None], vocab_size=m.vocab_size, bias=s.head_bias
    )[:, 0]  # (R_c,)
    obs = s.teacher.observed.double()  # (B, M)
    b_s, b_t = _batch_index(sel)[sel], _batch_index(t_id)[t_sel]
    S = s_lp.new_zeros(s_id.shape[0], n_chunks).index_put((b_s, s_id[sel]), s_lp, accumulate=True)  # (B, C)
    T = obs.new_zeros(s_id.shape[0], n_chunks).index_put((b_t, t_id[t_sel]), obs[t_sel], accumulate=True)
    has = torch.zeros(S.shape, dtype=torch.bool, device=S.device)
    has[b_s, s_id[sel]] = True
    value = alm_loss(S[has], T[has].float(), torch.ones_like(S[has], dtype=torch.bool), s.n_items)
    return m.cfg.w_alm * value, {"alm": value * s.n_micro}


def uld(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """ULD at the rows paired by index: sorted probabilities compared, no map between the vocabularies needed."""
    t, sel = s.teacher, s.by_index >= 0
    b_idx, j, h = _batch_index(sel)[sel], s.by_index[sel], s.rows[sel]  # (R_u,), (R_u,), (R_u, d)
    own, _ = student_topk(h, s.head_weight, t.ids.shape[-1], vocab_size=m.vocab_size, bias=s.head_bias)  # (R_u, k)
    sp = bucket_logprobs(h, s.head_weight, own, vocab_size=m.vocab_size, bias=s.head_bias)  # (R_u, k+1)
    tp = torch.cat([t.logprobs[b_idx, j], t.tail[b_idx, j, None]], -1).float()  # (R_u, k+1)
    value = uld_loss(sp, tp, torch.ones_like(j, dtype=torch.bool), num_items=s.n_items)
    return m.cfg.w_uld * value, {"uld": value * s.n_micro}


def tok_ot(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """Token-level OT at the aligned rows, between the student's and the teacher's top-k in embedding geometry."""
    cfg, t, sel = m.cfg, s.teacher, s.aligned >= 0
    b_idx, j, h = _batch_index(sel)[sel], s.aligned[sel], s.rows[sel]
    own, std = student_topk(h, s.head_weight, cfg.tok_ot_k, vocab_size=m.vocab_size, bias=s.head_bias)  # (R_a, n)
    scale = cfg.temperature * std.clamp_min(1e-6) if cfg.tok_ot_adaptive_temp else cfg.temperature
    sp = bucket_logprobs(h, s.head_weight, own, vocab_size=m.vocab_size, bias=s.head_bias, scale=scale)[:, :-1]
    xs = m.student.get_input_embeddings().weight[own]  # (R_a, n, d)
    t_ids = t.ids[b_idx, j]  # (R_a, k) teacher vocabulary
    row = m.teacher_emb_index[t_ids.clamp_max(len(m.teacher_emb_index) - 1)]  # (R_a, k)
    if bool((row < 0).any()) or bool((t_ids >= len(m.teacher_emb_index)).any()):
        raise ValueError(
            "a cached teacher id has no saved teacher embedding row (teacher_embeddings file of another cache?)"
        )
    yt = m.teacher_emb[row]  # (R_a, k, D)
    log_b = t.logprobs[b_idx, j].float() / cfg.temperature  # (R_a, k), renormalised inside
    value = token_ot_loss(
        sp,
        xs,
        log_b,
        yt,
        m.tok_projection,
        torch.ones_like(j, dtype=torch.bool),
        eps=cfg.tok_ot_eps,
        num_items=s.n_items,
    )
    return cfg.w_tok_ot * value, {"tok_ot": value * s.n_micro}


def ot_hidden(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """Sequence-level OT between the student's kept rows and the teacher's, on hidden states through P."""
    x_mask = s.row_mask & s.keep  # (B, N)
    value, res = ot_hidden_loss(s.rows.float(), x_mask, s.teacher.hidden, s.teacher.mask, m.projection, solver=m.solver)
    return m.cfg.w_ot * value / s.n_micro, {"ot_hidden": value, **sinkhorn_report(res, x_mask, "hidden")}


def ot_logits(m: "DistillModel", s: StepRows) -> tuple[torch.Tensor, Parts]:
    """Sequence-level OT on log-probabilities at the teacher's top-k ids (across tokenizers: the ids mapped to
    student ids; unmapped teacher mass contributes nothing)."""
    t, x_mask = s.teacher, s.row_mask & s.keep
    ids, lp, parts = t.ids, t.logprobs, {}
    if t.sids is not None:
        mapped = t.sids >= 0  # (B, M, k)
        ids, lp = torch.where(mapped, t.sids, 0), torch.where(mapped, t.logprobs, LOG_FLOOR)
        mass = t.logprobs.float().exp()  # (B, M, k)
        parts["mapped_mass"] = (mass * mapped)[t.mask].sum() / mass[t.mask].sum().clamp_min(1e-12)
    value, res = ot_logits_loss_from_hidden(
        s.rows,
        s.head_weight,
        ids,
        lp,
        x_mask,
        t.mask,
        bias=s.head_bias,
        solver=m.solver,
        vocab_size=m.vocab_size,
        score_temperature=m.cfg.ot_logits_temperature,
    )
    return m.cfg.w_ot_logits * value / s.n_micro, {
        "ot_logits": value,
        **sinkhorn_report(res, x_mask, "logits"),
        **parts,
    }


@dataclass(frozen=True)
class Term:
    """One entry of the loss table."""

    fn: Callable[["DistillModel", StepRows], tuple[torch.Tensor, Parts]]
    weights: tuple[str, ...]  # DistillConfig fields; the term runs when any of them is non-zero
    logs: tuple[str, ...]  # its unweighted values' names in the logs, curves and metrics
    tokenizers: Literal["one", "cross", "both"] = "both"  # the runs it applies to

    def enabled(self, cfg, cross: bool) -> bool:
        if self.tokenizers != "both" and (self.tokenizers == "cross") != cross:
            return False
        return any(getattr(cfg, w) for w in self.weights)


# In the order they are summed (the loss's floating-point value depends on it, its gradient does not).
TERMS = (
    Term(uld, ("w_uld",), ("uld",)),
    Term(tok_ot, ("w_tok_ot",), ("tok_ot",)),
    Term(ce_kl, ("w_ce", "w_kl"), ("ce", "kl"), "one"),  # one pass over the vocabulary for both
    Term(ce, ("w_ce",), ("ce",), "cross"),
    Term(mapped_kl, ("w_kl",), ("kl",), "cross"),
    Term(chunk_kl_term, ("w_chunk_kl",), ("chunk_kl",), "cross"),
    Term(alm, ("w_alm",), ("alm",), "cross"),
    Term(ot_hidden, ("w_ot",), ("ot_hidden",)),
    Term(ot_logits, ("w_ot_logits",), ("ot_logits",)),
)
if tuple(dict.fromkeys(name for term in TERMS for name in term.logs)) != TERM_NAMES:
    raise ImportError("batches.TERM_NAMES must list every term's logged names in TERMS order (evaluation reads it)")


def sinkhorn_report(res, row_mask: torch.Tensor, name: str) -> Parts:
    """Mean iterations, share of this batch's OT problems that did not reach ot.tol within ot.max_iter, the worst
    L1 marginal error, and the cost's mean std(C)/mean(C) (how far from flat it is)."""
    live = row_mask.any(-1)  # (B,) sequences with rows: the others are empty problems, never iterated
    n = live.sum().clamp_min(1)
    out = {
        f"sinkhorn_iters_{name}": (res.n_iters * live).sum() / n,
        f"sinkhorn_capped_{name}": (~res.converged & live).sum() / n,
        f"sinkhorn_err_{name}": torch.where(live, res.err, 0.0).max(),
    }
    if res.cost_spread is not None:
        out[f"ot_cost_spread_{name}"] = (res.cost_spread * live).sum() / n
    return out


def _batch_index(x: torch.Tensor) -> torch.Tensor:
    """(B, N) -> the (B, N) index of each entry's sequence."""
    B, N = x.shape[:2]
    return torch.arange(B, device=x.device)[:, None].expand(B, N)
