"""The exported student's model card: README.md in the Hugging Face format (YAML metadata, then Markdown) that says
which student, teacher, data, cache, losses and steps made the weights, how they were merged, and how they scored.

Pure functions of what the run recorded: the Stage-2 config saved with the student, the cache's root attributes
(its provenance), Stage 1's config.yaml beside the cache, the loss curves and the evaluation's metrics.json.
"""

import csv
import dataclasses
import math
from pathlib import Path

import yaml

from pipeline.config.distill import TEACHER_SETTINGS, DistillParams

METRICS = {  # metrics.json field -> (model-index metric type, name shown)
    "perplexity": ("perplexity", "perplexity (test split, own tokens)"),
    "bits_per_char": ("bits_per_char", "bits per character (test split)"),
    "accuracy": ("accuracy", "task accuracy (greedy answers)"),
    "top1_agreement": ("top1_agreement", "top-1 agreement with the teacher"),
    "kl_teacher": ("kl_teacher", "KL(teacher || model) on the cached top-k + tail, nats/token"),
    "entropy": ("entropy", "entropy, nats/token"),
}


def curves_file(params: DistillParams) -> Path:
    """Where Stage 2 wrote the training loss curve: <distill.plots>/train_<name of distill.out>.tsv (the name
    pipeline/distill/batches.py's curves_path gives it; not imported, which would tie the export to loss code)."""
    d = params.distill
    return Path(d.plots) / f"train_{Path(d.out).name}.tsv"


def training_steps(curves: Path, params: DistillParams) -> tuple[int | None, str]:
    """(optimizer steps the run took, how that is known).

    Stage 2 does not record its final step and the curve logs every logging_steps, so an epoch-based run's count is
    recomputed as transformers.Trainer does: ceil(epochs x updates per epoch), updates per epoch = ceil(micro-batches
    per epoch / grad_accum), the micro-batches per epoch from a logged row inside the first epoch (its epoch column is
    micro-batches done / micro-batches per epoch, and the micro-batches done are step x grad_accum there). A result
    that disagrees with the last logged step falls back to that step, said as such.
    """
    d = params.distill
    if d.max_steps > 0:
        return d.max_steps, "distill.max_steps"
    if not curves.is_file():
        return None, f"unknown: no loss curve at {curves}"
    with curves.open() as f:
        rows = [(int(r["step"]), float(r["epoch"])) for r in csv.DictReader(f, delimiter="\t")]
    if not rows:
        return None, f"unknown: the loss curve {curves} is empty"
    last = rows[-1][0]
    first_epoch = [(s, e) for s, e in rows if 0 < e < 1]  # the epoch's last update may take fewer micro-batches
    if first_epoch:
        s, e = max(first_epoch)
        micro = round(s * d.grad_accum / e)  # micro-batches per epoch and process
        steps = math.ceil(d.epochs * math.ceil(micro / d.grad_accum))
        if last <= steps < last + d.logging_steps:
            return steps, f"{d.epochs:g} epochs of {math.ceil(micro / d.grad_accum)} optimizer steps"
    return last, f"the last logged step in {curves}"


def provenance(attrs: dict, stage1: dict | None) -> tuple[dict, dict, dict]:
    """(teacher, data, cache) as the model card states them, from the cache's root attributes and Stage 1's
    config.yaml beside the cache (which names the data file; the attributes hold only its fingerprint)."""
    prov = attrs.get("provenance", {})
    teacher = {"name": prov.get("teacher"), "hash": prov.get("teacher_hash")}
    data = {
        "path": ((stage1 or {}).get("data") or {}).get("path"),
        "template": prov.get("template"),
        "max_length": prov.get("max_length"),
        "fingerprint": prov.get("dataset_fingerprint"),
        "train_sequences": attrs.get("n_sequences"),
        "supervised_tokens": attrs.get("n_rows"),
    }
    cache = {
        "k": attrs.get("k"),
        "logprob_dtype": attrs.get("logprob_dtype"),
        "hidden_codec": attrs.get("hidden_codec", attrs.get("hidden_dtype")),
        "hidden_size": attrs.get("hidden_size"),
        "schema_version": attrs.get("schema_version"),
    }
    return teacher, data, cache


