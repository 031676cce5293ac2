"""Evaluation of the teacher and the students: held-out perplexity, task accuracy, agreement with the cache.

Every model reads the test records in its own tokenizer (the one saved in its folder): students with another
tokenizer than the teacher's (cross-tokenizer distillation) are scored on the same examples as the others.

For every model in `evaluate.models`:
  perplexity      exp(token-mean CE) over the supervised (response) tokens of the test split, in the model's own
                  tokens (so not comparable between models with different tokenizers: bits_per_char is)
  bits_per_char   the same total NLL in bits over the characters those tokens cover: len(output) + 1 per record
                  (the end-of-sequence marker counts as one character however the tokenizer spells it); for a
                  record cut at data.max_length, the characters of its decoded supervised tokens (+ 1 if the
                  marker is among them). Tokenizer-free: the one likelihood to compare across tokenizers
  entropy         the model's mean next-token entropy (nats) over the same tokens: how spread its soft targets
                  are (the teacher's explains what distilling from it can add beyond the labels)
  accuracy        fraction of test examples whose greedy answer passes the task's rule (`data.metric`)
  top1_agreement  share of validation-cache rows where the model's argmax is the teacher's top-1 token
  kl_teacher      KL(teacher || model) per row over the cached top-k + tail buckets (pipeline/losses/kl.py)
The last two read the model's logits at the cache's top-k ids, ids of the teacher's vocabulary: for a model whose
tokenizer is not the cache's they are NaN, null in metrics.json (strict JSON for DVC) and "—" in the table.
Writes metrics.json (DVC metrics), metrics.md (a table) and curves.png (Stage 2 loss curves, plots.py).
"""

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from cache.errors import OtkdError
from cache.reader import describe
from pipeline.config.base import save_config
from pipeline.config.data import DataConfig
from pipeline.config.evaluate import EvalParams
from pipeline.data.records import IGNORE, load_splits, pad_collate, tokenize_many, tokenizer_hash
from pipeline.distill.batches import collate, gather_rows, open_checked
from pipeline.distill.student import load_trained
from pipeline.evaluation.generate import checker, task_accuracy
from pipeline.evaluation.truth import true_kl
from pipeline.losses.kl import ce_loss, topk_kl_loss
from pipeline.models import load_tokenizer
from pipeline.versions import versions, versions_line

KEYS = ("perplexity", "bits_per_char", "accuracy", "top1_agreement", "kl_teacher", "entropy")


class EvaluationError(OtkdError, ValueError):
    """The evaluate.* settings name nothing that can be evaluated."""


def _device(model) -> torch.device:
    return next(model.parameters()).device


def supervised_chars(rec: dict, tokenizer, max_length: int) -> int:
    """Characters of the answer that a tokenised record's supervised tokens cover (what bits per character divides
    by): len(output) + 1 for the end-of-sequence marker, one character whatever its spelling in the tokenizer.

    A record as long as max_length may have been cut (load_splits does not keep the flag): then only the decoded
    supervised tokens count, + 1 if the marker is among them, so a cut answer is not charged for what it lost.
    """
    if len(rec["input_ids"]) < max_length:
        return len(rec["output"]) + 1
    ids = [y for y in rec["labels"][1:] if y != IGNORE]  # the tokens perplexity averages over
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return len(text) + (tokenizer.eos_token_id in ids)


@torch.inference_mode()
def perplexity(model, records: list[dict], tokenizer, max_length: int, batch_size: int) -> tuple[float, float, float]:
    """(exp(sum of NLL / supervised tokens), mean entropy in nats of the model's next-token distribution over the
    same tokens, sum of NLL in bits / the characters those tokens cover) over records tokenised with `tokenizer`
    (input_ids, labels) at data.max_length."""
    pad_id, vocab_size = tokenizer.pad_token_id, len(tokenizer)
    nll, ent, n = 0.0, 0.0, 0
    chars = sum(supervised_chars(r, tokenizer, max_length) for r in records)
    for i in range(0, len(records), batch_size):
        batch = pad_collate(records[i : i + batch_size], pad_id)
        # use_cache=False: nothing is generated here, a KV cache of every layer would only take memory
        logits = model(
            input_ids=batch["input_ids"].to(_device(model)),
            attention_mask=batch["attention_mask"].to(_device(model)),
            use_cache=False,
        ).logits
        labels = batch["labels"].to(logits.device)
        nll += ce_loss(logits, labels, num_items_in_batch=1, vocab_size=vocab_size).item()  # a sum, not a mean
        rows = labels[:, 1:] != -100  # (B, T-1): positions whose next token is supervised
        logp = logits[:, :-1][rows][:, :vocab_size].float().log_softmax(-1)  # (rows, V) without padded columns
        ent += float(-(logp.exp() * logp).sum())
        n += int(rows.sum())
    return math.exp(nll / max(n, 1)), ent / max(n, 1), nll / math.log(2) / max(chars, 1)


