"""What Stage 2 trains, as one module: the student and the teacher -> student projection P.

`DistillModel.forward(**batch)` is the whole training step's loss,

    L = w_ce * CE + w_kl * KL + w_ot * OT_hidden + w_ot_logits * OT_logits

computed by the pure functions of pipeline/losses/ from the student's final hidden states: CE + KL chunked
over rows (`fused_ce_kl` on the cached top-k, or `fused_ce_exact_kl` over the whole vocabulary against the
teacher rebuilt from its cached hidden state when distill.teacher_head is set) and OT on logits built only at
the teacher's top-k ids (`ot_logits_loss_from_hidden`), so no (tokens x vocab) tensor ever exists. Because P is
a parameter of this module, Trainer (or DDP) optimises, clips, checkpoints and all-reduces it with the student;
nothing about it is special-cased.

Adding a loss term: a pure function in pipeline/losses/, one line in `forward`, one weight in DistillConfig.
"""

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pipeline.config.distill import DistillConfig
from pipeline.distill.batches import CHUNK_FIELDS, gather_rows
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
from pipeline.losses.ot import OTSolver, ot_hidden_loss

PROJECTION_FILE = "projection.pt"  # the learned teacher -> student projection P, saved next to the student
TOK_PROJECTION_FILE = "tok_projection.pt"  # P_e of the token-level OT (teacher -> student embedding space)


