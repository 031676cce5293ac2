"""`python -m stages.evaluate`: metrics for teacher, base, CE-only and distilled students; table; curves PNG."""
import json
from pathlib import Path

import pytest

from pipeline.distill import train as distill
from pipeline.config import save_config
from pipeline.distill.batches import curves_path
from pipeline.evaluation.evaluate import KEYS, made_by_stage2
from tests.conftest import distill_cfg, make_cache, read_tsv, stage


def test_evaluate_writes_metrics_table_and_curves(tiny, tmp_path):
    cfg = make_cache(tiny, tmp_path / "cache")
    kd = distill_cfg(cfg, tmp_path / "student", max_steps=6, logging_steps=2)
    ce = distill_cfg(cfg, tmp_path / "student_ce", max_steps=6, logging_steps=2, w_kl=0.0, w_ot=0.0,
                     w_ot_logits=0.0)
    distill.run(kd)
    distill.run(ce)
    assert curves_path(kd.distill) != curves_path(ce.distill)
    header = set(read_tsv(curves_path(ce.distill))[0])
    assert "ce" in header and not header & {"kl", "ot_hidden", "ot_logits"}  # skipped, not computed as 0

    base = str(Path(cfg.prepare.out_models) / "student")
    cfg.evaluate.models = {"teacher": cfg.cache.teacher, "student_base": base,
                           "student_ce": ce.distill.out, "student_distilled": kd.distill.out}
    cfg.evaluate.cache, cfg.evaluate.plots = cfg.cache.out, kd.distill.plots
    cfg.evaluate.out, cfg.evaluate.eval_examples = str(tmp_path / "metrics"), 4
    save_config(cfg, tmp_path / "p.yaml")
    stage("evaluate", "--params", str(tmp_path / "p.yaml"))

    out = tmp_path / "metrics"
    m = json.loads((out / "metrics.json").read_text())
    assert list(m)[:4] == list(cfg.evaluate.models) and m["n"]["accuracy_examples"] == 4
    for name in cfg.evaluate.models:
        assert set(m[name]) == set(KEYS)
        assert 0 <= m[name]["accuracy"] <= 1 and 0 <= m[name]["top1_agreement"] <= 1
        assert m[name]["perplexity"] >= 1 and m[name]["kl_teacher"] >= 0
    # the cache was written by this teacher: if rows were misaligned with positions, it would disagree with itself
    assert m["teacher"]["top1_agreement"] > 0.97 and m["teacher"]["kl_teacher"] < 1e-3
    assert m["student_ce"]["perplexity"] < m["student_base"]["perplexity"]  # 6 CE steps at lr 1e-2 help
    table = (out / "metrics.md").read_text()
    assert all(f"| {name} |" in table for name in cfg.evaluate.models)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # curve files are named after the output folder: base/student must not borrow student's curves
    assert made_by_stage2(kd.distill.out) and not made_by_stage2(base)


def test_perplexity_and_entropy_match_a_float64_reference(tiny):
    """Both over the supervised tokens only, from padded batches (the tiny model has no padded logit columns)."""
    import math

    import torch

    from pipeline.data.records import load_splits
    from pipeline.evaluation.evaluate import perplexity
    from pipeline.models import load_causal_lm, load_tokenizer

    path = str(Path(tiny.prepare.out_models) / "student")
    tok, model = load_tokenizer(path), load_causal_lm(path, "fp32")
    records = load_splits(tiny.data, tok, log=lambda *_: None)["test"].to_list()[:7]
    V = len(tok)
    nll, ent, n = 0.0, 0.0, 0
    for r in records:  # one unpadded sequence at a time, float64
        ids = torch.tensor([r["input_ids"]])
        logp = model(input_ids=ids).logits[0, :-1, :V].double().log_softmax(-1)  # (T-1, V)
        for t, y in enumerate(r["labels"][1:]):
            if y != -100:
                nll -= float(logp[t, y])
                ent -= float((logp[t].exp() * logp[t]).sum())
                n += 1
    ppl, entropy = perplexity(model, records, tok.pad_token_id, V, batch_size=3)  # padded batches
    assert n > 7 and ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert entropy == pytest.approx(ent / n, rel=1e-4) and 0 < entropy < math.log(V)
