"""The export: the trained Stage-2 student as a plain transformers checkpoint (sharded safetensors, tokenizer,
generation config) with a model card, written whole or not at all.

    python -m stages.export_student [--student artifacts/student] [--out artifacts/export] [--dtype bfloat16]

Everything the export reads is checked before any weight loads (the student folder, the cache's provenance, the
evaluation's metrics), so a refusal is one line and writes nothing. The files go to a hidden sibling folder that
replaces `out` only once it is complete and has been reloaded and checked: a crash leaves no half export.
"""

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from cache import location
from cache.schema import read_root_attrs
from pipeline.distill.student import load_trained
from pipeline.export.card import curves_file, model_card, provenance, training_steps
from pipeline.export.merge import ExportError, compare, exact_4bit, logits, merge, probe_ids, read_student, tolerance
from pipeline.models import load_tokenizer
from pipeline.versions import versions

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZED_BASES = ("auto", "original", "dequantized")
TRAINING_ONLY = ("projection.pt", "tok_projection.pt", "checkpoints", "config.yaml")
"""What Stage 2 leaves in the student folder that serving does not use (config.yaml goes into the model card)."""
STAGE1 = "python -m stages.cache_teacher"
EVALUATE = "python -m stages.evaluate"


@dataclass(frozen=True)
class ExportOptions:
    """What `python -m stages.export_student` takes (its --help explains each)."""

    student: str = "artifacts/student"
    out: str = "artifacts/export"
    dtype: str = "bfloat16"
    max_shard_size: str = "5GB"
    base: str | None = None
    quantized_base: str = "auto"
    cache: str | None = None  # None: distill.cache of the student's config.yaml
    metrics: str = "artifacts/metrics/metrics.json"  # "": export without evaluation metrics
    metrics_entry: str = "student_distilled"
    curves: str | None = None  # None: where Stage 2 wrote the student's loss curve


def check_options(o: ExportOptions) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    if o.dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {o.dtype!r}")
    if o.quantized_base not in QUANTIZED_BASES:
        raise ExportError(f"--quantized-base must be one of {', '.join(QUANTIZED_BASES)}, got {o.quantized_base!r}")
    try:
        convert_file_size_to_int(o.max_shard_size if not o.max_shard_size.isdigit() else int(o.max_shard_size))
    except ValueError:
        raise ExportError(f"--max-shard-size must be a size such as 5GB or 500MB, got {o.max_shard_size!r}") from None
    student, out = Path(o.student).resolve(), Path(o.out).resolve()
    if out == student or student in out.parents or out in student.parents:
        raise ExportError(f"--out {o.out} must be outside the student folder {o.student} (and not contain it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {o.out} is a file; give a folder")


def read_cache(cache: str) -> tuple[dict, dict | None]:
    """(root attributes of the cache's train.zarr, Stage 1's config.yaml beside it or None)."""
    store = location.join(location.loc(cache), "train.zarr")
    if not location.exists(store):
        raise ExportError(
            f"no teacher cache at {store}: the model card states its teacher, k and codec — give --cache, the folder "
            f"of the cache the student trained on (or rerun `{STAGE1}`)"
        )
    saved = location.join(location.loc(cache), "config.yaml")
    return read_root_attrs(store), yaml.safe_load(location.read_bytes(saved)) if location.exists(saved) else None


def read_metrics(path: str, entry: str) -> dict | None:
    """The evaluation's metrics.json, which must hold this student's row `entry`; None when path is ""."""
    if not path:
        return None
    if not Path(path).is_file():
        raise ExportError(
            f"no evaluation metrics at {path}: run `{EVALUATE}` first, or pass --metrics '' to export without them"
        )
    metrics = json.loads(Path(path).read_text())
    if entry not in metrics:
        models = [k for k, v in metrics.items() if isinstance(v, dict) and "perplexity" in v]
        raise ExportError(
            f"{path} has no model {entry!r} (it has {', '.join(models)}): pass --metrics-entry, the name "
            "evaluate.models gives this student"
        )
    return metrics


def trained_as(params) -> str:
    d = params.distill
    if d.mode == "full":
        return "the student folder as saved"
    return f"{d.student} in {d.load_in_bits} bits + the adapter, unmerged"


def verdict(source: str, cmp: dict, tol: float, merge_diff: float | None) -> str:
    if source == "original":  # the adapter trained against quantised weights; the export has the original ones
        return (
            "The difference is the quantisation error of the base the adapter trained on (the export holds the "
            "original 16-bit weights), not a merge error: merged and unmerged adapter on the same base differ by "
            f"{merge_diff:.2g} (relative) in float32."
        )
    if cmp["relative_error"] <= tol:
        return "Within the tolerance: this checkpoint computes what the trained student computes."
    return "OUTSIDE the tolerance: compare this checkpoint with the student before serving it."


