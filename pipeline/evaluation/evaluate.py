"""Evaluation of the teacher and the students: held-out perplexity, task accuracy, agreement with the cache.

For every model in `evaluate.models`:
  perplexity      exp(token-mean CE) over the supervised (response) tokens of the test split
  entropy         the model's mean next-token entropy (nats) over the same tokens: how spread its soft targets
                  are (the teacher's explains what distilling from it can add beyond the labels)
  accuracy        fraction of test examples whose greedy answer passes the task's rule (`data.metric`)
  top1_agreement  share of validation-cache rows where the model's argmax is the teacher's top-1 token
  kl_teacher      KL(teacher || model) per row over the cached top-k + tail buckets (pipeline/losses/kl.py)
Writes metrics.json (DVC metrics), metrics.md (a table) and curves.png (Stage 2 loss curves).
"""
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cache.errors import OtkdError  # noqa: E402
from pipeline.config import Config, save_config  # noqa: E402
from pipeline.data.records import load_splits, pad_collate  # noqa: E402
from pipeline.distill.batches import COMPONENTS, collate, gather_rows, open_checked  # noqa: E402
from pipeline.evaluation.generate import checker, task_accuracy  # noqa: E402
from pipeline.losses.kl import ce_loss, topk_kl_loss  # noqa: E402
from pipeline.models import load_tokenizer  # noqa: E402
from pipeline.distill.student import load_trained  # noqa: E402

KEYS = ("perplexity", "accuracy", "top1_agreement", "kl_teacher", "entropy")


class EvaluationError(OtkdError, ValueError):
    """The evaluate.* settings name nothing that can be evaluated."""


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model, records: list[dict], pad_id: int, vocab_size: int, batch_size: int) -> tuple[float, float]:
    """(exp(sum of NLL / supervised tokens), mean entropy in nats of the model's next-token distribution over the
    same tokens) over tokenised records (input_ids, labels)."""
    nll, ent, n = 0.0, 0.0, 0
    for i in range(0, len(records), batch_size):
        batch = pad_collate(records[i:i + batch_size], pad_id)
        # use_cache=False: nothing is generated here, a KV cache of every layer would only take memory
        logits = model(input_ids=batch["input_ids"].to(_device(model)),
                       attention_mask=batch["attention_mask"].to(_device(model)), use_cache=False).logits
        labels = batch["labels"].to(logits.device)
        nll += ce_loss(logits, labels, num_items_in_batch=1, vocab_size=vocab_size).item()  # a sum, not a mean
        rows = labels[:, 1:] != -100  # (B, T-1): positions whose next token is supervised
        logp = logits[:, :-1][rows][:, :vocab_size].float().log_softmax(-1)  # (rows, V) without padded columns
        ent += float(-(logp.exp() * logp).sum())
        n += int(rows.sum())
    return math.exp(nll / max(n, 1)), ent / max(n, 1)


