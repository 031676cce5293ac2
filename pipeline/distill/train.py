"""Stage 2: train the student alone against the streamed teacher cache, with transformers.Trainer.

Trainer sees one module, `DistillModel` (student + projection P, pipeline/distill/model.py), whose forward is
the whole loss. `DistillTrainer.compute_loss` only passes the batch and the step's counts to it and keeps the
loss parts for logging. Batches are whole blocks of neighbouring cache entries (`cache.CacheBlocks`): one Zarr
slice per field, shuffled and sharded by Trainer's own sampler.
"""

import csv
import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from cache import location
from cache.codecs import fold
from cache.errors import CacheMismatchError, OtkdError
from cache.location import join, loc
from cache.reader import CacheBlocks, open_cache
from cache.schema import EMBEDDINGS_FILE
from pipeline.config.base import save_config
from pipeline.config.distill import DistillConfig, DistillParams
from pipeline.distill import crosstok
from pipeline.distill.batches import TERM_NAMES, BlockCollator, cache_fields, curves_path, open_checked
from pipeline.distill.chunks import ChunkEvents
from pipeline.distill.crosstok import CrossBlocks, StudentSide, load_teacher_tokenizer
from pipeline.distill.head import load_teacher_head
from pipeline.distill.model import PROJECTION_FILE, TOK_PROJECTION_FILE, DistillModel, load_projection
from pipeline.distill.student import load_student
from pipeline.losses.ot import init_projection
from pipeline.models import check_max_length, check_vocab, compute_dtype, load_tokenizer

# Warn (once per run) when more than this share of a logging window's OT problems did not converge.
SINKHORN_CAPPED_WARN = 0.05
FLAT_COST = 1e-3  # std(C)/mean(C) below which an OT term's cost is called flat (a warning, once per term)


class NonFiniteLossError(OtkdError):
    """The training loss or gradient became NaN or inf; training stops instead of continuing on garbage."""


class DistillTrainer(Trainer):
    """Trainer whose loss is `DistillModel`'s; logs the mean of every loss part between two log lines."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._warned_capped = False
        self._warned_flat: set[str] = set()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Micro-batches in this optimizer step, over all data-parallel ranks: the OT terms are per-sequence
        # means, so each micro-batch contributes 1/n_micro of them (CE/KL are normalised by num_items_in_batch).
        world = self.accelerator.num_processes
        n_micro = self.current_gradient_accumulation_steps * world if model.training else 1
        loss, parts = model(inputs, num_items_in_batch=num_items_in_batch, n_micro=n_micro)
        if not torch.isfinite(loss):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items() if not k.startswith("sinkhorn_"))
            where = f"training step {self.state.global_step + 1}" if model.training else "evaluation"
            raise NonFiniteLossError(
                f"non-finite loss at {where} ({values}); training stopped — check the "
                f"teacher cache for NaN/inf values or lower distill.lr"
            )
        mode = "train" if model.training else "eval"
        for k, v in parts.items():
            self._parts[mode][k].append(v.item())
        if model.training:
            # The loss is this rank's share of the step's global mean, and DDP *averages* the ranks' gradients:
            # x world makes the sum over ranks (what Trainer's own compute_loss does with num_items_in_batch).
            loss = loss * world
        return (loss, {"loss": loss}) if return_outputs else loss  # evaluation reads outputs as a mapping

    def log(self, logs: dict, start_time=None) -> None:
        """Add the mean of every loss part since the last log (train) or over the eval set (eval_*)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if mode == "eval" or "loss" in logs:  # not the end-of-training summary
            prefix = "eval_" if mode == "eval" else ""
            means = {k: sum(v) / len(v) for k, v in self._parts[mode].items() if v}
            if self.accelerator.num_processes > 1 and means:  # every rank logs at the same step: average them
                keys = sorted(means)
                t = self.accelerator.reduce(torch.tensor([means[k] for k in keys], device=self.args.device), "mean")
                means = dict(zip(keys, t.tolist()))
            logs.update({prefix + k: v for k, v in means.items()})
            self._parts[mode].clear()
            self._warn_unconverged(logs)
            self._warn_flat(logs)
        super().log(logs, start_time)

    def _warn_flat(self, logs: dict) -> None:
        """Once per OT term: its cost barely varies (std/mean below FLAT_COST), so its plan is close to the uniform
        one and its gradient carries little about the alignment."""
        for key, v in logs.items():
            term = key.removeprefix("eval_").removeprefix("ot_cost_spread_")
            if (
                key.removeprefix("eval_").startswith("ot_cost_spread_")
                and v < FLAT_COST
                and term not in self._warned_flat
            ):
                self._warned_flat.add(term)
                warnings.warn(
                    f"the {term} OT cost is flat: std(C)/mean(C) = {v:.1e} < {FLAT_COST:g} at step "
                    f"{self.state.global_step}, so its plan is nearly uniform and its gradient says little about "
                    "the alignment (the ot_cost_spread_* columns of the loss curves follow it)",
                    stacklevel=2,
                )

    def _warn_unconverged(self, logs: dict) -> None:
        capped = {k: v for k, v in logs.items() if "sinkhorn_capped_" in k and v > SINKHORN_CAPPED_WARN}
        if capped and not self._warned_capped:
            self._warned_capped = True
            d = self.model.cfg
            warnings.warn(
                f"Sinkhorn did not reach distill.ot.tol={d.ot.tol} within "
                f"distill.ot.max_iter={d.ot.max_iter} for "
                + ", ".join(f"{v:.0%} of the {k.rsplit('_', 1)[1]} OT problems" for k, v in capped.items())
                + f" (ot.eps={d.ot.eps}); their gradients are approximate. Raise distill.ot.max_iter, "
                "distill.ot.eps or distill.ot.tol; the sinkhorn_capped_* / sinkhorn_err_* columns of the "
                "loss curves show how often and how far",
                stacklevel=2,
            )


