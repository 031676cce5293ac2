"""A non-editable install works without the source tree: the wheel carries the planner's model configs.

The wheel is built from a copy of the packaging inputs (so nothing is written into the checkout), installed with
`pip install --target` into an empty folder, and `python -m stages.plan` runs from a folder outside the repository
with only that install on PYTHONPATH: the shipped config.json files must come from the installed package.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile

from pipeline.config.params import load_config
from pipeline.planning import plan
from tests.conftest import ROOT

PACKAGES = ("pipeline", "stages", "cache")
PRESET = "qwen3-4b_to_0.6b.yaml"


def pip(*args, cwd):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            *args,
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--no-input",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


def test_wheel_ships_the_model_configs_and_the_installed_planner_uses_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip("wheel", "-w", str(tmp_path / "dist"), str(src), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("otkd-*.whl")

    shipped = sorted(
        f"pipeline/planning/models/{d.name}/config.json"
        for d in plan.MODELS_DIR.iterdir()
        if (d / "config.json").is_file()
    )
    assert len(shipped) >= 9  # 7 Qwen + 2 Llama-family configs
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("pipeline/planning/models/")) == shipped
    assert "stages/plan.py" in names and "cache/schema.py" in names

    target, run = tmp_path / "site", tmp_path / "elsewhere"
    run.mkdir()
    pip("install", "--target", str(target), "--no-compile", str(wheel), cwd=tmp_path)
    shutil.copy2(ROOT / "params" / PRESET, run / PRESET)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}

    def python(*args):
        p = subprocess.run([sys.executable, *args], cwd=run, env=env, capture_output=True, text=True, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    where = python(
        "-c", "import pipeline.planning.plan as p, stages.plan as s; print(p.__file__, s.__file__, p.MODELS_DIR)"
    ).split()
    assert all(w.startswith(str(target)) for w in where), where  # the install, not the checkout
    out = python("-m", "stages.plan", "--params", PRESET, "--out", "plan.json")
    assert "Stage 1 - teacher Qwen/Qwen3-4B" in out and "Stage 2 - student Qwen/Qwen3-0.6B" in out
    m = json.loads((run / "plan.json").read_text())
    assert m["stage1"]["fits"] and m["stage2"]["fits"] and m["seq_len"] == 1024
    assert m.pop("versions")["python"]  # recorded with the result
    assert m == plan.plan(load_config(ROOT / "params" / PRESET), 24.0)  # the same numbers as the checkout's


def test_constraints_pin_every_dependency_and_the_install_follows_them():
    """constraints.txt (pip-compile of pyproject.toml, README "Refreshing the pinned versions") pins every direct
    dependency of the package and of its extras (torch apart: installed first, CPU or CUDA build of the pinned
    release), and the packages results depend on are installed at exactly those versions."""
    import re
    import tomllib
    from importlib.metadata import version

    from pipeline.versions import versions

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", d).group(0)).lower() for d in deps}
    assert sorted(names - set(pins) - {"torch"}) == [], "refresh constraints.txt (README)"
    assert "torch" not in pins
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "constraints.in").read_text(), re.M).group(1)
    assert version("torch").split("+")[0] == torch_pin
    got = versions()
    for name in ("transformers", "tokenizers", "peft", "zarr", "numpy", "dvc"):
        assert got[name] == pins[name], f"{name} {got[name]} installed, constraints.txt pins {pins[name]}"


def test_ci_runs_the_readmes_commands():
    """The README's two commands install the same way, and .ci/run is its test command, verbatim: what CI checks is
    what a user runs."""
    import re

    blocks = re.findall(r"```bash\n(python3 -m venv .*?)\n```", (ROOT / "README.md").read_text())
    pipeline, tests = blocks[:2]
    assert pipeline.endswith("&& dvc repro") and tests.endswith("&& python -m pytest -q")
    assert pipeline.removesuffix(" && dvc repro") in tests  # the same install
    assert "-c constraints.txt torch==2.13.0" in tests and 'pip install -c constraints.txt -e ".[test]"' in tests
    assert tests in (ROOT / ".ci/run").read_text().splitlines()
