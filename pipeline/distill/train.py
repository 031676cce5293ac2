"""Stage 2: train the student alone against the streamed teacher cache.

    L = w_ce * CE + w_kl * KL + w_ot * OT_hidden + w_ot_logits * OT_logits

Alignment (cache/schema.py): the teacher row stored for position j is its distribution over token j+1, so it
sits at student position j, whose logits predict token j+1 too. The collator puts every row at its position
(B, L, ...) for CE/KL, and lists each sequence's row positions (B, M) for the two sequence-level OT losses,
whose student side is the student's state at exactly those positions. `DistillTrainer.compute_loss` only
gathers tensors and calls the pure functions of pipeline/losses.py.
"""
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from cache.reader import BlockShuffleSampler, CacheDataset, describe, open_cache
from cache.errors import CacheMismatchError
from pipeline.config import Config, DistillConfig, save_config
from pipeline.data.records import IGNORE, tokenizer_hash
from pipeline.losses.fused_ce_kl import fused_ce_kl
from pipeline.losses.fused_ot import ot_logits_loss_from_hidden
from pipeline.losses.kl import LOG_FLOOR, ce_loss, topk_kl_loss
from pipeline.losses.ot import init_projection, ot_hidden_loss, ot_logits_loss
from pipeline.models import check_vocab, load_tokenizer
from pipeline.distill.student import PROJECTION_FILE, load_student

COMPONENTS = ("ce", "kl", "ot_hidden", "ot_logits")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or inf; training stops instead of continuing on garbage."""


# ---------------------------------------------------------------------------------------------------------
# Cache -> batches
# ---------------------------------------------------------------------------------------------------------

def open_checked(path: Path, tokenizer, student: str):
    """open_cache + provenance check against the student's tokenizer (by hash: see data.tokenizer_hash)."""
    want = tokenizer_hash(tokenizer)
    try:
        return open_cache(path, expect={"tokenizer_hash": want})
    except CacheMismatchError:
        got = describe(path)["provenance"].get("tokenizer_hash")
        raise CacheMismatchError(
            f"teacher cache at {path} was made with another tokenizer (hash {got}) than the student {student} "
            f"uses (hash {want}); the teacher and the student must share one tokenizer") from None


def cache_fields(d: DistillConfig) -> list[str]:
    """Only what the enabled losses need is read from disk (the CE baseline reads no teacher rows at all)."""
    fields = ["input_ids", "supervised"]
    if d.w_kl or d.w_ot_logits:
        fields += ["topk_ids", "topk_logprobs", "tail_logmass"]
    if d.w_ot:
        fields += ["hidden"]
    return fields