class FiniteGradients(TrainerCallback):
    """Stops at the first NaN/inf gradient, before the optimizer spreads it into every weight: after
    clipping a NaN norm every gradient is NaN, and the run would otherwise fail a step later, far from the cause."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not torch.stack([g.isfinite().all() for g in grads]).all():
            raise NonFiniteLossError(
                f"non-finite gradient at training step {state.global_step + 1}; training "
                "stopped — lower distill.lr or the OT weights, or try "
                "distill.ot.objective=regularized"
            )


class CurvesCallback(TrainerCallback):
    """Rewrites the loss-curve TSVs from the whole log history at every log (so a resumed run stays complete): the
    training rows to `path`, the evaluations (eval_* columns) to `eval_path`."""

    def __init__(self, path: Path, eval_path: Path):
        self.path, self.eval_path = path, eval_path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # one writer: rank 0
            return
        for path, prefix in ((self.path, ""), (self.eval_path, "eval_")):
            rows = [r for r in state.log_history if prefix + "loss" in r]
            if rows:
                _write_tsv(path, rows, ["step", "epoch", *(prefix + c for c in ("loss", *TERM_NAMES))])


def _write_tsv(path: Path, rows: list[dict], first: list[str]) -> None:
    last = ["learning_rate", "grad_norm"]
    rest = sorted({k for r in rows for k in r} - set(first) - set(last))  # any other term, Sinkhorn diagnostics
    keys = [k for k in first + rest + last if any(k in r for r in rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(keys)
        for r in rows:
            w.writerow([_fmt(r.get(k)) for k in keys])


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def build_model(
    d: DistillConfig,
    teacher_hidden_size: int | None,
    vocab_size: int,
    seed: int,
    teacher_head: tuple | None = None,
    chunk_events: tuple | None = None,
) -> DistillModel:
    """The student as distill.* says, P when hidden-state OT is on and P_e (+ the teacher's embedding rows) when
    token-level OT is: read back from distill.student when that is an earlier Stage-2 output with a projection of
    the right shape (continuing a distillation), else freshly drawn. teacher_head: (W, b) of the exact teacher."""
    student = load_student(d)
    projections = {}
    gen = torch.Generator().manual_seed(seed)
    teacher_emb = load_teacher_embeddings(d.cache) if d.w_tok_ot else None
    for on, name, D in (
        (d.w_ot, PROJECTION_FILE, teacher_hidden_size),
        (d.w_tok_ot, TOK_PROJECTION_FILE, teacher_emb[1].shape[1] if teacher_emb else None),
    ):
        if on:
            shape = (D, student.config.hidden_size)
            p = load_projection(d.student, name)
            projections[name] = p if p is not None and tuple(p.shape) == shape else init_projection(*shape, gen)
    return DistillModel(
        student,
        d,
        vocab_size,
        projections.get(PROJECTION_FILE),
        projections.get(TOK_PROJECTION_FILE),
        teacher_emb,
        teacher_head,
        chunk_events,
    )


def load_teacher_embeddings(cache_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n,), rows (n, D)): the teacher's input-embedding rows of its cached ids, saved by Stage 1."""
    from safetensors.torch import load

    f = join(loc(cache_dir), EMBEDDINGS_FILE)
    if not location.exists(f):
        raise CacheMismatchError(
            f"distill.w_tok_ot needs the teacher's embedding rows ({f}), which Stage 1 writes "
            "since cross-tokenizer support: rerun Stage 1 (python -m stages.cache_teacher)"
        )
    t = load(location.read_bytes(f))
    return t["ids"], t["weight"]


def open_stage2_cache(path, tokenizer, d: DistillConfig):
    """The cache, checked against the student's tokenizer (same-tokenizer runs) or as it is (cross-tokenizer runs:
    its own teacher tokenizer is checked when it is loaded)."""
    return open_cache(path) if d.cross_tokenizer else open_checked(path, tokenizer, d.student)


def training_args(d: DistillConfig, seed: int) -> TrainingArguments:
    """Trainer's settings for distill.*; one Trainer "sample" is one block of distill.batch_size sequences."""
    dtype = compute_dtype(d.dtype)  # mixed precision follows distill.dtype ("auto": bf16 on a bf16 GPU)
    return TrainingArguments(
        output_dir=str(Path(d.out) / "checkpoints"),
        num_train_epochs=d.epochs,
        max_steps=d.max_steps,
        learning_rate=d.lr,
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=d.grad_accum,
        lr_scheduler_type="cosine",
        optim=d.optim,
        warmup_steps=d.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        logging_steps=d.logging_steps,
        save_strategy="steps" if d.save_steps else "no",
        save_steps=d.save_steps or 500,
        save_total_limit=2,
        eval_strategy="steps" if d.eval_steps else "no",
        eval_steps=d.eval_steps or None,
        prediction_loss_only=True,
        remove_unused_columns=False,  # the collator's teacher tensors must survive
        label_names=["labels"],  # forward takes the batch whole: name its labels, or evaluation computes no loss
        # data-parallel (torchrun / accelerate launch): the buffers are constants (the exact teacher's lm_head is
        # 1 GB at 7B), DDP must not re-send them from rank 0 at every forward
        ddp_broadcast_buffers=False,
        average_tokens_across_devices=True,  # num_items_in_batch counts every rank's rows (see compute_loss)
        dataloader_num_workers=d.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        logging_first_step=True,
        report_to=[] if d.report_to == "none" else [d.report_to],
        disable_tqdm=False,
        logging_nan_inf_filter=False,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # without CUDA: the CPU, as pipeline.models.device() says (Trainer accepts bf16 autocast only when told, and
        # only then does accelerate join torchrun's processes as a multi-CPU gloo group)
        use_cpu=not torch.cuda.is_available(),
    )


def run(cfg: DistillParams, callbacks: tuple = ()) -> dict:
    """Stage 2 entry: check the caches, load only the student, train, save student + P + curves. `callbacks`: more
    TrainerCallbacks (the ablation's accuracy curve)."""
    d = cfg.distill
    out = Path(d.out)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(d.student)
    train_cache = open_stage2_cache(join(loc(d.cache), "train.zarr"), tokenizer, d)  # a folder or an fsspec URL
    if "max_length" in train_cache.provenance:  # the cached sequences are at most this long
        check_max_length(d.student, train_cache.provenance["max_length"], d.student, f"the cache {d.cache}")
    if d.w_ot and not train_cache.has_hidden:
        raise CacheMismatchError(
            f"distill.w_ot={d.w_ot} needs teacher hidden states, but the cache at "
            f"{train_cache.path} has none (cache.hidden_codec=none); recache with hidden "
            "states or set distill.w_ot=0"
        )
    teacher_head = None
    if d.teacher_head and d.w_kl:  # only lm_head, checked against the cache's teacher (pipeline/distill/head.py)
        if not train_cache.has_hidden:
            raise CacheMismatchError(
                f"distill.teacher_head rebuilds the teacher from its cached hidden states, but the "
                f"cache at {train_cache.path} has none (cache.hidden_codec=none); recache with "
                "hidden states or set distill.teacher_head=''"
            )
        teacher_head = load_teacher_head(d.teacher_head, train_cache.provenance)
        shape = tuple(teacher_head[0].shape)
        if train_cache.basis is not None:  # a low-rank code: its r coefficients, never decoded to D
            teacher_head = fold(*teacher_head, train_cache.basis)
            shape = f"{shape} folded into the {train_cache.hidden_codec} basis: {tuple(teacher_head[0].shape)}"
        print(
            f"exact teacher: lm_head {shape} {teacher_head[0].dtype} from {d.teacher_head}, hidden states "
            f"{train_cache.hidden_codec}"
        )
    folded = teacher_head is not None and train_cache.basis is not None
    fields = cache_fields(d, folded)
    train_ds = CacheBlocks(train_cache, d.batch_size, fields, d.train_fraction)
    eval_ds = None
    if d.eval_steps:
        val_cache = open_stage2_cache(join(loc(d.cache), "validation.zarr"), tokenizer, d)
        if folded and (val_cache.basis is None or val_cache.plan_basis != train_cache.plan_basis):
            raise CacheMismatchError(
                f"{val_cache.path} was not encoded with the basis of {train_cache.path}: "
                "rerun Stage 1 for both splits in one run"
            )
        eval_ds = CacheBlocks(val_cache, d.batch_size, fields, d.eval_fraction)
    token_map = events = chunk_events = None
    if d.cross_tokenizer:  # the student's own tokens and rows, aligned with the teacher's by the text
        teacher_tok = load_teacher_tokenizer(d.cache, train_cache.provenance["tokenizer_hash"])
        token_map = crosstok.token_map(teacher_tok, tokenizer)
        if d.w_chunk_kl:  # which student ids make which event, from the two vocabularies' byte strings
            events = ChunkEvents(crosstok.token_bytes(teacher_tok), crosstok.token_bytes(tokenizer), token_map)
            chunk_events = (events.first_piece, len(teacher_tok))
        side = StudentSide(cfg.data, tokenizer, teacher_tok, events=events)
        train_ds = CrossBlocks(train_ds, side)
        eval_ds = CrossBlocks(eval_ds, side) if eval_ds is not None else None
        print(
            f"cross-tokenizer: {int((token_map >= 0).sum())} of {len(token_map)} teacher tokens map to an "
            "identical student token"
        )

    model = build_model(
        d, train_cache.provenance.get("hidden_size"), len(tokenizer), cfg.seed, teacher_head, chunk_events
    )
    check_vocab(model.student.config.vocab_size, len(tokenizer), d.student)  # the losses use len(tokenizer)
    trainer = DistillTrainer(
        model=model,
        args=training_args(d, cfg.seed),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=BlockCollator(tokenizer.pad_token_id, token_map),
        callbacks=[CurvesCallback(curves_path(d), curves_path(d, "eval")), FiniteGradients(), *callbacks],
    )

    ckpt_dir = out / "checkpoints"
    resume = get_last_checkpoint(str(ckpt_dir)) if d.resume and ckpt_dir.is_dir() else None
    used = f" (train_fraction={d.train_fraction:g})" if d.train_fraction < 1 else ""
    print(
        f"distill: {len(train_cache)} cached sequences, {len(train_ds)} batches of {d.batch_size}{used}, "
        f"mode={d.mode}, {d.load_in_bits}-bit, "
        + ", ".join(f"{k}={v:g}" for k, v in d.weights.items())
        + (f"; resuming from {resume}" if resume else "")
    )
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLossError:
        sys.stderr.write("\n")  # end the progress bar's line so that the error gets a line of its own
        raise
    if trainer.is_world_process_zero():  # data-parallel: every rank holds the same weights, rank 0 saves them
        model.save_pretrained(out, tokenizer)
        save_config(cfg, out / "config.yaml")
    last = [r for r in trainer.state.log_history if "loss" in r]
    metrics = {
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        **{k: last[-1][k] for k in TERM_NAMES if last and k in last[-1]},
    }
    if not all(math.isfinite(v) for v in metrics.values()):
        raise NonFiniteLossError(f"non-finite training metrics {metrics}")
    if trainer.is_world_process_zero():
        print(
            f"distill: {trainer.state.global_step} steps, train loss {result.training_loss:.4f}; saved to {out}; "
            f"curves in {curves_path(d)}"
        )
    return metrics
