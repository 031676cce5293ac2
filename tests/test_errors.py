"""The stage CLIs' error boundary: an OtkdError (a problem the user can fix) is one `error:` line and exit 1;
anything else, even a ValueError, keeps its traceback so that a bug in otkd, torch or transformers shows
where it happened."""

import importlib
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cache.errors import CacheError, CacheMismatchError, OtkdError
from pipeline.config.base import save_config
from pipeline.config.params import Config
from tests.conftest import ROOT

# stage CLI -> the module whose `run` it calls
STAGES = {
    "prepare": "pipeline.data.prepare",
    "finetune_teacher": "pipeline.teacher.finetune",
    "cache_teacher": "pipeline.teacher.cache_teacher",
    "distill_student": "pipeline.distill.train",
    "evaluate": "pipeline.evaluation.evaluate",
    "plan": "pipeline.planning.plan",
}


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("errors") / "params.yaml"
    save_config(Config(), path)
    return str(path)


def invoke(name: str, params: str, monkeypatch, exc: BaseException):
    """Run stage `name` in process with its pipeline `run` replaced by one that raises `exc`."""

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(importlib.import_module(STAGES[name]), "run", boom)
    app = importlib.import_module(f"stages.{name}").app
    return CliRunner().invoke(app, ["--params", params])


@pytest.mark.parametrize("name", STAGES)
def test_otkd_error_is_one_line(name, params, monkeypatch):
    r = invoke(name, params, monkeypatch, CacheMismatchError("the cache was made by another teacher"))
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert r.stderr.strip().splitlines() == ["error: the cache was made by another teacher"]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyError("boom"), FileNotFoundError("boom")])
@pytest.mark.parametrize("name", STAGES)
def test_other_errors_are_not_swallowed(name, exc, params, monkeypatch):
    r = invoke(name, params, monkeypatch, exc)
    assert r.exit_code != 0 and r.exception is exc  # propagates as is: typer prints its traceback
    assert "error:" not in r.stderr


def run_plan(params: str, exc: str) -> subprocess.CompletedProcess:
    """The real `python -m stages.plan` (the lightest stage) with plan.run raising `exc`."""
    code = (
        f"import pipeline.planning.plan as p\n"
        f"from cache.errors import CacheError\n"
        f"def boom(*a, **k): raise {exc}\n"
        f"p.run = boom\n"
        f"from stages.plan import app\n"
        f"app()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, "--params", params], cwd=ROOT, env=env, text=True, capture_output=True
    )


def test_traceback_through_the_real_cli(params):
    p = run_plan(params, "ValueError('boom')")
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "boom" in p.stderr, p.stderr[-2000:]
    assert not [x for x in p.stderr.splitlines() if x.startswith("error:")]


def test_one_line_through_the_real_cli(params):
    p = run_plan(params, "CacheError('no teacher cache at x')")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == ["error: no teacher cache at x"], p.stderr[-2000:]


def test_user_errors_are_otkd_errors():
    """Every user-facing error class derives from OtkdError; ValueError stays a base where callers catch it."""
    from pipeline.data.records import DataError
    from pipeline.data.task import TaskSizeError
    from pipeline.evaluation.evaluate import EvaluationError
    from pipeline.models import ModelLoadError
    from pipeline.planning.memory import ModelConfigNotFoundError, PlanError

    for cls in (
        CacheError,
        CacheMismatchError,
        DataError,
        TaskSizeError,
        EvaluationError,
        ModelLoadError,
        PlanError,
        ModelConfigNotFoundError,
    ):
        assert issubclass(cls, OtkdError) and issubclass(cls, ValueError), cls
    assert issubclass(ModelConfigNotFoundError, FileNotFoundError)