class DistillCollator:
    """List of `TeacherCache.read` dicts -> right-padded batch tensors (padding to the batch's longest sequence).

    input_ids, attention_mask, labels (B, L): labels[b, j+1] = input_ids[b, j+1] iff supervised[b, j], else IGNORE
    row_mask (B, L) bool: a teacher row sits at position j (= supervised[j])
    teacher_ids (B, L, k), teacher_logprobs (B, L, k), teacher_tail (B, L): the row for position j at j
    row_pos, row_pos_mask (B, M): positions of each sequence's rows in order (M = most rows in the batch)
    teacher_hidden (B, M, D): the cached teacher hidden states, row by row (only if read)
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        B = len(batch)
        L = max(len(x["input_ids"]) for x in batch)
        pos = [np.flatnonzero(x["supervised"]) for x in batch]
        M = max(len(p) for p in pos)
        out = {
            "input_ids": torch.full((B, L), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(B, L, dtype=torch.long),
            "labels": torch.full((B, L), IGNORE, dtype=torch.long),
            "row_mask": torch.zeros(B, L, dtype=torch.bool),
            "row_pos": torch.zeros(B, M, dtype=torch.long),
            "row_pos_mask": torch.zeros(B, M, dtype=torch.bool),
        }
        has_topk, has_hidden = "topk_ids" in batch[0], "hidden" in batch[0]
        if has_topk:
            k = batch[0]["topk_ids"].shape[1]
            # Fillers on rowless positions are never read by the losses (masked); finite values keep it so.
            out["teacher_ids"] = torch.zeros(B, L, k, dtype=torch.long)
            out["teacher_logprobs"] = torch.full((B, L, k), LOG_FLOOR)
            out["teacher_tail"] = torch.full((B, L), LOG_FLOOR)
        if has_hidden:
            out["teacher_hidden"] = torch.zeros(B, M, batch[0]["hidden"].shape[1])
        for b, (x, p) in enumerate(zip(batch, pos)):
            n, r = len(x["input_ids"]), len(p)
            ids = torch.as_tensor(x["input_ids"], dtype=torch.long)
            tp = torch.as_tensor(p, dtype=torch.long)
            out["input_ids"][b, :n] = ids
            out["attention_mask"][b, :n] = 1
            out["labels"][b, tp + 1] = ids[tp + 1]  # the row at j predicts token j+1 (never j = n-1)
            out["row_mask"][b, tp] = True
            out["row_pos"][b, :r] = tp
            out["row_pos_mask"][b, :r] = True
            if has_topk:
                out["teacher_ids"][b, tp] = torch.as_tensor(x["topk_ids"])
                out["teacher_logprobs"][b, tp] = torch.as_tensor(x["topk_logprobs"])
                out["teacher_tail"][b, tp] = torch.as_tensor(x["tail_logmass"])
            if has_hidden:
                out["teacher_hidden"][b, :r] = torch.as_tensor(x["hidden"])
        return out


def gather_rows(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) at positions pos (B, M) -> (B, M, ...)."""
    idx = pos.view(*pos.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------

def student_losses(model, inputs: dict, d: DistillConfig, vocab_size: int, projection, n_items, ga: int = 1):
    """Weighted loss of one micro-batch and the unweighted terms to log: (loss, {name: float tensor}).

    distill.fused_loss (default): the decoder's hidden states go straight into `fused_ce_kl`, which builds the
    lm_head logits chunk by chunk and only at supervised rows, so no (B, L, V) tensor exists; OT on logits
    builds the student's probabilities only at the teacher's top-k ids (`ot_logits_loss_from_hidden`). Otherwise the model's full logits feed the plain losses.
    CE and KL are sums over rows divided by n_items (the optimizer step's count, so micro-batches add up);
    OT terms are per-sequence means, divided by the number of micro-batches `ga`.
    """
    V, logs, loss = vocab_size, {}, 0.0
    row_mask = inputs["row_mask"]  # (B, L)
    pos, pos_mask = inputs["row_pos"], inputs["row_pos_mask"]  # (B, M)
    if d.fused_loss:
        hidden = model.get_decoder()(input_ids=inputs["input_ids"],
                                     attention_mask=inputs["attention_mask"]).last_hidden_state  # (B, L, d)
        head = model.get_output_embeddings()
        if d.w_ce or d.w_kl:
            targets = torch.full_like(inputs["labels"], IGNORE)  # (B, L)
            targets[:, :-1] = inputs["labels"][:, 1:]  # position j's logits predict token j+1
            sel = (targets != IGNORE) | row_mask  # (B, L) the rows any CE/KL term reads
            R = int(sel.sum())
            if "teacher_ids" in inputs:
                t_ids, t_lp, t_tail = inputs["teacher_ids"][sel], inputs["teacher_logprobs"][sel], inputs["teacher_tail"][sel]
            else:  # the CE baseline reads no teacher rows; KL is off, these are never used
                t_ids, t_lp, t_tail = hidden.new_zeros(R, 1, dtype=torch.long), hidden.new_zeros(R, 1), hidden.new_zeros(R)
            ce_kl, parts = fused_ce_kl(hidden[sel], head.weight, targets[sel], t_ids, t_lp, t_tail,
                                       row_mask[sel] & bool(d.w_kl), w_ce=d.w_ce, w_kl=d.w_kl,
                                       temperature=d.temperature, tail=d.kl_tail, reverse=d.kl_reverse,
                                       vocab_size=V, num_items=n_items, bias=getattr(head, "bias", None))
            loss = loss + ce_kl
            logs.update(parts)
        final = hidden
    else:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    output_hidden_states=d.w_ot > 0)
        logits = out.logits  # (B, L, V_student); columns >= V are padding, the losses drop them
        if d.w_ce:
            logs["ce"] = ce_loss(logits, inputs["labels"], n_items, vocab_size=V)
            loss = loss + d.w_ce * logs["ce"]
        if d.w_kl:
            logs["kl"] = topk_kl_loss(logits, inputs["teacher_ids"], inputs["teacher_logprobs"],
                                      inputs["teacher_tail"], row_mask, temperature=d.temperature,
                                      tail=d.kl_tail, reverse=d.kl_reverse, vocab_size=V, num_items=n_items)
            loss = loss + d.w_kl * logs["kl"]
        row_logits = gather_rows(logits, pos) if d.w_ot_logits else None
        final = out.hidden_states[-1] if d.w_ot else None
    if d.w_ot:
        x = gather_rows(final, pos).float()  # (B, M, d) final (post-norm) state at the teacher's rows
        logs["ot_hidden"], res = ot_hidden_loss(x, pos_mask, inputs["teacher_hidden"], pos_mask, projection,
                                                eps=d.ot_eps, objective=d.ot_objective, max_iter=d.ot_max_iter)
        loss = loss + d.w_ot * logs["ot_hidden"] / ga
        logs["sinkhorn_iters_hidden"] = res.n_iters.float().mean()
    if d.w_ot_logits:
        t_ids, t_lp = gather_rows(inputs["teacher_ids"], pos), gather_rows(inputs["teacher_logprobs"], pos)
        ot_kw = dict(eps=d.ot_eps, vocab_size=V, objective=d.ot_objective, max_iter=d.ot_max_iter)
        if d.fused_loss:  # only the teacher's top-k columns of the lm_head, never (B, M, V) logits
            logs["ot_logits"], res = ot_logits_loss_from_hidden(
                gather_rows(hidden, pos), head.weight, t_ids, t_lp, pos_mask, pos_mask,
                bias=getattr(head, "bias", None), **ot_kw)
        else:
            logs["ot_logits"], res = ot_logits_loss(row_logits, t_ids, t_lp, pos_mask, pos_mask, **ot_kw)
        loss = loss + d.w_ot_logits * logs["ot_logits"] / ga
        logs["sinkhorn_iters_logits"] = res.n_iters.float().mean()
    for k in ("ce", "kl"):  # a micro-batch's share of the step's token mean; x ga reads as the step's mean
        if k in logs:
            logs[k] = logs[k] * ga
    return loss, {k: v.detach().float() for k, v in logs.items()}


