"""dvc.yaml declares, for every stage, each project file its entry point imports (transitively): otherwise
editing that file would not rerun the stage and `dvc repro` would silently keep stale outputs."""
import ast
from pathlib import Path

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


def test_every_stage_depends_on_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages
    for name, stage in stages.items():
        module = stage["cmd"].split()[2]  # "python -m stages.<name> ..."
        assert module.startswith("stages."), (name, stage["cmd"])
        need = {p if isinstance(p, str) else p.relative_to(ROOT).as_posix() for p in imported_files(module)}
        have = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        assert need - have == set(), f"stage {name}: dvc.yaml deps lack {sorted(need - have)}"
