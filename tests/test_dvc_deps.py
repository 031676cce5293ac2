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


DVC_FILES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in ROOT.rglob("dvc.yaml")
    if not {".venv", "artifacts", ".git"} & set(p.relative_to(ROOT).parts)
)


def test_the_pipelines_are_found():
    assert {"dvc.yaml", "params/dvc.yaml", "params/ablation/dvc.yaml", "params/ablation/control/dvc.yaml"} <= set(
        DVC_FILES
    )


@pytest.mark.parametrize("dvc_file", DVC_FILES)
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
    assert not need & {
        "pipeline/distill/train.py",
        "pipeline/distill/model.py",
        "pipeline/losses/sinkhorn.py",
        "pipeline/losses/ot.py",
        "pipeline/losses/fused_ot.py",
        "pipeline/losses/fused_ce_kl.py",
    }


STAGE1_MODULES = ("stages.cache_teacher",)
STAGE2_ONLY = ("pipeline/distill/", "pipeline/losses/", "pipeline/config/distill.py")


def test_stage1_imports_no_stage2_module():
    """Stage 1 runs for hours on a real teacher: editing a Stage-2 loss or adding a Stage-2 option must not mark the
    teacher cache as changed, so Stage 1 reaches none of Stage 2's code (shared constants live in cache/)."""
    files = {
        p if isinstance(p, str) else p.relative_to(ROOT).as_posix() for p in imported_files("stages.cache_teacher")
    }
    assert "pipeline/teacher/cache_teacher.py" in files
    assert sorted(f for f in files if f.startswith(STAGE2_ONLY)) == []
    # its config code is exactly the sections it reads (CacheParams: seed, data, cache) and the shared machinery
    assert sorted(f for f in files if f.startswith("pipeline/config/")) == [
        "pipeline/config/base.py",
        "pipeline/config/cache.py",
        "pipeline/config/data.py",
    ]
    for dvc_file in DVC_FILES:
        for name, (module, deps) in stages_of(dvc_file).items():
            if module in STAGE1_MODULES:
                listed = [d for d in deps if isinstance(d, str) and d.startswith(STAGE2_ONLY)]
                assert listed == [], f"{dvc_file} stage {name} (Stage 1) lists Stage-2 code {listed}"


def cmd_overrides(cmd: str) -> dict[str, str]:
    """The distill fields a `stages.distill_student` command line sets itself (--set distill.x=v, --student, --out)."""
    words, out = cmd.split(), {}
    for i, w in enumerate(words[:-1]):
        if w == "--set" and words[i + 1].startswith("distill."):
            key, _, value = words[i + 1].partition("=")
            out[key.removeprefix("distill.")] = value
        elif w in ("--student", "--out", "--cache"):
            out[w[2:]] = words[i + 1]
    return out


def stage2_stages(dvc_file: str):
    for name, stage in yaml.safe_load((ROOT / dvc_file).read_text())["stages"].items():
        stage = stage.get("do", stage)
        if "stages.distill_student" in stage["cmd"]:
            yield name, stage["cmd"], stage["params"]


def test_a_stage2_baseline_lists_only_the_params_it_reads():
    """A Stage-2 stage that turns every teacher term off lists exactly the distill fields such a run reads, minus
    those its command line sets: changing distill.w_ot (or any OT/KL setting) reruns the distilled students and
    the evaluation, never the CE-only baselines. Every other Stage-2 stage lists the whole distill section."""
    import dataclasses

    from pipeline.config.distill import TEACHER_SETTINGS, TEACHER_TERMS, DistillConfig

    fields = [f.name for f in dataclasses.fields(DistillConfig)]
    baselines = 0
    for name, cmd, params in stage2_stages("dvc.yaml"):
        over = cmd_overrides(cmd)
        listed = {p for p in params if isinstance(p, str)}
        cross = over.get("cross_tokenizer") == "true"
        if all(float(over.get(w, "nan")) == 0 for w in TEACHER_TERMS):
            baselines += 1
            want = {"seed", *(["data"] if cross else [])} | {
                f"distill.{f}" for f in fields if f not in (*TEACHER_TERMS, *TEACHER_SETTINGS) and f not in over
            }
            assert listed == want, (
                f"dvc.yaml stage {name}: lacks {sorted(want - listed)}, lists unread {sorted(listed - want)}"
            )
        else:
            assert {"seed", "distill", *(["data"] if cross else [])} <= listed, f"dvc.yaml stage {name}: {listed}"
    assert baselines == 2  # distill_student_ce and distill_student_x_ce


def locked_stages() -> set[str]:
    """Names (as `dvc status` prints them) of every stage recorded in a dvc.lock of the repository."""
    out = set()
    for lock in ROOT.rglob("dvc.lock"):
        if ".venv" in lock.parts or "artifacts" in lock.parts:
            continue
        prefix = "" if lock.parent == ROOT else f"{lock.parent.relative_to(ROOT).as_posix()}/dvc.yaml:"
        out |= {prefix + name for name in (yaml.safe_load(lock.read_text()) or {}).get("stages", {})}
    return out


def test_dvc_lock_is_current():
    """On a clean checkout, no stage that dvc.lock records has changed code or params: a change that affects a
    stage comes with its rerun (`dvc repro`, then commit dvc.lock). Missing outputs, and deps that are outputs of
    other stages (absent until they run), are expected; stages never run (the presets' GPU stages) are skipped.
    Every stage of the embedded default must be recorded."""
    import json
    import subprocess
    import sys

    git = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = set(git.stdout.split())
    tracked_dirs = {p.rsplit("/", i)[0] for p in tracked for i in range(1, p.count("/") + 1)}
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    locked = locked_stages()
    main = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert main <= locked, f"stages of dvc.yaml never recorded in dvc.lock: {sorted(main - locked)}"
    stale = []
    for stage, entries in json.loads(status.stdout or "{}").items():
        if stage not in locked:
            continue
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            for path, what in entry.get("changed deps", {}).items():
                if path in tracked or path in tracked_dirs:  # code, not another stage's output
                    stale.append(f"{stage}: dep {path} {what}")
            for file, changed in entry.get("changed params", {}).items():
                items = changed.items() if isinstance(changed, dict) else [(file, changed)]
                stale += [f"{stage}: param {k} {v}" for k, v in items]
    assert stale == [], "dvc.lock is stale (run `dvc repro` and commit dvc.lock):\n" + "\n".join(stale)