class DistillTrainer(Trainer):
    """Trainer whose loss is the weighted sum of the pure distillation losses; P trains with the student.

    CE and KL are sums over rows divided by Trainer's `num_items_in_batch` (the supervised-token count of the
    whole optimizer step), so summing micro-batches gives the true token mean: the loss is already scaled for
    gradient accumulation. OT losses are per-sequence means, divided by the number of micro-batches.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, distill: DistillConfig, vocab_size: int, projection: torch.Tensor | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.d, self.vocab_size = distill, vocab_size
        # P maps teacher hidden states (D) into the student's space (d); a plain Parameter outside the model so
        # that a peft adapter / plain checkpoint stays loadable without it. Added to the optimizer below.
        self.projection = None if projection is None else nn.Parameter(projection.to(self.args.device))
        if self.projection is not None:
            self.add_callback(_ZeroGrad(self.projection))
        self._parts = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_train_sampler(self, train_dataset=None):
        # Batches of neighbouring cache entries: one Zarr slice per field instead of one per sequence, and
        # similar lengths (Stage 1 stores sequences sorted by length). Multi-GPU would shard the blocks.
        n = len(train_dataset if train_dataset is not None else self.train_dataset)
        return BlockShuffleSampler(n, self.args.per_device_train_batch_size, self.args.seed)

    # -- loss --------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        ga = getattr(self, "current_gradient_accumulation_steps", 1) if model.training else 1
        # Without a count from Trainer (models that take no loss kwargs), approximate the step's count.
        n_items = num_items_in_batch if num_items_in_batch is not None else inputs["row_mask"].sum() * ga
        loss, logs = student_losses(model, inputs, self.d, self.vocab_size, self.projection, n_items, ga)
        if not torch.isfinite(loss):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in logs.items() if k in COMPONENTS)
            where = f"training step {self.state.global_step + 1}" if model.training else "evaluation"
            raise NonFiniteLossError(f"non-finite loss at {where} ({values}); training stopped — check the "
                                     f"teacher cache for NaN/inf values or lower distill.lr")
        for k, v in logs.items():
            self._parts[mode][k].append(v.item())
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        """Add the mean of every loss component since the last log (train) or over the eval set (eval_*)."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if mode == "eval" or "loss" in logs:  # not the end-of-training summary
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + k: sum(v) / len(v) for k, v in self._parts[mode].items() if v})
            self._parts[mode].clear()
        super().log(logs, start_time)

    # -- P: optimised, clipped, saved and restored with the student ----------------------------------------
    def create_optimizer(self, model=None):
        new = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if new and self.projection is not None:
            optimizer.add_param_group({"params": [self.projection], "weight_decay": 0.0})
        return optimizer

    def _clip_grad_norm(self, model):
        params = [*model.parameters()] + ([self.projection] if self.projection is not None else [])
        norm = self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
        # A finite loss can still give a NaN/inf gradient; clipping would spread it into every weight and the
        # run would only fail a step later, far from the cause.
        if not torch.isfinite(torch.as_tensor(norm)):
            raise NonFiniteLossError(f"non-finite gradient at training step {self.state.global_step + 1} "
                                     f"(norm {float(norm)}); training stopped — lower distill.lr or the OT "
                                     "weights, or try distill.ot_objective=regularized")
        return norm

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.projection is not None and self.args.should_save:
            torch.save(self.projection.detach().cpu(), Path(output_dir or self.args.output_dir) / PROJECTION_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        f = Path(resume_from_checkpoint) / PROJECTION_FILE
        if self.projection is not None and f.exists():
            with torch.no_grad():
                self.projection.copy_(torch.load(f, map_location=self.projection.device, weights_only=True))


class _ZeroGrad(TrainerCallback):
    """Clears P's gradient after each optimizer step: Trainer only calls model.zero_grad(), and P is not in
    the model, so its gradient would otherwise keep accumulating over all steps."""

    def __init__(self, param: nn.Parameter):
        self.param = param

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.param.grad = None


class CurvesCallback(TrainerCallback):
    """Rewrites the loss-curve TSV from the whole log history at every log (so a resumed run stays complete)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        rows = [r for r in state.log_history if "loss" in r]
        if not rows:
            return
        keys = ["step", "epoch", "loss", *COMPONENTS, "sinkhorn_iters_hidden", "sinkhorn_iters_logits",
                "learning_rate", "grad_norm"]
        keys = [k for k in keys if any(k in r for r in rows)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(keys)
            for r in rows:
                w.writerow([_fmt(r.get(k)) for k in keys])


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def curves_path(d: DistillConfig) -> Path:
    """`<plots>/train_<name of out>.tsv`: the distilled and the CE-only students get distinct files."""
    return Path(d.plots) / f"train_{Path(d.out).name}.tsv"


# ---------------------------------------------------------------------------------------------------------
# Stage entry
# ---------------------------------------------------------------------------------------------------------

def run(cfg: Config) -> dict:
    """Stage 2 entry: check the caches, load only the student, train, save adapter/weights + P + curves."""
    d = cfg.distill
    out = Path(d.out)
    weights = {"w_ce": d.w_ce, "w_kl": d.w_kl, "w_ot": d.w_ot, "w_ot_logits": d.w_ot_logits}
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"distill weights must be >= 0 and not all 0, got {weights}")
    if not 0 <= d.warmup_ratio < 1:
        raise ValueError(f"distill.warmup_ratio must be in [0, 1), got {d.warmup_ratio}")
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(d.student)
    train_cache = open_checked(Path(d.cache) / "train.zarr", tokenizer, d.student)
    if d.w_ot and not train_cache.has_hidden:
        raise ValueError(f"distill.w_ot={d.w_ot} needs teacher hidden states, but the cache at {train_cache.path} "
                         "has none (cache.hidden_dtype=none); recache with hidden states or set distill.w_ot=0")
    eval_ds = None
    if d.eval_steps:
        eval_ds = CacheDataset(open_checked(Path(d.cache) / "validation.zarr", tokenizer, d.student),
                               cache_fields(d))
    train_ds = CacheDataset(train_cache, cache_fields(d))

    model = load_student(d)
    check_vocab(model.config.vocab_size, len(tokenizer), d.student)  # vocab_size=len(tokenizer) below slices
    projection = None
    if d.w_ot:
        gen = torch.Generator().manual_seed(cfg.seed)
        projection = init_projection(train_cache.provenance["hidden_size"], model.config.hidden_size, gen)

    ckpt_dir = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(ckpt_dir), num_train_epochs=d.epochs, max_steps=d.max_steps, learning_rate=d.lr,
        per_device_train_batch_size=d.batch_size, per_device_eval_batch_size=d.batch_size,
        gradient_accumulation_steps=d.grad_accum, lr_scheduler_type="cosine", optim=d.optim,
        warmup_steps=d.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=0.0, seed=cfg.seed, data_seed=cfg.seed, logging_steps=d.logging_steps,
        save_strategy="steps" if d.save_steps else "no", save_steps=d.save_steps or 500, save_total_limit=2,
        eval_strategy="steps" if d.eval_steps else "no", eval_steps=d.eval_steps or None,
        prediction_loss_only=True, remove_unused_columns=False,  # the collator's teacher tensors must survive
        dataloader_num_workers=d.num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        logging_first_step=True, report_to=[], disable_tqdm=False, logging_nan_inf_filter=False,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        data_collator=DistillCollator(tokenizer.pad_token_id), callbacks=[CurvesCallback(curves_path(d))],
        distill=d, vocab_size=len(tokenizer), projection=projection)

    resume = get_last_checkpoint(str(ckpt_dir)) if d.resume and ckpt_dir.is_dir() else None
    print(f"distill: {len(train_ds)} cached sequences, mode={d.mode}, {d.load_in_bits}-bit, " + ", ".join(
        f"{k}={v:g}" for k, v in weights.items()) + (f"; resuming from {resume}" if resume else ""))
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLossError:
        sys.stderr.write("\n")  # end the progress bar's line so that the error gets a line of its own
        raise
    trainer.save_model(str(out))  # weights or adapter, tokenizer, and projection.pt (DistillTrainer._save)
    save_config(cfg, out / "config.yaml")
    last = [r for r in trainer.state.log_history if "loss" in r]
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               **{k: last[-1][k] for k in COMPONENTS if last and k in last[-1]}}
    if not all(math.isfinite(v) for v in metrics.values()):
        raise NonFiniteLossError(f"non-finite training metrics {metrics}")
    print(f"distill: {trainer.state.global_step} steps, train loss {result.training_loss:.4f}; saved to {out}; "
          f"curves in {curves_path(d)}")
    return metrics
