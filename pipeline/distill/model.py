"""What Stage 2 trains, as one module: the student and the teacher -> student projection P.

`DistillModel.forward(batch)` is the whole training step's loss: the student's final hidden states at its rows,
then the weighted sum of the enabled terms of pipeline/distill/terms.py's table,

    L = w_ce CE + w_kl KL + w_ot OT_hidden + w_ot_logits OT_logits (+ the cross-tokenizer and token-level terms)

each a pure function of pipeline/losses/ that works from the hidden states and the lm_head weight in chunks of
rows, so no (tokens x vocab) tensor ever exists. Because P is a parameter of this module, Trainer (or DDP)
optimises, clips, checkpoints and all-reduces it with the student; nothing about it is special-cased.
"""

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pipeline.config.distill import DistillConfig
from pipeline.distill.batches import Batch
from pipeline.distill.terms import TERMS, StepRows
from pipeline.losses.ot import OTSolver

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
        cfg: DistillConfig,
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
        self.student, self.cfg, self.vocab_size = student, cfg, vocab_size
        self.solver = OTSolver(**dataclasses.asdict(cfg.ot))  # both OT terms' solver settings, validated once
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

    def forward(self, batch: Batch, num_items_in_batch=None, n_micro: int = 1) -> tuple[torch.Tensor, dict]:
        """A `Batch` (pipeline/distill/batches.py) -> (loss, parts): the sum of the enabled terms of `TERMS`, and
        every unweighted term plus Sinkhorn diagnostics, detached, for logging.

        Every term is a mean over the whole optimizer step, so micro-batch losses simply add up: the per-row terms
        divide their sums by num_items_in_batch (the step's row count, from Trainer; default this batch's), the
        per-sequence OT means divide by n_micro (micro-batches in the step, over all ranks).
        """
        unknown = set(batch) - set(Batch.__annotations__)
        if unknown:
            raise TypeError(f"DistillModel.forward got unexpected batch fields {sorted(unknown)}")
        decoder = self.student.get_decoder()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        step = StepRows.of(batch, hidden, self.student.get_output_embeddings(), num_items_in_batch, n_micro)
        loss, parts = hidden.new_zeros((), dtype=torch.float32), {}
        for term in TERMS:
            if term.enabled(self.cfg, step.cross):
                value, logged = term.fn(self, step)
                loss = loss + value
                parts.update(logged)
        return loss, {k: v.detach().float() for k, v in parts.items()}

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


def load_projection(path: str | Path, name: str = PROJECTION_FILE) -> torch.Tensor | None:
    """The (D, d) projection saved with a Stage-2 student, or None if it was trained without hidden-state OT
    (name=TOK_PROJECTION_FILE: P_e of the token-level OT)."""
    f = Path(path) / name
    return torch.load(f, map_location="cpu", weights_only=True) if f.exists() else None
