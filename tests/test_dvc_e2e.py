"""`dvc repro` end to end in a temporary copy of the repo: every stage, the metrics, and what reruns."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.base import save_config
from pipeline.config.params import load_config
from tests.conftest import ROOT, commit_all, copy_project, ran, sh, small_config

STAGE2 = {"distill_student", "distill_student_ce", "distill_student_x", "distill_student_x_ce", "evaluate"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project's tracked files in a fresh git repo, with params shrunk to the tests' sizes (tests/conftest.py
    small_config: a 300-record task, 1-2 layer models, one epoch each): this test is about DVC's plumbing (every stage
    runs, writes what dvc.yaml declares, reruns only what a change affects); quality is the ablation's business."""
    dst = copy_project(tmp_path_factory.mktemp("repo"))
    cfg = load_config(ROOT / "params.yaml")
    small = small_config(Path("/unused"))
    cfg.prepare.task, cfg.prepare.n_digits, cfg.prepare.n_examples = "digit_sum", 6, 300
    cfg.prepare.tokenizer_vocab = small.prepare.tokenizer_vocab
    cfg.prepare.teacher, cfg.prepare.student = small.prepare.teacher, small.prepare.student
    cfg.finetune.epochs, cfg.finetune.batch_size, cfg.finetune.eval_examples = 1, 32, 16
    cfg.cache.k, cfg.cache.shard_rows = small.cache.k, small.cache.shard_rows
    cfg.distill.epochs, cfg.distill.batch_size = 1.0, 32
    cfg.evaluate.eval_examples, cfg.evaluate.batch_size, cfg.evaluate.max_new_tokens = 8, 32, 12
    save_config(cfg, dst / "params.yaml")
    commit_all(dst)
    return dst


def changed(repo: Path) -> set[str]:
    """Stages of the embedded default that `dvc status` reports as changed."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status", "--json"],
        cwd=repo,
        text=True,
        capture_output=True,
        check=True,
    ).stdout  # stdout alone: the JSON
    return {k for k in json.loads(out or "{}") if ":" not in k}


@pytest.mark.slow
def test_repro_runs_everything_then_nothing_then_only_stage2(repo):
    log = sh("dvc", "repro", cwd=repo)
    assert ran(log) == {"prepare", "finetune_teacher", "cache_teacher", "export_student"} | STAGE2
    m = metrics = json.loads((repo / "artifacts/metrics/metrics.json").read_text())
    base, distilled = m["student_base"], m["student_distilled"]
    assert distilled["kl_teacher"] < base["kl_teacher"] and distilled["perplexity"] < base["perplexity"]
    assert all(0 <= v["accuracy"] <= 1 for v in m.values() if isinstance(v, dict) and "accuracy" in v)
    for name in ("student_x", "student_x_ce"):  # its own tokenizer: no cache metrics, bits per character
        assert m[name]["kl_teacher"] is None and 0 < m[name]["bits_per_char"] < m["student_base"]["bits_per_char"]
    assert (repo / "artifacts/metrics/metrics.md").exists() and (repo / "artifacts/metrics/curves.png").exists()
    assert (repo / "dvc.lock").exists()
    export = repo / "artifacts/export"  # the distilled student, merged and ready to serve, with its model card
    assert (export / "config.json").exists() and list(export.glob("*.safetensors"))
    assert (export / "README.md").read_text().startswith("---\n") and not (export / "projection.pt").exists()

    assert ran(sh("dvc", "repro", cwd=repo)) == set()  # nothing changed, nothing runs
    assert all(metrics["versions"][k] for k in ("python", "torch", "transformers", "tokenizers", "peft", "zarr"))

    # what a change marks as changed (dvc status: no training needed to tell)
    cfg = load_config(repo / "params.yaml")
    cfg.distill.w_ot = 0.2  # read by the distilled students only, not by the CE-only baselines or Stage 1
    save_config(cfg, repo / "params.yaml")
    assert changed(repo) == {"distill_student", "distill_student_x"}
    cfg.distill.w_ot = 0.1
    save_config(cfg, repo / "params.yaml")
    assert changed(repo) == set()
    kl = repo / "pipeline/losses/kl.py"  # a Stage-2 loss edited: every Stage-2 stage and evaluate, never Stage 1
    original = kl.read_text()
    kl.write_text(original + "\n# an edit\n")
    assert changed(repo) == STAGE2
    kl.write_text(original)

    cfg = load_config(repo / "params.yaml")
    cfg.distill.max_steps = 3  # a Stage-2 parameter only (and a short rerun of the five Stage-2 stages)
    save_config(cfg, repo / "params.yaml")
    assert ran(sh("dvc", "repro", cwd=repo)) == STAGE2 | {"export_student"}  # a new student is exported again