@torch.inference_mode()
def cache_agreement(model, cache, pad_id: int, vocab_size: int, batch_size: int) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(teacher || model), rows) over every row of a teacher cache."""
    fields = ["input_ids", "supervised", "topk_ids", "topk_logprobs", "tail_logmass"]
    agree, kl, rows = 0, 0.0, 0
    for i in range(0, len(cache), batch_size):
        reads = cache.read_many(range(i, min(i + batch_size, len(cache))), fields)
        b = {k: v.to(_device(model)) for k, v in collate(reads, pad_id).items()}
        logits = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False
        ).logits  # (B, L, V)
        logits = gather_rows(logits, b["row_pos"])  # (B, M, V): the positions that predict the rows' tokens
        mask = b["row_mask"]  # (B, M)
        agree += int((logits[..., :vocab_size].argmax(-1) == b["teacher_ids"][..., 0])[mask].sum())
        kl += topk_kl_loss(
            logits, b["teacher_ids"], b["teacher_logprobs"], b["teacher_tail"], mask, vocab_size=vocab_size, num_items=1
        ).item()  # sum over rows
        rows += int(mask.sum())
    return agree / max(rows, 1), kl / max(rows, 1), rows


def missing(x) -> bool:
    """A metric with no value (NaN in memory, null in JSON): e.g. the cache metrics of another tokenizer's model."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def json_safe(x):
    """`x` with every non-finite float replaced by None, recursively: json.dumps would write NaN, which is not
    JSON (DVC and strict parsers reject it)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def dump_metrics(metrics: dict) -> str:
    """Metrics as strict JSON (missing values as null), indented like every metrics file of the project."""
    return json.dumps(json_safe(metrics), indent=2, allow_nan=False)


def cell(x, fmt: str) -> str:
    """One table cell: "—" for a missing value."""
    return "—" if missing(x) else format(x, fmt)


def markdown_table(metrics: dict[str, dict]) -> str:
    """One row per model; a KL(true‖model) column when the data is the positive control (some model has kl_true)."""
    truth = any("kl_true" in m for m in metrics.values())
    head = (
        "| model | perplexity ↓ | bits/char ↓ | accuracy ↑ | top-1 agreement ↑ | KL(teacher‖model) ↓ "
        + ("| KL(true‖model) ↓ " if truth else "")
        + "| entropy (nats/token) |\n|---|---:|---:|---:|---:|---:|"
        + ("---:|" if truth else "")
        + "---:|\n"
    )
    return head + "".join(
        f"| {name} | {cell(m['perplexity'], '.3f')} | {cell(m['bits_per_char'], '.4f')} | "
        f"{cell(m['accuracy'], '.1%')} | {cell(m['top1_agreement'], '.1%')} | {cell(m['kl_teacher'], '.4f')} | "
        + (f"{cell(m.get('kl_true'), '.4f')} | " if truth else "")
        + f"{cell(m['entropy'], '.3f')} |\n"
        for name, m in metrics.items()
    )


def retokenize(records: list[dict], tokenizer, data: DataConfig) -> list[dict]:
    """The same records (same sample ids, same order) with input_ids and labels in `tokenizer`'s ids.

    The test split is chosen by the prompt alone, so these are the examples every other model is scored on; a
    record that keeps no supervised token here simply adds no token (and no character) to the sums.
    """
    encoded = tokenize_many(records, tokenizer, data.template, data.max_length)
    return [{**r, **ex} for r, (ex, _) in zip(records, encoded)]


def cache_tokenizer(val_path: Path) -> str | None:
    """The tokenizer_hash a cache's top-k ids belong to (its provenance): a model's logits can be read at those ids
    only if its tokenizer has this hash."""
    return describe(val_path)["provenance"].get("tokenizer_hash")


def evaluate_model(
    cfg: EvalParams,
    path: str,
    test: list[dict],
    gen_records: list[dict],
    val_path: Path,
    name: str = "model",
    tokenized_with: str | None = None,
) -> tuple[dict, int]:
    """({perplexity, bits_per_char, accuracy, top1_agreement, kl_teacher, entropy}, validation rows) of the model in
    `path`: perplexity, bits per character and entropy on `test`, accuracy on `gen_records` (generated from their
    text), agreement and KL on the validation cache (NaN and 0 rows for a model whose tokenizer is not the cache's).

    tokenized_with: tokenizer_hash of the tokenizer `test` was tokenised with; if it is not this model's, the same
    records are tokenised again with the model's own. None: `test` is in this model's tokens already.
    """
    e = cfg.evaluate
    tok = load_tokenizer(path)
    own = tokenizer_hash(tok)
    if tokenized_with is not None and tokenized_with != own:
        test = retokenize(test, tok, cfg.data)
    # open_checked would refuse another tokenizer's model: its cache metrics are missing, not an error
    cache = open_checked(val_path, tok, path) if cache_tokenizer(val_path) == own else None
    model = load_trained(path, e.dtype, e.load_in_bits)
    ppl, entropy, bpc = perplexity(model, test, tok, cfg.data.max_length, e.batch_size)
    kl_true = true_kl(model, test, tok, e.batch_size)  # the positive control only (NaN for other data)
    acc = task_accuracy(
        model,
        tok,
        gen_records,
        cfg.data.template,
        check=checker(cfg.data.metric),
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        desc=f"{name} accuracy",
    )
    top1, kl, n_rows = math.nan, math.nan, 0
    if cache is not None:
        top1, kl, n_rows = cache_agreement(model, cache, tok.pad_token_id, len(tok), e.batch_size)
    metrics = {
        "perplexity": ppl,
        "bits_per_char": bpc,
        "accuracy": acc,
        "top1_agreement": top1,
        "kl_teacher": kl,
        "entropy": entropy,
    }
    if not math.isnan(kl_true):
        metrics["kl_true"] = kl_true
    return metrics, n_rows


def run(cfg: EvalParams) -> dict:
    """Stage entry: evaluate every configured model, write metrics.json / metrics.md / curves.png."""
    e = cfg.evaluate
    out = Path(e.out)
    if not e.models:
        raise EvaluationError("evaluate.models is empty: name at least one model folder to evaluate")
    names = list(e.models)
    tokenizer = load_tokenizer(e.models[names[0]])  # a model with another tokenizer re-tokenises these records
    splits = load_splits(cfg.data, tokenizer, log=lambda *_: None)
    test = splits["test"].to_list()
    test_tokenizer = tokenizer_hash(tokenizer)
    gen_records = test[: e.eval_examples] if e.eval_examples else test
    val_path = Path(e.cache) / "validation.zarr"

    results = {}
    n_rows = 0
    for name in names:
        results[name], rows = evaluate_model(
            cfg, e.models[name], test, gen_records, val_path, name, tokenized_with=test_tokenizer
        )
        n_rows = max(n_rows, rows)  # 0 for a model the cache's ids mean nothing to
        tqdm.write(f"evaluate {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items()))

    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        **results,
        "n": {"test_sequences": len(test), "accuracy_examples": len(gen_records), "validation_rows": n_rows},
        "versions": versions(),
    }
    (out / "metrics.json").write_text(dump_metrics(metrics))
    (out / "metrics.md").write_text(markdown_table(results) + f"\n{versions_line()}\n")
    save_config(cfg, out / "evaluate_config.yaml")  # the resolved config next to the output
    # imported here, where the figure is drawn: computing metrics (evaluate_model, also run by the ablation)
    # never loads matplotlib nor switches its backend
    from pipeline.evaluation.plots import plot_curves, training_curves

    plot_curves(training_curves(e.models, e.plots), out / "curves.png")
    print(markdown_table(results))
    return metrics