def tidy(folder: Path) -> None:
    """What a shipped folder should not carry over from this machine: the load-time flags transformers records in
    tokenizer_config.json (is_local, local_files_only: true would keep a hub user offline), and the owner-only
    permissions of the files transformers writes through a temporary file (a server running as another user could
    not read the shards)."""
    tok = folder / "tokenizer_config.json"
    if tok.is_file():
        cfg = json.loads(tok.read_text())
        for k in ("is_local", "local_files_only"):
            cfg.pop(k, None)
        tok.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def replace_folder(tmp: Path, out: Path) -> None:
    """`out` becomes `tmp`: an earlier export there is removed only now that the new one is complete."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def run(o: ExportOptions) -> dict:
    """Export the student of `o.student` to `o.out`; returns what the model card's `otkd.export` says."""
    check_options(o)
    student, out, dtype = Path(o.student), Path(o.out), DTYPES[o.dtype]
    params = read_student(student)
    d = params.distill
    if o.quantized_base != "auto" and d.load_in_bits == 16:
        raise ExportError(
            f"--quantized-base is for a student trained on quantised weights; {student} trained in 16 bits"
        )
    attrs, stage1 = read_cache(o.cache or d.cache)
    metrics = read_metrics(o.metrics, o.metrics_entry)
    steps = training_steps(Path(o.curves) if o.curves else curves_file(params), params)

    tokenizer = load_tokenizer(str(student))
    ids = probe_ids(len(tokenizer))  # (B, N)
    ref = logits(exact_4bit(load_trained(student)), ids)  # (B, N, V) the student as it trained: the reference
    merged = merge(student, params, ids, o.base, o.quantized_base)
    model, merged.model = merged.model.to(dtype), None
    model.config.use_cache = True  # Stage 2 turns the KV cache off for training; generation wants it

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, max_shard_size=o.max_shard_size)
        tokenizer.save_pretrained(tmp)
        tidy(tmp)
        del model
        # the check reads the files, as a user loads them (in memory, .to(dtype) also rounds buffers such as RoPE's
        # inv_freq, which from_pretrained keeps in float32)
        exported = logits(AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype), ids)  # (B, N, V)
        cmp, tol = compare(exported, ref), tolerance(dtype)
        export = {
            "dtype": o.dtype,
            "merged_into": merged.base,
            "base_source": merged.source,
            "note": merged.note,
            "merge_diff_fp32": merged.merge_diff,
            "adapter_effect_fp32": merged.adapter_effect,
            "base_weight_distance": merged.weight_distance,
            "trained_as": trained_as(params),
            "logits_vs_trained": {
                **cmp,
                "tolerance": tol,
                "tokens": ids.numel(),
                "verdict": verdict(merged.source, cmp, tol, merged.merge_diff),
            },
            "not_exported": [f for f in TRAINING_ONLY if (student / f).exists()],
            "options": asdict(o),
        }
        teacher, data, cache = provenance(attrs, stage1)
        info = {
            "params": params,
            "export": export,
            "teacher": teacher,
            "data": data,
            "cache": {**cache, "path": str(o.cache or d.cache)},
            "steps": steps,
            "metrics": metrics,
            "entry": o.metrics_entry,
            "versions": versions(),
            "config": (student / "config.yaml").read_text(),
        }
        (tmp / "README.md").write_text(model_card(o.out, info), encoding="utf-8")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(export, out)
    if export["logits_vs_trained"]["verdict"].startswith("OUTSIDE"):
        warnings.warn(f"{out}: {export['logits_vs_trained']['verdict']}", stacklevel=2)
    return export


def report(export: dict, out: Path) -> None:
    shards = sorted(out.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards) / 2**20
    c = export["logits_vs_trained"]
    print(
        f"export: {export['note']}; {export['dtype']}, {len(shards)} safetensors file(s), {size:.1f} MiB -> {out}\n"
        f"export: logits vs the trained student: relative error {c['relative_error']:.2g} (tolerance "
        f"{c['tolerance']:.2g}), max |diff| {c['max_abs_diff']:.2g}, top-1 agreement {c['top1_agreement']:.1%}. "
        f"{c['verdict']}\n"
        f"export: not exported (training only): {', '.join(export['not_exported']) or 'nothing'}; model card "
        f"{out / 'README.md'}"
    )
