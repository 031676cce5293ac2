"""`python -m stages.evaluate`: metrics for teacher, base, CE-only and distilled students; table; curves PNG."""

import json
from pathlib import Path

import pytest

from pipeline.config.base import save_config
from pipeline.distill import train as distill
from pipeline.distill.batches import curves_path
from pipeline.evaluation.evaluate import KEYS
from pipeline.evaluation.plots import made_by_stage2
from tests.conftest import distill_cfg, make_cache, read_tsv, stage


def test_evaluate_writes_metrics_table_and_curves(tiny, tmp_path):
    cfg = make_cache(tiny, tmp_path / "cache")
    kd = distill_cfg(cfg, tmp_path / "student", max_steps=6, logging_steps=2)
    ce = distill_cfg(cfg, tmp_path / "student_ce", max_steps=6, logging_steps=2, w_kl=0.0, w_ot=0.0, w_ot_logits=0.0)
    distill.run(kd)
    distill.run(ce)
    assert curves_path(kd.distill) != curves_path(ce.distill)
    header = set(read_tsv(curves_path(ce.distill))[0])
    assert "ce" in header and not header & {"kl", "ot_hidden", "ot_logits"}  # skipped, not computed as 0

    base = str(Path(cfg.prepare.out_models) / "student")
    cfg.evaluate.models = {
        "teacher": cfg.cache.teacher,
        "student_base": base,
        "student_ce": ce.distill.out,
        "student_distilled": kd.distill.out,
    }
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


def test_perplexity_entropy_and_bits_per_char_match_a_float64_reference(tiny):
    """All three over the supervised tokens only, from padded batches (the tiny model has no padded logit columns);
    bits per character also over a record cut at max_length, whose lost end-of-sequence marker is not counted."""
    import math

    import torch

    from pipeline.data.records import load_splits, tokenize
    from pipeline.evaluation.evaluate import perplexity, supervised_chars
    from pipeline.models import load_causal_lm, load_tokenizer

    path = str(Path(tiny.prepare.out_models) / "student")
    tok, model = load_tokenizer(path), load_causal_lm(path, "fp32")
    whole = load_splits(tiny.data, tok, log=lambda *_: None)["test"].to_list()[:7]
    long = {**whole[-1], "output": whole[-1]["output"] + "0123456789"}  # a longer answer than the others'
    ids = tokenize(long, tok, tiny.data.template, max_length=10**6)[0]["input_ids"]
    cut, truncated = tokenize(long, tok, tiny.data.template, max_length=len(ids) - 1)  # loses the marker only
    max_length = len(cut["input_ids"])  # the cut record hits it, the others stay below: they are whole
    records = whole[:-1] + [{**long, **cut}]
    assert truncated and ids[-1] == tok.eos_token_id and all(len(r["input_ids"]) < max_length for r in whole)
    chars = [len(r["output"]) + 1 for r in whole[:-1]] + [len(long["output"])]  # characters, not bytes
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
    ppl, entropy, bpc = perplexity(model, records, tok, max_length, batch_size=3)  # padded batches
    assert n > 7 and ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert entropy == pytest.approx(ent / n, rel=1e-4) and 0 < entropy < math.log(V)
    assert bpc == pytest.approx(nll / math.log(2) / sum(chars), rel=1e-4)
    # a whole record exactly max_length long is decoded: its text and its marker, counted as one character
    assert supervised_chars(whole[0], tok, len(whole[0]["input_ids"])) == len(whole[0]["output"]) + 1


def test_a_model_with_another_tokenizer_is_scored_in_its_own_tokens(tiny, tmp_path):
    """The test records are tokenised again for it (the same examples), its cache metrics are missing (null in
    strict JSON, "—" in the table) and the rest is measured; the teacher sharing the cache's tokenizer keeps all."""
    import copy
    import math
    from dataclasses import asdict

    from pipeline.data.records import ALPACA_TEMPLATE, load_splits, read_records, tokenizer_hash
    from pipeline.data.tiny import build_model, build_tokenizer
    from pipeline.evaluation.evaluate import markdown_table, perplexity, retokenize, run
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.teacher import cache_teacher

    texts = [ALPACA_TEMPLATE.format(**r) + r["output"] for r in read_records(tiny.data.path)]
    tok_x = build_tokenizer(texts, tmp_path / "tokenizer_x", tiny.prepare.tokenizer_vocab - 64)
    other = str(tmp_path / "student_x")
    build_model(tok_x, other, **asdict(tiny.prepare.student), vocab_multiple=tiny.prepare.vocab_multiple)
    tok = load_tokenizer(tiny.cache.teacher)
    assert tokenizer_hash(tok_x) != tokenizer_hash(tok)

    # the split is chosen by the prompt: the same records, in other ids (what retokenize relies on)
    test = load_splits(tiny.data, tok, log=lambda *_: None)["test"].to_list()
    test_x = load_splits(tiny.data, tok_x, log=lambda *_: None)["test"].to_list()
    assert [r["sample_id"] for r in test] == [r["sample_id"] for r in test_x]
    assert retokenize(test, tok_x, tiny.data) == test_x and test != test_x

    cfg = copy.deepcopy(tiny)
    cfg.cache.out, cfg.cache.splits = str(tmp_path / "cache"), ["validation"]
    cache_teacher.run(cfg)
    cfg.evaluate.models = {"teacher": cfg.cache.teacher, "student_x": other}  # test tokenised with the teacher's
    cfg.evaluate.cache, cfg.evaluate.plots, cfg.evaluate.out = cfg.cache.out, str(tmp_path), str(tmp_path / "m")
    cfg.evaluate.eval_examples, cfg.evaluate.max_new_tokens = 4, 4
    run(cfg)

    def no_nan(const):
        raise ValueError(f"{const} is not JSON")

    m = json.loads((tmp_path / "m/metrics.json").read_text(), parse_constant=no_nan)
    x, teacher = m["student_x"], m["teacher"]
    assert set(x) == set(KEYS) and x["top1_agreement"] is None and x["kl_teacher"] is None
    assert all(math.isfinite(x[k]) for k in ("perplexity", "bits_per_char", "accuracy", "entropy"))
    assert all(math.isfinite(teacher[k]) for k in KEYS) and m["n"]["validation_rows"] > 0
    ppl, _, bpc = perplexity(load_causal_lm(other, "fp32"), test_x, tok_x, tiny.data.max_length, batch_size=8)
    assert x["perplexity"] == pytest.approx(ppl, rel=1e-4) and x["bits_per_char"] == pytest.approx(bpc, rel=1e-4)
    rows = {
        line.split(" | ")[0][2:]: line.split(" | ") for line in (tmp_path / "m/metrics.md").read_text().splitlines()[2:]
    }
    assert rows["student_x"][4:6] == ["—", "—"] and "—" not in rows["teacher"] and "nan" not in str(rows)
    assert "| — | — | 0.5" in markdown_table(
        {"y": {**teacher, "top1_agreement": math.nan, "kl_teacher": None, "entropy": 0.5}}
    )


def test_computing_metrics_does_not_import_matplotlib():
    """Plotting is pipeline/evaluation/plots.py, imported only where curves.png is drawn: the metrics code (also
    run by the ablation's students) neither loads matplotlib nor switches its backend."""
    import subprocess
    import sys

    code = (
        "import sys, pipeline.evaluation.evaluate, pipeline.ablation; assert 'matplotlib' not in sys.modules; "
        "import pipeline.evaluation.plots, matplotlib; assert matplotlib.get_backend().lower() == 'agg'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