def losses(params: DistillParams) -> tuple[dict, dict]:
    """(loss weights and KL settings, OT settings) of the Stage-2 run."""
    d = params.distill
    kl = {**d.weights, "cross_tokenizer": d.cross_tokenizer}
    kl.update({k: getattr(d, k) for k in TEACHER_SETTINGS if k not in ("ot", "ot_logits_temperature")})
    ot = {**dataclasses.asdict(d.ot), "ot_logits_temperature": d.ot_logits_temperature}
    return kl, ot


def metadata(name: str, info: dict) -> dict:
    """The YAML front matter: the Hub's own keys (base_model, model-index, ...) and everything else under `otkd`."""
    d = info["params"].distill
    own = info["metrics"].get(info["entry"], {}) if info["metrics"] else {}
    results = [
        {"type": METRICS[k][0], "name": METRICS[k][1], "value": v}
        for k, v in own.items()
        if k in METRICS and isinstance(v, (int, float))
    ]
    dataset = info["data"]["path"] or "unknown"
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": d.student if d.mode == "full" else info["export"]["merged_into"],
        "base_model_relation": "finetune",
        "tags": ["otkd", "knowledge-distillation", "optimal-transport"] + (["qlora"] if d.load_in_bits != 16 else []),
    }
    if results:
        meta["model-index"] = [
            {
                "name": Path(name).name,
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"name": dataset, "type": dataset, "split": "test"},
                        "metrics": results,
                    }
                ],
            }
        ]
    kl, ot = losses(info["params"])
    meta["otkd"] = {
        "student": {
            "base": d.student,
            "mode": d.mode,
            "load_in_bits": d.load_in_bits,
            "lora": dataclasses.asdict(d.lora) if d.mode == "lora" else None,
        },
        "export": info["export"],
        "teacher": info["teacher"],
        "data": info["data"],
        "cache": info["cache"],
        "losses": kl,
        "ot": ot,
        "training": {
            "steps": info["steps"][0],
            "steps_from": info["steps"][1],
            "epochs": d.epochs,
            "max_steps": d.max_steps,
            "lr": d.lr,
            "batch_size": d.batch_size,
            "grad_accum": d.grad_accum,
            "warmup_ratio": d.warmup_ratio,
            "train_fraction": d.train_fraction,
            "optim": d.optim,
            "dtype": d.dtype,
            "seed": info["params"].seed,
        },
        "evaluation": {"entry": info["entry"], **({k: v for k, v in info["metrics"].items() if k != "versions"})}
        if info["metrics"]
        else None,
        "versions": {"export": info["versions"], "evaluation": (info["metrics"] or {}).get("versions")},
    }
    return meta