@torch.inference_mode()
def cache_agreement(model, cache, pad_id: int, vocab_size: int, batch_size: int) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(teacher || model), rows) over every row of a teacher cache."""
    fields = ["input_ids", "supervised", "topk_ids", "topk_logprobs", "tail_logmass"]
    agree, kl, rows = 0, 0.0, 0
    for i in range(0, len(cache), batch_size):
        reads = cache.read_many(range(i, min(i + batch_size, len(cache))), fields)
        b = {k: v.to(_device(model)) for k, v in collate(reads, pad_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       use_cache=False).logits  # (B, L, V)
        logits = gather_rows(logits, b["row_pos"])  # (B, M, V): the positions that predict the rows' tokens
        mask = b["row_mask"]  # (B, M)
        agree += int((logits[..., :vocab_size].argmax(-1) == b["teacher_ids"][..., 0])[mask].sum())
        kl += topk_kl_loss(logits, b["teacher_ids"], b["teacher_logprobs"], b["teacher_tail"], mask,
                           vocab_size=vocab_size, num_items=1).item()  # sum over rows
        rows += int(mask.sum())
    return agree / max(rows, 1), kl / max(rows, 1), rows


def read_curves(path: Path) -> dict[str, list[float]]:
    """A Stage 2 loss-curve TSV as column -> values (empty cells become NaN)."""
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {k: [float(r[k]) if r[k] else math.nan for r in rows] for k in (rows[0] if rows else {})}


def made_by_stage2(path: str) -> bool:
    """Whether `path` is a Stage 2 output (its saved config's distill.out is this folder).

    Curve files are named after the output folder, and artifacts/base/student shares its name with
    artifacts/student: the untrained student must not be drawn with the distilled one's curves.
    """
    f = Path(path) / "config.yaml"
    if not f.exists():
        return False
    out = ((yaml.safe_load(f.read_text()) or {}).get("distill") or {}).get("out")
    return bool(out) and Path(out).resolve() == Path(path).resolve()


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    """One panel per loss component, one line per trained model (nothing to draw still gives a figure)."""
    panels = [k for k in ("loss", *COMPONENTS) if any(k in c for c in curves.values())] or ["loss"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    color = {name: f"C{i}" for i, name in enumerate(curves)}  # one colour per model across all panels
    for ax, key in zip(axes[0], panels):
        for name, c in curves.items():
            if key in c:
                ax.plot(c["step"], c[key], label=name, color=color[name])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if curves:
        axes[0][0].legend(fontsize=8)
    else:
        axes[0][0].text(0.5, 0.5, "no training curves", ha="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(metrics: dict[str, dict]) -> str:
    head = ("| model | perplexity ↓ | accuracy ↑ | top-1 agreement ↑ | KL(teacher‖model) ↓ | entropy (nats/token) |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    return head + "".join(f"| {name} | {m['perplexity']:.3f} | {m['accuracy']:.1%} | {m['top1_agreement']:.1%} | "
                          f"{m['kl_teacher']:.4f} | {m['entropy']:.3f} |\n" for name, m in metrics.items())


def evaluate_model(cfg: Config, path: str, test: list[dict], gen_records: list[dict], val_path: Path,
                   name: str = "model") -> tuple[dict, int]:
    """({perplexity, accuracy, top1_agreement, kl_teacher, entropy}, validation rows) of the model in `path`:
    perplexity and entropy on `test`, accuracy on `gen_records`, agreement and KL on the validation cache."""
    e = cfg.evaluate
    tok = load_tokenizer(path)
    cache = open_checked(val_path, tok, path)  # also proves every model shares the data's tokenizer
    model = load_trained(path, e.dtype, e.load_in_bits)
    V = len(tok)
    ppl, entropy = perplexity(model, test, tok.pad_token_id, V, e.batch_size)
    acc = task_accuracy(model, tok, gen_records, cfg.data.template, check=checker(cfg.data.metric),
                        max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, desc=f"{name} accuracy")
    top1, kl, n_rows = cache_agreement(model, cache, tok.pad_token_id, V, e.batch_size)
    return {"perplexity": ppl, "accuracy": acc, "top1_agreement": top1, "kl_teacher": kl, "entropy": entropy}, n_rows


def run(cfg: Config) -> dict:
    """Stage entry: evaluate every configured model, write metrics.json / metrics.md / curves.png."""
    e = cfg.evaluate
    out = Path(e.out)
    if not e.models:
        raise EvaluationError("evaluate.models is empty: name at least one model folder to evaluate")
    names = list(e.models)
    tokenizer = load_tokenizer(e.models[names[0]])
    splits = load_splits(cfg.data, tokenizer, log=lambda *_: None)
    test = splits["test"].to_list()
    gen_records = test[:e.eval_examples] if e.eval_examples else test
    val_path = Path(e.cache) / "validation.zarr"

    results = {}
    n_rows = 0
    for name in names:
        results[name], n_rows = evaluate_model(cfg, e.models[name], test, gen_records, val_path, name)
        tqdm.write(f"evaluate {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items()))

    out.mkdir(parents=True, exist_ok=True)
    metrics = {**results, "n": {"test_sequences": len(test), "accuracy_examples": len(gen_records),
                                "validation_rows": n_rows}}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "metrics.md").write_text(markdown_table(results))
    save_config(cfg, out / "evaluate_config.yaml")  # the resolved config next to the output
    curves = {}
    for name in names:
        f = Path(e.plots) / f"train_{Path(e.models[name]).name}.tsv"  # as batches.curves_path names it
        if made_by_stage2(e.models[name]) and f.exists():
            curves[name] = read_curves(f)
    plot_curves(curves, out / "curves.png")
    print(markdown_table(results))
    return metrics
