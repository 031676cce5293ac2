"""The loss table (pipeline/distill/terms.py): every weight of DistillConfig switches exactly the terms it names, and
the step runs exactly the enabled entries. The terms' values are checked against references in test_distill.py
(one tokenizer, full-logits reference), test_crosstok.py, test_chunk_kl.py and test_exact_teacher.py."""

import dataclasses

import pytest

from pipeline.config.distill import DistillConfig
from pipeline.distill.batches import TERM_NAMES
from pipeline.distill.terms import TERMS


def test_every_weight_of_the_config_has_a_term_and_every_term_a_weight():
    weights = {f.name for f in dataclasses.fields(DistillConfig) if f.name.startswith("w_")}
    in_table = {w for t in TERMS for w in t.weights}
    assert weights == in_table
    assert TERM_NAMES == tuple(dict.fromkeys(n for t in TERMS for n in t.logs))
    assert len({t.fn for t in TERMS}) == len(TERMS)  # one function per entry


ZERO = dict(w_ce=0.0, w_kl=0.0, w_ot=0.0, w_ot_logits=0.0, w_uld=0.0, w_tok_ot=0.0, w_chunk_kl=0.0, w_alm=0.0)


@pytest.mark.parametrize(
    "weights, cross, expect",
    [
        (dict(w_ce=1.0), False, ["ce_kl"]),
        (dict(w_kl=1.0), False, ["ce_kl"]),  # KL alone still runs the fused pass (CE weighted 0)
        (dict(w_ce=1.0), True, ["ce"]),
        (dict(w_ce=1.0, w_kl=1.0, w_ot=0.1, w_ot_logits=0.1), False, ["ce_kl", "ot_hidden", "ot_logits"]),
        (dict(w_ce=1.0, w_kl=1.0, w_ot=0.1, w_ot_logits=0.1), True, ["ce", "mapped_kl", "ot_hidden", "ot_logits"]),
        (dict(w_uld=1.0, w_tok_ot=1.0), False, ["uld", "tok_ot"]),
        (dict(w_chunk_kl=1.0, w_alm=1.0), True, ["chunk_kl_term", "alm"]),
        ({}, False, []),
    ],
)
def test_a_term_runs_when_one_of_its_weights_is_on_and_its_tokenizer_case_applies(weights, cross, expect):
    # the table is read with any object carrying the weights: the config's own checks are tested in test_config.py
    cfg = type("W", (), {**ZERO, **weights})()
    assert [t.fn.__name__ for t in TERMS if t.enabled(cfg, cross)] == expect
