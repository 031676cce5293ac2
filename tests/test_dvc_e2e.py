"""`dvc repro` end to end in a temporary copy of the repo: every stage, the metrics, and what reruns."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ModelShape, load_config, save_config
from tests.conftest import ROOT

STAGE2 = {"distill_student", "distill_student_ce", "distill_student_kl", "evaluate"}


def sh(*cmd: str, cwd: Path) -> str:
    # `python` in dvc.yaml must be this interpreter (the one with otkd installed)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "2", "PYTHONPATH": str(cwd)}
    p = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project's tracked files in a fresh git repo, with params shrunk to a ~1-minute pipeline."""
    dst = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, text=True,
                           capture_output=True, check=True).stdout.split()
    for f in files:
        if f == "dvc.lock" or not (ROOT / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    cfg = load_config(ROOT / "params.yaml")
    cfg.prepare.n_examples, cfg.prepare.n_digits = 3000, 4  # an easier task: learnt in ~40 s
    cfg.prepare.teacher = ModelShape(64, 2, 4, 2, 256)
    cfg.prepare.student = ModelShape(64, 1, 4, 2, 128)
    cfg.finetune.epochs, cfg.finetune.lr, cfg.finetune.eval_examples = 20, 3e-3, 100
    cfg.distill.epochs = 4
    cfg.evaluate.eval_examples = 100
    save_config(cfg, dst / "params.yaml")
    sh("git", "init", "-q", cwd=dst)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=dst)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy", cwd=dst)
    return dst


@pytest.mark.slow
def test_repro_runs_everything_then_nothing_then_only_stage2(repo):
    log = sh("dvc", "repro", cwd=repo)
    assert ran(log) == {"prepare", "finetune_teacher", "cache_teacher"} | STAGE2
    m = json.loads((repo / "artifacts/metrics/metrics.json").read_text())
    base, distilled = m["student_base"], m["student_distilled"]
    assert distilled["accuracy"] > base["accuracy"]
    assert distilled["kl_teacher"] < base["kl_teacher"]
    assert (repo / "artifacts/metrics/metrics.md").exists() and (repo / "artifacts/metrics/curves.png").exists()
    assert (repo / "dvc.lock").exists()

    assert ran(sh("dvc", "repro", cwd=repo)) == set()  # nothing changed, nothing runs

    cfg = load_config(repo / "params.yaml")
    cfg.distill.lr *= 0.5  # a Stage-2 parameter only
    save_config(cfg, repo / "params.yaml")
    assert ran(sh("dvc", "repro", cwd=repo)) == STAGE2