def evaluation_table(metrics: dict, entry: str) -> list[str]:
    """The evaluation's models as a Markdown table, this model's row in bold."""
    rows = {k: v for k, v in metrics.items() if isinstance(v, dict) and "perplexity" in v}
    cols = [k for k in METRICS if any(k in r for r in rows.values())]
    out = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        cells = ["—" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]
        label = f"**{name}** (this model)" if name == entry else name
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def model_card(name: str, info: dict) -> str:
    """README.md of the export; `info` holds params, export, teacher, data, cache, steps, metrics, entry,
    versions (see export.py) and config (the Stage-2 config.yaml text)."""
    meta = metadata(name, info)
    o = meta["otkd"]
    d = info["params"].distill
    weights = ", ".join(f"{k} = {v:g}" for k, v in d.weights.items() if v)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {Path(name).name}: `{d.student}` distilled from `{o['teacher']['name']}`",
        "",
        f"`{d.student}` distilled by otkd from the teacher `{o['teacher']['name']}`, "
        "which it never ran beside: the teacher wrote its top-k log-probabilities (and hidden states) to a cache "
        "once, the student trained against that cache alone. A plain `transformers` checkpoint "
        f"({o['export']['dtype']}, sharded safetensors): no peft, no otkd needed to load or serve it.",
        "",
        "## How it was made",
        "",
        f"- **Student**: `{d.student}`, "
        + ("full fine-tuning" if d.mode == "full" else f"LoRA r={d.lora.r}, alpha={d.lora.alpha}")
        + (f" on its {d.load_in_bits}-bit weights (QLoRA)" if d.load_in_bits != 16 else "")
        + ("" if d.mode == "full" else f"; {o['export']['note']}")
        + ".",
        f"- **Teacher**: `{o['teacher']['name']}` (hash {o['teacher']['hash']}).",
        f"- **Data**: `{o['data']['path']}` ({o['data']['template']} template, max_length {o['data']['max_length']}; "
        f"{o['data']['train_sequences']} cached training sequences, {o['data']['supervised_tokens']} supervised "
        f"tokens; fingerprint {o['data']['fingerprint']}).",
        f"- **Cache**: top-k = {o['cache']['k']} log-probs ({o['cache']['logprob_dtype']}) + tail mass per "
        f"supervised token, hidden states {o['cache']['hidden_codec'] or 'none'}, cache schema "
        f"{o['cache']['schema_version']}.",
        f"- **Losses**: {weights}; KL temperature {d.temperature:g}, tail {d.kl_tail}"
        + (", reverse" if d.kl_reverse else "")
        + (f", exact teacher from `{d.teacher_head}`" if d.teacher_head else "")
        + (", across tokenizers" if d.cross_tokenizer else "")
        + ".",
        f"- **OT**: eps {d.ot.eps:g} ({d.ot.eps_scale}), objective {d.ot.objective}, tol {d.ot.tol:g}, max_iter "
        f"{d.ot.max_iter}; logits score temperature {d.ot_logits_temperature:g}.",
        f"- **Training**: {o['training']['steps'] if o['training']['steps'] is not None else 'unknown'} optimizer "
        f"steps ({o['training']['steps_from']}), lr {d.lr:g}, batch {d.batch_size} x {d.grad_accum} accumulation, "
        f"optimizer {d.optim}, seed {info['params'].seed}.",
        "",
        "## Evaluation",
        "",
    ]
    if info["metrics"]:
        lines += evaluation_table(info["metrics"], info["entry"])
        n = info["metrics"].get("n")
        lines += ["", f"Counts: {', '.join(f'{k} {v}' for k, v in n.items())}." if n else ""]
    else:
        lines += ["Not evaluated (the export was made without --metrics)."]
    check = o["export"]["logits_vs_trained"]
    lines += [
        "",
        "## Checks",
        "",
        f"Logits of this checkpoint vs the trained student ({o['export']['trained_as']}) on a fixed batch of "
        f"{check['tokens']} tokens: relative error {check['relative_error']:.2g} ({o['export']['dtype']} tolerance "
        f"{check['tolerance']:.2g}), max |difference| {check['max_abs_diff']:.2g} (largest logit "
        f"{check['max_abs_logit']:.3g}), top-1 agreement {check['top1_agreement']:.1%}. {check['verdict']}",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        f"Serve it with an OpenAI-compatible server, e.g. `vllm serve {name}` (vLLM) or TGI's "
        f"`--model-id {name}`; llama.cpp's `convert_hf_to_gguf.py` reads the folder as it is.",
        "",
        "## Versions",
        "",
        "Export: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
    ]
    if (info["metrics"] or {}).get("versions"):
        lines.append("Evaluation: " + ", ".join(f"{k} {v}" for k, v in info["metrics"]["versions"].items()) + ".")
    lines += ["", "<details><summary>The Stage-2 config (config.yaml)</summary>", "", "```yaml"]
    lines += [info["config"].rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)