class DistillModel(nn.Module):
    """The student (a transformers model, or a peft model around one) and P (D, d), trained together.

    Its state (`state_dict`) is what trains: the LoRA adapters (or every student weight) and P. A checkpoint
    therefore holds no copy of a frozen, possibly 4-bit base; resuming rebuilds the base from distill.student
    and loads the state on top. `save_pretrained` writes the student in its own format (plain checkpoint or
    peft adapter, loadable with from_pretrained) and P beside it.
    """

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch: the optimizer step's supervised tokens

    def __init__(
        self,
        student: nn.Module,
        d: DistillConfig,
        vocab_size: int,
        projection: torch.Tensor | None,
        tok_projection: torch.Tensor | None = None,
        teacher_embeddings: tuple | None = None,
        teacher_head: tuple | None = None,
        chunk_events: tuple | None = None,
    ):
        super().__init__()
        # the chunk-level KL: each student id's first piece (V,) and the teacher's vocabulary size (a constant)
        if chunk_events is not None:
            self.register_buffer("first_piece", chunk_events[0], persistent=False)
            self.n_teacher = chunk_events[1]
        self.student, self.d, self.vocab_size = student, d, vocab_size
        self.solver = OTSolver(**dataclasses.asdict(d.ot))  # both OT terms' solver settings, validated once
        # the exact teacher (distill.teacher_head): its lm_head (V, D) (+ bias), or for a low-rank cache that head
        # folded into the code's basis (V, r) (cache/codecs.py fold); a constant like the cache, not state
        self.teacher_head = teacher_head is not None
        if teacher_head is not None:
            self.register_buffer("teacher_weight", teacher_head[0], persistent=False)
            self.register_buffer("teacher_bias", teacher_head[1], persistent=False)
        self.projection = None if projection is None else nn.Parameter(projection)
        # token-level OT: P_e (D, d) and the teacher's embedding rows of its cached ids (a constant, not state)
        self.tok_projection = None if tok_projection is None else nn.Parameter(tok_projection)
        if teacher_embeddings is not None:
            ids, rows = teacher_embeddings  # (n,), (n, D)
            index = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
            index[ids] = torch.arange(len(ids))
            self.register_buffer("teacher_emb_index", index, persistent=False)
            self.register_buffer("teacher_emb", rows.float(), persistent=False)

    def forward(
        self,
        input_ids,
        attention_mask,
        row_pos,
        row_mask,
        labels=None,
        teacher_ids=None,
        teacher_logprobs=None,
        teacher_tail=None,
        teacher_hidden=None,
        teacher_code=None,
        teacher_mask=None,
        student_keep=None,
        aligned=None,
        teacher_sids=None,
        teacher_observed=None,
        num_items_in_batch=None,
        n_micro: int = 1,
        **chunks,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A `Batch` (pipeline/distill/batches.py) -> (loss, parts): the weighted loss, and every unweighted
        term plus Sinkhorn diagnostics, detached, for logging.

        Every term is a mean over the whole optimizer step, so micro-batch losses simply add up: CE and KL
        divide their sums over rows by num_items_in_batch (the step's row count, from Trainer; default this
        batch's), the per-sequence OT means divide by n_micro (micro-batches in the step, over all ranks).
        A cross-tokenizer batch (teacher_mask given) goes to `_cross_terms`; `chunks` are its CHUNK_FIELDS.
        """
        unknown = set(chunks) - set(CHUNK_FIELDS)
        if unknown:
            raise TypeError(f"DistillModel.forward got unexpected batch fields {sorted(unknown)}")
        d, V = self.d, self.vocab_size
        n_items = row_mask.sum() if num_items_in_batch is None else num_items_in_batch
        decoder, head = self.student.get_decoder(), self.student.get_output_embeddings()
        bias = getattr(head, "bias", None)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, d)
        rows = gather_rows(hidden, row_pos)  # (B, M, d) final (post-norm) state at each teacher row
        loss, parts = hidden.new_zeros((), dtype=torch.float32), {}
        if teacher_mask is not None:
            return self._cross_terms(
                rows,
                row_mask,
                input_ids,
                row_pos,
                teacher_ids,
                teacher_logprobs,
                teacher_tail,
                teacher_hidden,
                teacher_mask,
                student_keep,
                aligned,
                teacher_sids,
                n_items,
                n_micro,
                teacher_observed,
                chunks,
            )
        if d.w_uld or d.w_tok_ot:  # same tokenizer: every row is aligned with itself
            B, M = row_mask.shape
            same = torch.where(row_mask, torch.arange(M, device=row_mask.device), -1).expand(B, M)
            loss, parts = self._token_terms(
                rows, same, same, teacher_ids, teacher_logprobs, teacher_tail, n_items, n_micro
            )

        if d.w_ce or d.w_kl:
            targets = gather_rows(input_ids, row_pos + 1)[row_mask]  # (R,) the token each row predicts
            if self.teacher_head and d.w_kl:  # the teacher's exact distribution from its cached hidden state
                # (or from a low-rank code's coefficients, with the basis folded into teacher_weight: no D-wide h)
                t_h = (teacher_code if teacher_code is not None else teacher_hidden)[row_mask]  # (R, D) or (R, r)
                ce_kl, terms = fused_ce_exact_kl(
                    rows[row_mask],
                    head.weight,
                    t_h,
                    self.teacher_weight,
                    targets,
                    row_mask[row_mask],
                    w_ce=d.w_ce,
                    w_kl=d.w_kl,
                    temperature=d.temperature,
                    reverse=d.kl_reverse,
                    jsd_beta=d.jsd_beta,
                    vocab_size=V,
                    num_items=n_items,
                    bias=bias,
                    teacher_bias=self.teacher_bias,
                )
            else:
                if teacher_ids is not None:  # (R, k), (R, k), (R,)
                    t_ids, t_lp, t_tail = teacher_ids[row_mask], teacher_logprobs[row_mask], teacher_tail[row_mask]
                else:  # the CE baseline reads no teacher rows; KL is off, these are never used
                    t_ids = t_lp = t_tail = None
                ce_kl, terms = fused_ce_kl(
                    rows[row_mask],
                    head.weight,
                    targets,
                    t_ids,
                    t_lp,
                    t_tail,
                    row_mask[row_mask],
                    w_ce=d.w_ce,
                    w_kl=d.w_kl,
                    temperature=d.temperature,
                    tail=d.kl_tail,
                    reverse=d.kl_reverse,
                    vocab_size=V,
                    num_items=n_items,
                    bias=bias,
                )
            loss = loss + ce_kl
            # A micro-batch's share of the step's token mean; x n_micro reads as the step's mean in the logs.
            parts.update({k: v * n_micro for k, v in terms.items()})
        if d.w_ot:
            parts["ot_hidden"], res = ot_hidden_loss(
                rows.float(),
                row_mask,
                teacher_hidden,
                row_mask,
                self.projection,
                solver=self.solver,
            )
            loss = loss + d.w_ot * parts["ot_hidden"] / n_micro
            parts.update(sinkhorn_report(res, row_mask, "hidden"))
        if d.w_ot_logits:
            parts["ot_logits"], res = ot_logits_loss_from_hidden(
                rows,
                head.weight,
                teacher_ids,
                teacher_logprobs,
                row_mask,
                row_mask,
                bias=bias,
                solver=self.solver,
                vocab_size=V,
                score_temperature=d.ot_logits_temperature,
            )
            loss = loss + d.w_ot_logits * parts["ot_logits"] / n_micro
            parts.update(sinkhorn_report(res, row_mask, "logits"))
        return loss, {k: v.detach().float() for k, v in parts.items()}

    def _cross_terms(
        self,
        rows,
        row_mask,
        input_ids,
        row_pos,
        teacher_ids,
        teacher_logprobs,
        teacher_tail,
        teacher_hidden,
        teacher_mask,
        student_keep,
        aligned,
        teacher_sids,
        n_items,
        n_micro,
        teacher_observed=None,
        chunks=None,
    ):
        """The loss of a cross-tokenizer batch: student rows (B, N) against teacher rows (B, M), N != M.

        CE on the student's own labels; w_kl: KL at aligned rows over the teacher's top-k mapped to identical
        student strings + one bucket for the rest; w_ot: hidden-state OT between both sides' kept rows; w_ot_logits:
        OT over the mapped ids (unmapped teacher mass contributes nothing); w_uld, w_tok_ot: `_token_terms`;
        w_chunk_kl, w_alm: `_chunk_terms`.
        """
        d, V = self.d, self.vocab_size
        head = self.student.get_output_embeddings()
        W, bias = head.weight, getattr(head, "bias", None)
        B, N = row_mask.shape
        ar = torch.arange(N, device=row_mask.device).expand(B, N)
        # ULD pairs rows by index (the anchors' rule), over the rows both sides keep
        n_keep_t = teacher_mask.sum(-1, keepdim=True)  # (B, 1)
        by_index = torch.where(row_mask & student_keep & (ar < n_keep_t), ar, -1)
        loss, parts = self._token_terms(
            rows, aligned, by_index, teacher_ids, teacher_logprobs, teacher_tail, n_items, n_micro
        )
        if d.w_ce:
            targets = gather_rows(input_ids, row_pos + 1)[row_mask]  # (R,)
            ce, terms = fused_ce_kl(
                rows[row_mask], W, targets, w_ce=1.0, w_kl=0.0, vocab_size=V, num_items=n_items, bias=bias
            )
            loss = loss + d.w_ce * ce
            parts["ce"] = terms["ce"] * n_micro
        if d.w_kl:
            sel = aligned >= 0  # (B, N)
            b_idx = torch.arange(B, device=sel.device)[:, None].expand(B, N)[sel]
            j = aligned[sel]  # (R_a,)
            sids = teacher_sids[b_idx, j]  # (R_a, k)
            mapped = sids >= 0
            s = bucket_logprobs(
                rows[sel], W, torch.where(mapped, sids, 0), mapped, vocab_size=V, bias=bias, scale=d.temperature
            )  # (R_a, k+1)
            t = mapped_teacher_buckets(teacher_logprobs[b_idx, j], teacher_tail[b_idx, j], mapped)
            parts["kl"] = bucket_kl(
                s, t, mapped, torch.ones_like(j, dtype=torch.bool), temperature=d.temperature, num_items=n_items
            )
            loss = loss + d.w_kl * parts["kl"]
            parts["kl"] = parts["kl"] * n_micro
            parts["kl_aligned_rows"] = sel.sum() / row_mask.sum().clamp_min(1)  # share of student rows aligned
        if d.w_chunk_kl or d.w_alm:
            chunk_loss, chunk_parts = self._chunk_terms(
                rows, row_mask, input_ids, row_pos, teacher_logprobs, teacher_observed, chunks, n_items, n_micro
            )
            loss = loss + chunk_loss
            parts.update(chunk_parts)
        x_mask = row_mask & student_keep
        if d.w_ot:
            parts["ot_hidden"], res = ot_hidden_loss(
                rows.float(),
                x_mask,
                teacher_hidden,
                teacher_mask,
                self.projection,
                solver=self.solver,
            )
            loss = loss + d.w_ot * parts["ot_hidden"] / n_micro
            parts.update(sinkhorn_report(res, x_mask, "hidden"))
        if d.w_ot_logits:
            mapped = teacher_sids >= 0  # (B, M, k)
            parts["ot_logits"], res = ot_logits_loss_from_hidden(
                rows,
                W,
                torch.where(mapped, teacher_sids, 0),
                torch.where(mapped, teacher_logprobs, LOG_FLOOR),
                x_mask,
                teacher_mask,
                bias=bias,
                solver=self.solver,
                vocab_size=V,
                score_temperature=d.ot_logits_temperature,
            )
            loss = loss + d.w_ot_logits * parts["ot_logits"] / n_micro
            parts.update(sinkhorn_report(res, x_mask, "logits"))
            mass = teacher_logprobs.float().exp()  # (B, M, k)
            parts["mapped_mass"] = (mass * mapped)[teacher_mask].sum() / mass[teacher_mask].sum().clamp_min(1e-12)
        return loss, {k: v.detach().float() for k, v in parts.items()}

    def _chunk_terms(self, rows, row_mask, input_ids, row_pos, teacher_logprobs, observed, x, n_items, n_micro):
        """The chunk-level KL at the student rows with events, and ALM over the chunks both sides start and end at
        (pipeline/losses/chunk.py; which rows and ids: pipeline/distill/chunks.py). Returns (weighted loss, parts)."""
        d, V = self.d, self.vocab_size
        head = self.student.get_output_embeddings()
        W, bias = head.weight, getattr(head, "bias", None)
        B, N = row_mask.shape
        b_all = torch.arange(B, device=rows.device)[:, None]
        loss, parts = rows.new_zeros((), dtype=torch.float32), {}
        obs = observed.double()  # (B, M): sums of up to a sequence of log-probs, exact enough in float64
        if d.w_chunk_kl:
            sel = (x["chunk_first"] >= 0) & row_mask  # (B, N)
            b_idx = b_all.expand(B, N)[sel]
            j0, j1 = x["chunk_first"][sel], x["chunk_last"][sel]  # (R_e,) first / last teacher row of each token
            cum = obs.cumsum(1) - obs  # (B, M) exclusive: the observed log-probs of the rows before
            prefix = cum[b_idx, j1] - cum[b_idx, j0]  # (R_e,) rows j0 .. j1-1
            chunk = prefix + obs[b_idx, j1]
            groups, singles = x["ev_groups"][sel], x["ev_singles"][sel]  # (R_e, k+1), (R_e, k+2)
            ok = torch.cat([groups >= 0, singles >= 0], -1)  # (R_e, 2k+3)
            t = chunk_teacher_events(
                teacher_logprobs[b_idx, j0].float(),
                obs[b_idx, j0].float(),
                teacher_logprobs[b_idx, j1].float(),
                prefix.float(),
                chunk.float(),
                x["ev_boundary"][sel],
                ok,
            )  # (R_e, 2k+4)
            s = event_logprobs(
                rows[sel], W, groups, singles, self.first_piece, n_teacher=self.n_teacher, vocab_size=V, bias=bias
            )  # (R_e, 2k+4)
            parts["chunk_kl"] = chunk_kl(s, t, ok, torch.ones_like(j0, dtype=torch.bool), num_items=n_items)
            loss = loss + d.w_chunk_kl * parts["chunk_kl"]
            parts["chunk_kl"] = parts["chunk_kl"] * n_micro
            parts["chunk_rows"] = sel.sum() / row_mask.sum().clamp_min(1)  # share of student rows with events
        if d.w_alm:
            s_id, t_id = x["alm_student"], x["alm_teacher"]  # (B, N), (B, M) chunk ids, -1 = none
            sel, t_sel = (s_id >= 0) & row_mask, t_id >= 0
            n_chunks = int(s_id.max()) + 1 if sel.any() else 0
            targets = gather_rows(input_ids, row_pos + 1)[sel]  # (R_c,)
            s_lp = bucket_logprobs(rows[sel], W, targets[:, None], vocab_size=V, bias=bias)[:, 0]  # (R_c,)
            b_s, b_t = b_all.expand(B, N)[sel], b_all.expand(t_id.shape)[t_sel]
            S = s_lp.new_zeros(B, n_chunks).index_put((b_s, s_id[sel]), s_lp, accumulate=True)  # (B, C)
            T = obs.new_zeros(B, n_chunks).index_put((b_t, t_id[t_sel]), obs[t_sel], accumulate=True)
            has = torch.zeros(B, n_chunks, dtype=torch.bool, device=rows.device)
            has[b_s, s_id[sel]] = True
            parts["alm"] = alm_loss(S[has], T[has].float(), torch.ones_like(S[has], dtype=torch.bool), n_items)
            loss = loss + d.w_alm * parts["alm"]
            parts["alm"] = parts["alm"] * n_micro
        return loss, parts

    def _token_terms(self, rows, aligned, by_index, teacher_ids, teacher_logprobs, teacher_tail, n_items, n_micro):
        """ULD at the rows paired by `by_index`, token-level OT at the rows paired by `aligned` ((B, N) teacher row
        or -1 each); both need no map between the vocabularies. Returns (weighted loss, parts)."""
        d, V = self.d, self.vocab_size
        head = self.student.get_output_embeddings()
        W, bias = head.weight, getattr(head, "bias", None)
        B, N = aligned.shape
        loss, parts = rows.new_zeros((), dtype=torch.float32), {}
        b_all = torch.arange(B, device=rows.device)[:, None].expand(B, N)
        if d.w_uld:
            sel = by_index >= 0
            b_idx, j, h = b_all[sel], by_index[sel], rows[sel]  # (R_u,), (R_u,), (R_u, d)
            k = teacher_ids.shape[-1]
            own, _ = student_topk(h, W, k, vocab_size=V, bias=bias)  # (R_u, k)
            s = bucket_logprobs(h, W, own, vocab_size=V, bias=bias)  # (R_u, k+1)
            t = torch.cat([teacher_logprobs[b_idx, j], teacher_tail[b_idx, j, None]], -1).float()  # (R_u, k+1)
            parts["uld"] = uld_loss(s, t, torch.ones_like(j, dtype=torch.bool), num_items=n_items)
            loss = loss + d.w_uld * parts["uld"]
            parts["uld"] = parts["uld"] * n_micro
        if d.w_tok_ot:
            sel = aligned >= 0
            b_idx, j, h = b_all[sel], aligned[sel], rows[sel]
            own, std = student_topk(h, W, d.tok_ot_k, vocab_size=V, bias=bias)  # (R_a, n), (R_a,)
            scale = d.temperature * std.clamp_min(1e-6) if d.tok_ot_adaptive_temp else d.temperature
            s = bucket_logprobs(h, W, own, vocab_size=V, bias=bias, scale=scale)[:, :-1]  # (R_a, n)
            xs = self.student.get_input_embeddings().weight[own]  # (R_a, n, d)
            t_ids = teacher_ids[b_idx, j]  # (R_a, k) teacher vocabulary
            row = self.teacher_emb_index[t_ids.clamp_max(len(self.teacher_emb_index) - 1)]  # (R_a, k)
            if bool((row < 0).any()) or bool((t_ids >= len(self.teacher_emb_index)).any()):
                raise ValueError(
                    "a cached teacher id has no saved teacher embedding row (teacher_embeddings file of another cache?)"
                )
            yt = self.teacher_emb[row]  # (R_a, k, D)
            log_b = teacher_logprobs[b_idx, j].float() / d.temperature  # (R_a, k), renormalised inside
            parts["tok_ot"] = token_ot_loss(
                s,
                xs,
                log_b,
                yt,
                self.tok_projection,
                torch.ones_like(j, dtype=torch.bool),
                eps=d.tok_ot_eps,
                num_items=n_items,
            )
            loss = loss + d.w_tok_ot * parts["tok_ot"]
            parts["tok_ot"] = parts["tok_ot"] * n_micro
        return loss, parts

    # -- state = what trains ---------------------------------------------------------------------------
    def state_dict(self, *, prefix: str = "", keep_vars: bool = False, **_) -> dict[str, torch.Tensor]:
        """The trainable tensors only (adapters or all student weights, and P), by parameter name.

        Tied weights (embedding = lm_head) appear once, which is also what safetensors requires.
        """
        return {prefix + n: p if keep_vars else p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a `state_dict()`; only trainable tensors count as missing (the frozen base is already loaded)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        result = result._replace(missing_keys=[k for k in result.missing_keys if k in trainable])
        if strict and (result.missing_keys or result.unexpected_keys):
            raise RuntimeError(
                f"DistillModel state: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
            )
        return result

    def save_pretrained(self, out: str | Path, tokenizer=None) -> None:
        """The student as from_pretrained / peft load it, P as `projection.pt` beside it, and the tokenizer."""
        out = Path(out)
        self.student.save_pretrained(str(out))
        if self.projection is not None:
            torch.save(self.projection.detach().cpu(), out / PROJECTION_FILE)
        if self.tok_projection is not None:
            torch.save(self.tok_projection.detach().cpu(), out / TOK_PROJECTION_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))


def sinkhorn_report(res, row_mask: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
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


def load_projection(path: str | Path, name: str = PROJECTION_FILE) -> torch.Tensor | None:
    """The (D, d) projection saved with a Stage-2 student, or None if it was trained without hidden-state OT
    (name=TOK_PROJECTION_FILE: P_e of the token-level OT)."""
    f = Path(path) / name
    return torch.load(f, map_location="cpu", weights_only=True) if f.exists() else None
