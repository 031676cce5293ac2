"""dvc.yaml declares, for every stage, exactly the project files its entry point imports (transitively): a
missing one would not rerun the stage when edited (`dvc repro` would silently keep stale outputs), an extra one
would rerun it for nothing (editing the Sinkhorn must not rerun the evaluation)."""
import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "cache")


def imported_files(module: str, seen: set | None = None) -> set:
    """Project .py files reached from `module` through import statements (cache/ counted as a folder)."""
    seen = set() if seen is None else seen
    path = ROOT / (module.replace(".", "/") + ".py")
    if module.startswith("cache"):
        seen.add("cache")
        return seen
    if not path.exists() or path in seen:
        return seen
    seen.add(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            imported_files(node.module, seen)
            for alias in node.names:  # `from pipeline import prepare` names a module, not an attribute
                imported_files(f"{node.module}.{alias.name}", seen)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    imported_files(alias.name, seen)
    return seen


def stages_of(dvc_file: str) -> dict:
    """Stage name -> (entry module, deps) of a dvc.yaml; foreach stages are read from their `do` template, matrix
    stages from the stage itself."""
    out = {}
    for name, stage in yaml.safe_load((ROOT / dvc_file).read_text())["stages"].items():
        stage = stage.get("do", stage)
        out[name] = stage["cmd"].split()[2], stage["deps"]  # "python -m stages.<name> ..."
    return out


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "params/dvc.yaml", "params/ablation/dvc.yaml"])
def test_every_stage_depends_on_the_code_it_imports(dvc_file):
    stages = stages_of(dvc_file)
    assert stages
    for name, (module, deps) in stages.items():
        assert module.startswith("stages."), (name, module)
        need = {p if isinstance(p, str) else p.relative_to(ROOT).as_posix() for p in imported_files(module)}
        have = {d if isinstance(d, str) else next(iter(d)) for d in deps}
        assert need - have == set(), f"{dvc_file} stage {name}: deps lack {sorted(need - have)}"
        code = {d for d in have if d.split("/")[0] in PACKAGES and d.endswith((".py", "cache"))}
        assert code - need == set(), f"{dvc_file} stage {name}: deps list unused code {sorted(code - need)}"


def test_evaluation_does_not_import_training_code():
    """Editing the Sinkhorn or the training step must not rerun the evaluation (its deps are its imports)."""
    need = {p.relative_to(ROOT).as_posix() for p in imported_files("stages.evaluate") if not isinstance(p, str)}
    assert "pipeline/distill/batches.py" in need
    assert not need & {"pipeline/distill/train.py", "pipeline/distill/model.py", "pipeline/losses/sinkhorn.py",
                       "pipeline/losses/ot.py", "pipeline/losses/fused_ot.py", "pipeline/losses/fused_ce_kl.py"}
