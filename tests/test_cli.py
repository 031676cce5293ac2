"""Every named option of every stage CLI lands in the config field (or argument) it promises.

Each case runs a stage's typer app in process (typer.testing.CliRunner) with the stage's `run` replaced by a
recorder, then checks the Config (and the extra arguments) that `run` would have received. The stages import
their pipeline module inside the command; the recorder is set on that module object, which the late import
returns. `test_every_option_has_a_case` fails when an option has no case, so a new option needs one.
"""

import importlib

import pytest
import typer
import yaml
from typer.testing import CliRunner

from tests.conftest import ROOT

PARAMS = str(ROOT / "params.yaml")
# stage -> (the pipeline module its command imports late, the names of run()'s arguments after the config)
STAGES = {
    "prepare": ("pipeline.data.prepare", ()),
    "finetune_teacher": ("pipeline.teacher.finetune", ()),
    "cache_teacher": ("pipeline.teacher.cache_teacher", ("replace_mismatched",)),
    "distill_student": ("pipeline.distill.train", ()),
    "evaluate": ("pipeline.evaluation.evaluate", ()),
    "plan": ("pipeline.planning.plan", ("gpu_gb", "out")),
}
# (stage, command-line arguments, expected values: "section.field" in the Config, or a name of STAGES' extras)
CASES = [
    ("prepare", ["--set", "prepare.n_examples=123", "--set", "seed=7"], {"prepare.n_examples": 123, "seed": 7}),
    (
        "finetune_teacher",
        ["--base", "b/teacher", "--out", "ft/out", "--mode", "lora"],
        {"finetune.base": "b/teacher", "finetune.out": "ft/out", "finetune.mode": "lora"},
    ),
    (
        "cache_teacher",
        ["--teacher", "t/x", "--out", "c/out", "--k", "7", "--hidden-codec", "none", "--replace-mismatched"],
        {
            "cache.teacher": "t/x",
            "cache.out": "c/out",
            "cache.k": 7,
            "cache.hidden_codec": "none",
            "replace_mismatched": True,
        },
    ),
    ("cache_teacher", ["--no-replace-mismatched"], {"replace_mismatched": False}),
    (
        "distill_student",
        [
            "--student",
            "s/x",
            "--cache",
            "c/x",
            "--out",
            "d/out",
            "--mode",
            "lora",
            "--load-in-bits",
            "4",
            "--max-steps",
            "3",
            "--resume",
            "--teacher-head",
            "t/x",
        ],
        {
            "distill.student": "s/x",
            "distill.cache": "c/x",
            "distill.out": "d/out",
            "distill.mode": "lora",
            "distill.load_in_bits": 4,
            "distill.max_steps": 3,
            "distill.resume": True,
            "distill.teacher_head": "t/x",
        },
    ),
    ("distill_student", ["--set", "distill.resume=true", "--no-resume"], {"distill.resume": False}),
    ("evaluate", ["--out", "m/out", "--eval-examples", "0"], {"evaluate.out": "m/out", "evaluate.eval_examples": 0}),
    (
        "plan",
        ["--gpu-gb", "16", "--max-length", "4096", "--out", "p/plan.json"],
        {"gpu_gb": 16.0, "data.max_length": 4096, "out": "p/plan.json"},
    ),
    ("plan", [], {"gpu_gb": 24.0, "out": None}),  # the defaults
]


def app_of(stage: str) -> typer.Typer:
    return importlib.import_module(f"stages.{stage}").app


def invoke(stage: str, args: list[str], monkeypatch, params: str = PARAMS) -> dict:
    """Run the stage's CLI with `run` recorded; the Config it got and its extra arguments by name."""
    module, extras = STAGES[stage]
    calls = []
    monkeypatch.setattr(importlib.import_module(module), "run", lambda cfg, *a: calls.append((cfg, a)))
    result = CliRunner().invoke(app_of(stage), ["--params", params, *args])
    assert result.exit_code == 0, f"{stage} {args}: {result.output}{result.exception!r}"
    ((cfg, rest),) = calls
    return {"cfg": cfg, **dict(zip(extras, rest))}


def field(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("stage, args, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_option_lands_in_its_field(stage, args, expected, monkeypatch):
    got = invoke(stage, args, monkeypatch)
    for key, value in expected.items():
        actual = field(got["cfg"], key) if key not in STAGES[stage][1] else got[key]
        assert actual == value, (stage, key)


# stage -> a section it reads, a field of it and two values, and a section it does not read (None: reads them all)
SECTION_OF = {
    "prepare": ("prepare", "n_examples", 77, 78, "cache"),
    "finetune_teacher": ("finetune", "batch_size", 77, 78, "distill"),
    "cache_teacher": ("cache", "chunk_rows", 77, 78, "distill"),
    "distill_student": ("distill", "batch_size", 77, 78, "cache"),
    "evaluate": ("evaluate", "batch_size", 77, 78, "finetune"),
    "plan": ("cache", "chunk_rows", 77, 78, None),
}


@pytest.mark.parametrize("stage", STAGES)
def test_params_and_set_reach_every_stage(stage, tmp_path, monkeypatch):
    """--params is the file read, --set overrides it (repeatable), and a named option overrides both; a stage
    refuses --set on a section it does not read (each stage loads only its own sections)."""
    section, name, in_file, on_cli, unread = SECTION_OF[stage]
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    values["seed"], values[section][name] = 11, in_file
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(values))
    cfg = invoke(stage, ["--set", "seed=12"], monkeypatch, str(params))["cfg"]
    assert (cfg.seed, getattr(getattr(cfg, section), name)) == (12, in_file)
    cfg = invoke(stage, ["--set", f"{section}.{name}={on_cli}", "--set", "seed=13"], monkeypatch, str(params))["cfg"]
    assert (cfg.seed, getattr(getattr(cfg, section), name)) == (13, on_cli)
    if stage == "cache_teacher":
        cfg = invoke(stage, ["--set", "cache.k=3", "--k", "4"], monkeypatch, str(params))["cfg"]
        assert cfg.cache.k == 4
    if unread:
        result = CliRunner().invoke(app_of(stage), ["--params", str(params), "--set", f"{unread}.x=1"])
        assert result.exit_code == 1 and f"does not read the '{unread}' section" in result.output


@pytest.mark.parametrize("stage", STAGES)
def test_every_option_has_a_case(stage):
    """Every option name (both spellings of a --x/--no-x flag) of the stage appears in one of its cases."""
    command = typer.main.get_command(app_of(stage))
    names = {n for p in command.params for n in (*p.opts, *p.secondary_opts) if n.startswith("--")} - {"--help"}
    covered = {a for s, args, _ in CASES if s == stage for a in args if a.startswith("--")}
    covered |= {"--params", "--set"}  # test_params_and_set_reach_every_stage
    assert names - covered == set(), f"stages.{stage}: options without a test case in tests/test_cli.py"
    assert covered <= names, f"stages.{stage}: cases use options the CLI does not have"
