"""`dvc repro` end to end in a temporary copy of the repo: every stage, the metrics, and what reruns."""
import json
from pathlib import Path

import pytest

from pipeline.config import ModelShape, load_config, save_config
from tests.conftest import ROOT, commit_all, copy_project, ran, sh

STAGE2 = {"distill_student", "distill_student_ce", "distill_student_x", "distill_student_x_ce", "evaluate"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project's tracked files in a fresh git repo, with params shrunk to a ~1-minute pipeline."""
    dst = copy_project(tmp_path_factory.mktemp("repo"))
    cfg = load_config(ROOT / "params.yaml")
    # an easier task, learnt in ~40 s
    cfg.prepare.task, cfg.prepare.n_examples, cfg.prepare.n_digits = "digit_sum", 3000, 4
    cfg.prepare.teacher = ModelShape(64, 2, 4, 2, 256)
    cfg.prepare.student = ModelShape(64, 1, 4, 2, 128)
    cfg.finetune.epochs, cfg.finetune.lr, cfg.finetune.eval_examples = 20, 3e-3, 100
    cfg.distill.epochs = 4
    cfg.evaluate.eval_examples = 100
    save_config(cfg, dst / "params.yaml")
    commit_all(dst)
    return dst


@pytest.mark.slow
def test_repro_runs_everything_then_nothing_then_only_stage2(repo):
    log = sh("dvc", "repro", cwd=repo)
    assert ran(log) == {"prepare", "finetune_teacher", "cache_teacher"} | STAGE2
    m = json.loads((repo / "artifacts/metrics/metrics.json").read_text())
    base, distilled = m["student_base"], m["student_distilled"]
    assert distilled["accuracy"] > base["accuracy"]
    assert distilled["kl_teacher"] < base["kl_teacher"]
    for name in ("student_x", "student_x_ce"):  # its own tokenizer: no cache metrics, bits per character
        assert m[name]["kl_teacher"] is None and 0 < m[name]["bits_per_char"] < m["student_base"]["bits_per_char"]
    assert (repo / "artifacts/metrics/metrics.md").exists() and (repo / "artifacts/metrics/curves.png").exists()
    assert (repo / "dvc.lock").exists()

    assert ran(sh("dvc", "repro", cwd=repo)) == set()  # nothing changed, nothing runs

    cfg = load_config(repo / "params.yaml")
    cfg.distill.max_steps = 3  # a Stage-2 parameter only (and a short rerun of the five Stage-2 stages)
    save_config(cfg, repo / "params.yaml")
    assert ran(sh("dvc", "repro", cwd=repo)) == STAGE2
