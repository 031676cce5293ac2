"""The ablation: its params, the report's statistics, and the DVC pipeline end to end on a 1-seed toy grid."""

import csv
import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import yaml

from cache.reader import CacheBlocks, open_cache
from pipeline.ablation import (
    LAST_EVALS,
    AblationConfig,
    AblationError,
    CrossTokenizerConfig,
    DataEfficiencyConfig,
    ExactTeacherConfig,
    SweepConfig,
    load_ablation,
    run_dir,
    teacher_json,
)
from pipeline.config.base import ConfigError, save_config
from pipeline.config.params import load_config
from pipeline.report import exact_teacher_report, gap_closed, markdown, report, summarise
from tests.conftest import ROOT, commit_all, copy_project, sh, small_config
from tests.conftest import ran as ran_stages

PATH_FIELDS = {
    "prepare": ["out_data", "out_models"],
    "data": ["path"],
    "finetune": ["base", "out", "metrics"],
    "cache": ["teacher", "out"],
    "distill": ["student", "cache", "out", "plots"],
    "evaluate": ["models", "cache", "plots", "out"],
}


def without_paths(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    for section, names in PATH_FIELDS.items():
        for n in names:
            d[section].pop(n)
    return d


def test_the_core_params_are_the_dataclass_default_and_each_section_adds_only_its_keys():
    core = load_ablation(ROOT / "params/ablation/params.yaml")
    assert core == AblationConfig()  # the class documents the core file
    assert len(core.seeds) >= 10 and set(core.tasks) == {"hmm", "split"}
    control = load_ablation(ROOT / "params/ablation/params.yaml", ROOT / "params/ablation/control/params.yaml")
    assert control.sweep.variants and control.data_efficiency.variants
    assert dataclasses.replace(control, sweep=SweepConfig(), data_efficiency=DataEfficiencyConfig()) == core
    crosstok = load_ablation(ROOT / "params/ablation/params.yaml", ROOT / "params/ablation/crosstok/params.yaml")
    assert crosstok.cross_tokenizer.variants and {"x_ce", "x_chunk_kl", "x_alm"} <= set(
        crosstok.cross_tokenizer.variants
    )
    assert dataclasses.replace(crosstok, cross_tokenizer=CrossTokenizerConfig()) == core
    exact = load_ablation(ROOT / "params/ablation/params.yaml", ROOT / "params/ablation/exact/params.yaml")
    assert exact.exact_teacher.variants and exact.exact_teacher.codecs
    assert dataclasses.replace(exact, exact_teacher=ExactTeacherConfig()) == core


def test_a_key_set_by_two_params_files_is_refused(tmp_path):
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({"seeds": [0], "sweep": {"task": "hmm"}}))
    with pytest.raises(ConfigError, match="'seeds' is already set by .*params.yaml"):
        load_ablation(ROOT / "params/ablation/params.yaml", tmp_path / "extra.yaml")


def test_the_split_task_is_the_embedded_default_with_its_own_paths():
    split = load_config(ROOT / "params/ablation/split.yaml")
    assert without_paths(split) == without_paths(load_config(ROOT / "params.yaml"))
    for section, names in PATH_FIELDS.items():  # every output lies under the task's folder (dvc.yaml assumes it)
        for n in names:
            value = getattr(getattr(split, section), n)
            for p in value.values() if isinstance(value, dict) else [value]:
                assert p.startswith("artifacts/ablation/split/"), (section, n, p)


def test_the_positive_control_differs_from_the_default_only_in_task_and_student_budget():
    hmm = load_config(ROOT / "params/ablation/hmm.yaml")
    assert (hmm.prepare.task, hmm.distill.train_fraction, hmm.distill.epochs) == ("hmm", 0.1, 8.0)
    hmm.prepare.task, hmm.distill.train_fraction, hmm.distill.epochs = "split", 1.0, 1.4
    assert without_paths(hmm) == without_paths(load_config(ROOT / "params.yaml"))
    for section, names in PATH_FIELDS.items():
        for n in names:
            value = getattr(getattr(hmm, section), n)
            for p in value.values() if isinstance(value, dict) else [value]:
                assert p.startswith("artifacts/ablation/hmm/"), (section, n, p)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"variants": {"ce": {"w_kl": 0.0}, "bad": {"w_kll": 1.0}}}, "variants.bad: unknown parameter distill.w_kll"),
        ({"variants": {"ce": {"ot.eps_scale": "mean"}}}, "variants.ce"),
        ({"baseline": "nope"}, "baseline must be one of"),
        ({"data_efficiency": {"variants": ["ce", "typo"]}}, "data_efficiency.variants"),
        ({"data_efficiency": {"fractions": [0.1, 1.0]}}, "fractions must be in (0, 1)"),
        ({"seeds": []}, "seeds must be non-empty"),
        ({"exact_teacher": {"codecs": {"x": "int4"}}}, "codecs.x must be a cache.hidden_codec"),
        ({"exact_teacher": {"variants": {"ce": {}}}}, "exact_teacher.variants must be names other than"),
        ({"sweep": {"variants": {"ce": {}}}}, "sweep.variants must be names other than"),
        ({"sweep": {"variants": {"t9": {"temperature": -1.0}}}}, "variants.t9"),
        ({"sweep": {"reference": "best", "variants": {"t": {}}}}, "sweep.reference must be one of"),
        ({"eval_fraction": 0.0}, "eval_fraction must be in"),
        ({"curve_tasks": ["splt"]}, "curve_tasks must be keys of tasks"),
    ],
)
def test_a_typo_fails_before_anything_runs(tmp_path, values, message):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_ablation(tmp_path / "a.yaml")


def test_cache_blocks_fraction_is_nested_and_contiguous(tiny, tmp_path):
    from pipeline.teacher import cache_teacher

    cfg = small_config(tmp_path)
    cfg.prepare, cfg.data, cfg.cache.teacher = tiny.prepare, tiny.data, tiny.cache.teacher
    cfg.cache.splits = ["train"]
    cache_teacher.run(cfg)
    cache = open_cache(Path(cfg.cache.out) / "train.zarr")
    full = CacheBlocks(cache, 4)
    half, tenth = CacheBlocks(cache, 4, fraction=0.5), CacheBlocks(cache, 4, fraction=0.1)
    assert set(tenth.starts) <= set(half.starts) < set(full.starts)  # nested
    assert abs(len(half) / len(full) - 0.5) < 0.2
    ids = [r["index"] for r in half[1]]
    assert ids == list(range(half.starts[1], half.starts[1] + 4))  # a block is still neighbours in the cache
    assert CacheBlocks(cache, 4, fraction=0.5).starts == half.starts  # deterministic
    with pytest.raises(ValueError, match="fraction"):
        CacheBlocks(cache, 4, fraction=0.0)


def fake_results(abl: AblationConfig, acc: dict) -> None:
    """metrics.json files as the student stage writes them; acc[(task, variant, seed, fraction)] = accuracy."""
    for (task, variant, seed, fraction), a in acc.items():
        d = run_dir(abl, task, variant, seed, fraction)
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(
            json.dumps(
                {
                    "accuracy": a,
                    "perplexity": 2 - a,
                    "bits_per_char": 1.5 - a,
                    "kl_teacher": 1 - a,
                    "top1_agreement": a / 2,
                    "entropy": 0.5,
                    "train_seconds": 10.0 + seed,
                    "val_nll": 1 - a / 2,
                    "transition_step": 100 - round(100 * a) if a >= 0.5 else None,
                }
            )
        )
    for task in abl.tasks:
        teacher_json(abl, task).parent.mkdir(parents=True, exist_ok=True)
        teacher_json(abl, task).write_text(json.dumps({"accuracy": 0.9, "perplexity": 1.1, "entropy": 0.7}))


def test_report_pairs_by_seed_and_measures_the_gap(tmp_path):
    abl = AblationConfig(
        seeds=[0, 1, 2],
        tasks={"t": "x.yaml"},
        curve_tasks=[],
        variants={"ce": {"w_kl": 0.0, "w_ot": 0.0, "w_ot_logits": 0.0}, "kl": {}},
        data_efficiency=DataEfficiencyConfig(task="t", variants=["ce", "kl"], fractions=[0.5]),
        sweep=SweepConfig(task="t", reference="kl", variants={"kl_t2": {"temperature": 2.0}}),
        out=str(tmp_path),
    )
    # seeds differ a lot, the paired gain is steady: what the report must make visible
    ce, kl = [0.2, 0.5, 0.3], [0.3, 0.62, 0.39]
    acc = {("t", "ce", s, 1.0): a for s, a in enumerate(ce)} | {("t", "kl", s, 1.0): a for s, a in enumerate(kl)}
    acc |= {("t", v, s, 0.5): a / 2 for (_, v, s, _), a in list(acc.items())}
    t2 = [0.25, 0.7, 0.35]
    acc |= {("t", "kl_t2", s, 1.0): a for s, a in enumerate(t2)}
    fake_results(abl, acc)
    summary = summarise(abl)
    v = summary["tasks"]["t"]["variants"]["kl"]
    diffs = [b - a for a, b in zip(ce, kl)]
    assert v["accuracy"]["per_seed"] == kl
    assert v["accuracy"]["mean"] == pytest.approx(statistics.fmean(kl))
    assert v["accuracy"]["std"] == pytest.approx(statistics.stdev(kl))
    assert v["paired_vs_baseline"]["accuracy"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert v["paired_vs_baseline"]["accuracy"]["std"] == pytest.approx(statistics.stdev(diffs))
    assert v["paired_vs_baseline"]["accuracy"]["std"] < v["accuracy"]["std"] / 2
    assert v["bits_per_char"]["per_seed"] == pytest.approx([1.5 - a for a in kl])
    assert v["paired_vs_baseline"]["bits_per_char"]["mean"] == pytest.approx(-statistics.fmean(diffs))
    gap = 0.9 - statistics.fmean(ce)
    assert v["gap_closed"] == pytest.approx((statistics.fmean(kl) - statistics.fmean(ce)) / gap)
    assert summary["tasks"]["t"]["variants"]["ce"]["gap_closed"] == 0
    curve = summary["data_efficiency"]["curves"]["kl"]
    assert [p["fraction"] for p in curve] == [0.5, 1.0]
    assert curve[0]["accuracy"]["mean"] == pytest.approx(statistics.fmean(kl) / 2)
    assert curve[0]["bits_per_char"]["mean"] == pytest.approx(1.5 - statistics.fmean(kl) / 2)
    assert v["paired_vs_baseline"]["val_nll"]["mean"] == pytest.approx(-statistics.fmean(diffs) / 2)
    setting = summary["sweep"]["settings"]["kl_t2"]
    assert setting["paired_vs_reference"]["accuracy"]["mean"] == pytest.approx(
        statistics.fmean(b - a for a, b in zip(kl, t2))
    )
    assert setting["accuracy"]["per_seed"] == t2 and setting["overrides"] == {"temperature": 2.0}
    text = markdown(summary)
    assert "| kl_t2 | temperature=2.0 |" in text
    # 3 positive differences of 3: the bootstrap interval is their range, the sign test's p is 2/8
    row = next(line for line in text.splitlines() if line.startswith("| kl | "))
    assert f"| {100 * statistics.fmean(diffs):+.1f} [+9.0, +12.0] p=0.250 better |" in row
    assert "| — / 38 / — |" in row  # the first step past 50% accuracy, per seed ("—": not within the run)


def test_exact_teacher_section_reports_from_its_runs_alone(tmp_path):
    """--only exact_teacher: the exact-teacher students paired with the top-k KL reference and with CE only, from
    those runs alone (no other section's run exists here)."""
    abl = AblationConfig(
        seeds=[0, 1],
        tasks={"t": "x.yaml"},
        curve_tasks=[],
        variants={"ce": {"w_kl": 0.0}, "kl": {}},
        data_efficiency=DataEfficiencyConfig(task="t", variants=["ce"], fractions=[0.5]),
        sweep=SweepConfig(task="t", reference="kl"),
        exact_teacher=ExactTeacherConfig(
            task="t", reference="kl", codecs={"i8": "int8"}, variants={"ex": {"teacher_head": "t/teacher"}}
        ),
        out=str(tmp_path / "runs"),
        report=str(tmp_path / "report"),
    )
    ce, kl, ex = [0.2, 0.5], [0.3, 0.55], [0.4, 0.6]
    fake_results(
        abl, {("t", v, s, 1.0): a for v, accs in (("ce", ce), ("kl", kl), ("ex", ex)) for s, a in enumerate(accs)}
    )
    summary = exact_teacher_report(abl)
    got = summary["vs_reference"]["settings"]["ex"]
    assert got["accuracy"]["per_seed"] == ex
    assert got["paired_vs_reference"]["accuracy"]["mean"] == pytest.approx(statistics.fmean([0.1, 0.05]))
    base = summary["vs_baseline"]["settings"]
    assert set(base) == {"kl", "ex"} and base["ex"]["paired_vs_reference"]["accuracy"]["mean"] == pytest.approx(0.15)
    text = (tmp_path / "report/ablation_exact.md").read_text()
    assert "against `kl`" in text and "against `ce`" in text and "i8 = int8" in text
    with pytest.raises(AblationError, match="missing ablation result"):
        report(abl)  # the whole report needs the other sections' runs


def test_report_leaves_missing_values_out(tmp_path):
    """A student with another tokenizer than the teacher's has no cache metrics (null, or NaN from an older
    json.dumps): "—" in the tables, left out of means and paired differences; ablation.json stays strict JSON."""
    abl = AblationConfig(
        seeds=[0, 1, 2],
        tasks={"t": "x.yaml"},
        curve_tasks=[],
        variants={"ce": {"w_kl": 0.0}, "x": {}},
        data_efficiency=DataEfficiencyConfig(task="t", variants=["ce"], fractions=[0.5]),
        sweep=SweepConfig(task="t", reference="ce"),
        out=str(tmp_path / "runs"),
        report=str(tmp_path / "report"),
    )
    fake_results(abl, {("t", v, s, f): 0.2 + 0.1 * s for v in ("ce", "x") for s in range(3) for f in (1.0, 0.5)})
    for s in range(3):
        f = run_dir(abl, "t", "x", s) / "metrics.json"
        f.write_text(json.dumps(json.loads(f.read_text()) | {"kl_teacher": None, "top1_agreement": None}))
    f = run_dir(abl, "t", "ce", 1) / "metrics.json"
    f.write_text(json.dumps(json.loads(f.read_text()) | {"kl_teacher": float("nan")}))  # writes NaN

    def no_nan(const):
        raise ValueError(f"{const} is not JSON")

    report(abl)
    summary = json.loads((tmp_path / "report/ablation.json").read_text(), parse_constant=no_nan)
    ce, x = summary["tasks"]["t"]["variants"]["ce"], summary["tasks"]["t"]["variants"]["x"]
    assert ce["kl_teacher"]["per_seed"] == [0.8, None, 0.6]
    assert ce["kl_teacher"]["mean"] == pytest.approx(0.7)
    assert ce["kl_teacher"]["std"] == pytest.approx(statistics.stdev([0.8, 0.6]))
    assert x["kl_teacher"] == {"per_seed": [None] * 3, "mean": None, "std": None}
    assert x["paired_vs_baseline"]["kl_teacher"]["mean"] is None
    assert x["bits_per_char"]["mean"] == pytest.approx(1.2) and x["paired_vs_baseline"]["bits_per_char"]["mean"] == 0
    lines = (tmp_path / "report/ablation.md").read_text().splitlines()
    head = next(line for line in lines if line.startswith("| variant |")).split(" | ")
    row = next(line for line in lines if line.startswith("| x |")).split(" | ")
    col = {name: row[head.index(name)] for name in ("KL(teacher‖student)", "paired Δ KL", "bits/char")}
    assert col == {"KL(teacher‖student)": "—", "paired Δ KL": "—", "bits/char": "1.2000 ± 0.1000"}
    assert row[head.index("top-1 agreement")] == "—" and "nan" not in "".join(lines)


def test_report_names_a_missing_run(tmp_path):
    abl = AblationConfig(
        seeds=[0],
        tasks={"t": "x.yaml"},
        curve_tasks=[],
        out=str(tmp_path),
        data_efficiency=DataEfficiencyConfig(task="t"),
        sweep=SweepConfig(task="t"),
    )
    fake_results(abl, {("t", v, 0, 1.0): 0.5 for v in abl.variants if v != "kl"})
    with pytest.raises(Exception, match=r"missing ablation result .*t/kl/s0/metrics.json"):
        summarise(abl)


# ---- end to end ---------------------------------------------------------------------------------------------


def toy_task(root: str):
    """The tests' tiny pipeline with every path under `root` (as params/ablation/<task>.yaml must have)."""
    cfg = small_config(Path("/unused"))
    for section, names in PATH_FIELDS.items():
        for n in names:
            value = getattr(getattr(cfg, section), n)
            if isinstance(value, dict):
                setattr(getattr(cfg, section), n, {"teacher": f"{root}/teacher"})
            else:
                rel = Path(value).relative_to("/unused") if value.startswith("/unused") else Path(value).name
                setattr(getattr(cfg, section), n, f"{root}/{rel}")
    cfg.cache.teacher, cfg.distill.student = f"{root}/teacher", f"{root}/base/student"
    cfg.finetune.metrics = f"{root}/teacher_sft.json"  # the names params/ablation/dvc.yaml declares
    cfg.finetune.eval_examples, cfg.evaluate.eval_examples = 8, 8
    return cfg


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    """The project's code in a fresh git repo with a 1-seed, 2-variant, 1-task ablation."""
    dst = copy_project(
        tmp_path_factory.mktemp("ablation_repo"),
        lambda f: f.split("/")[0] in ("pipeline", "stages", "cache", "params") and not f.endswith("dvc.lock"),
    )
    for f in (dst / "params/ablation").glob("*.yaml"):
        if f.name != "dvc.yaml":
            f.unlink()
    save_config(toy_task("artifacts/ablation/toy"), dst / "params/ablation/toy.yaml")
    core = {
        "seeds": [0],
        "tasks": {"toy": "params/ablation/toy.yaml"},
        "variants": {"ce": {"w_kl": 0.0, "w_ot": 0.0, "w_ot_logits": 0.0}, "kl_ot": {}},
        "eval_examples": 8,
        "eval_steps": 1,
        "eval_fraction": 0.5,
        "curve_tasks": ["toy"],
        "curve_examples": 4,
        "out": "artifacts/ablation",
        "report": "bench/results",
    }
    control = {
        "data_efficiency": {"task": "toy", "variants": ["ce", "kl_ot"], "fractions": [0.5]},
        "sweep": {"task": "toy", "reference": "kl_ot", "variants": {"t2": {"temperature": 2.0}}},
    }
    crosstok = {
        "cross_tokenizer": {
            "task": "toy",
            "baseline": "x_ce",
            "reference": "kl_ot",
            "variants": {"x_ce": {"w_kl": 0.0, "w_ot": 0.0, "w_ot_logits": 0.0}},
        },  # its losses: tests/test_crosstok.py, tests/test_chunk_kl.py
    }
    exact = {
        "exact_teacher": {
            "task": "toy",
            "reference": "kl_ot",
            "codecs": {"i8": "int8"},
            "variants": {
                "exact_i8": {
                    "teacher_head": "artifacts/ablation/toy/teacher",
                    "cache": "artifacts/ablation/toy/codecs/i8",
                }
            },
        },
    }
    sections = (("control/params.yaml", control), ("crosstok/params.yaml", crosstok), ("exact/params.yaml", exact))
    for path, values in (("params.yaml", core), *sections):
        (dst / "params/ablation" / path).write_text(yaml.safe_dump(values))
    commit_all(dst)
    return dst


@pytest.mark.slow
def test_ablation_pipeline_end_to_end(toy_repo):
    def ran(log: str) -> set[str]:  # stage names without the "params/ablation/.../dvc.yaml:" prefix
        return {name.split(":")[-1] for name in ran_stages(log)}

    runs, toy = toy_repo / "artifacts/ablation/runs", toy_repo / "artifacts/ablation/toy"

    log = sh("dvc", "repro", "params/ablation/dvc.yaml", cwd=toy_repo)
    students = {"student@toy-ce-0", "student@toy-kl_ot-0"}
    tasks = {"prepare@toy", "finetune_teacher@toy", "cache_teacher@toy", "teacher@toy"}
    assert ran(log) == tasks | students | {"report"}
    summary = json.loads((toy_repo / "bench/results/ablation.json").read_text())
    assert set(summary["tasks"]["toy"]["variants"]) == {"ce", "kl_ot"}
    assert not summary["sweep"]["settings"] and not summary["data_efficiency"]["curves"]  # the core only
    for v in ("ce", "kl_ot"):
        m = json.loads((runs / f"core/toy/{v}/s0/metrics.json").read_text())
        assert summary["tasks"]["toy"]["variants"][v]["accuracy"]["per_seed"] == [m["accuracy"]]
        # evaluated at every step (eval_steps 1): the mean of the last evaluations' validation CE
        evals = list(csv.DictReader((runs / f"core/toy/{v}/s0/eval_student.tsv").open(), delimiter="\t"))
        assert len(evals) == m["steps"] == len(m["accuracy_curve"]) == m["transition_censored_at"]
        assert [s for s, _ in m["accuracy_curve"]] == [int(r["step"]) for r in evals]
        hit = [s for s, a in m["accuracy_curve"] if a >= 0.5]
        assert m["transition_step"] == (hit[0] if hit else None)
        assert m["val_nll"] == pytest.approx(statistics.fmean(float(r["eval_ce"]) for r in evals[-LAST_EVALS:]))
    assert (toy_repo / "bench/results/ablation.png").stat().st_size > 0

    # the optional sections: their own pipelines, on the core's task stages and students (none reruns)
    log = sh("dvc", "repro", "params/ablation/control/dvc.yaml", cwd=toy_repo)
    data = {"student_data@0.5-ce-0", "student_data@0.5-kl_ot-0"}
    assert ran(log) == data | {"student_sweep@t2-0", "report"}
    summary = json.loads((toy_repo / "bench/results/control.json").read_text())
    assert summary["sweep"]["settings"]["t2"]["overrides"] == {"temperature": 2.0}
    assert yaml.safe_load((runs / "sweep/toy/t2/s0/config.yaml").read_text())["distill"]["temperature"] == 2.0
    for v in ("ce", "kl_ot"):
        m = json.loads((runs / f"core/toy/{v}/s0/metrics.json").read_text())
        half = json.loads((runs / f"data/toy/{v}/s0_f0.5/metrics.json").read_text())
        assert half["steps"] == m["steps"] > 0  # equal steps on half the data
        assert half["fraction"] == 0.5 and m["reinitialised_student"]
        assert [p["fraction"] for p in summary["data_efficiency"]["curves"][v]] == [0.5, 1.0]
    for f in ("control.md", "control.png", "control_data.png"):
        assert (toy_repo / "bench/results" / f).stat().st_size > 0

    log = sh("dvc", "repro", "params/ablation/crosstok/dvc.yaml", cwd=toy_repo)
    assert ran(log) == {"student_x@x_ce-0", "report"}
    summary = json.loads((toy_repo / "bench/results/crosstok.json").read_text())
    # the cross-tokenizer students: their own tokenizer, no cache metrics (other vocabulary), bits per character
    assert set(summary["cross_tokenizer"]["variants"]) == {"x_ce"}
    x_bpc = json.loads((runs / "crosstok/toy/x_ce/s0/metrics.json").read_text())["bits_per_char"]
    same_bpc = json.loads((runs / "core/toy/kl_ot/s0/metrics.json").read_text())["bits_per_char"]
    # the baseline closes none of its gap to the same-tokenizer reference (if it has one)
    want = [0.0] if x_bpc > same_bpc else [None]
    assert summary["cross_tokenizer"]["variants"]["x_ce"]["gap_closed_bpc"]["per_seed"] == want
    m = json.loads((runs / "crosstok/toy/x_ce/s0/metrics.json").read_text())
    assert m["kl_teacher"] is None and m["bits_per_char"] > 0 and m["reinitialised_student"]
    conf = yaml.safe_load((runs / "crosstok/toy/x_ce/s0/config.yaml").read_text())["distill"]
    assert conf["cross_tokenizer"] and conf["student"].endswith("x_ce/s0/base_student")
    x_init = (runs / "crosstok/toy/x_ce/s0/base_student/model.safetensors").read_bytes()
    assert x_init == (toy / "base/student_x/model.safetensors").read_bytes()
    # the exact teacher from the int8 cache of the same teacher: its own Stage 1 output, its own student
    log = sh("dvc", "repro", "params/ablation/exact/dvc.yaml", cwd=toy_repo)
    assert ran(log) == {"codec_cache@i8", "student_exact@exact_i8-0", "report"}
    summary = json.loads((toy_repo / "bench/results/exact.json").read_text())
    exact = yaml.safe_load((runs / "exact/toy/exact_i8/s0/config.yaml").read_text())["distill"]
    assert exact["cache"] == "artifacts/ablation/toy/codecs/i8" and exact["teacher_head"].endswith("toy/teacher")
    assert "exact_i8" in summary["exact_teacher"]["settings"]
    assert json.loads((toy / "codecs/i8/train.zarr/zarr.json").read_text())["attributes"]["hidden_codec"] == "int8"
    # same seed = same initial student across variants; it is the embedded default's draw for seed 0
    ce_init = (runs / "core/toy/ce/s0/base_student/model.safetensors").read_bytes()
    assert ce_init == (runs / "core/toy/kl_ot/s0/base_student/model.safetensors").read_bytes()
    assert ce_init == (toy / "base/student/model.safetensors").read_bytes()

    assert ran(sh("dvc", "repro", "params/ablation/dvc.yaml", cwd=toy_repo)) == set()  # nothing changed
    p = toy_repo / "params/ablation/params.yaml"
    values = yaml.safe_load(p.read_text())
    values["variants"]["kl_ot"] = {"temperature": 2.0}  # one variant changes: only its students rerun
    p.write_text(yaml.safe_dump(values))
    assert ran(sh("dvc", "repro", "params/ablation/dvc.yaml", cwd=toy_repo)) == {"student@toy-kl_ot-0", "report"}
    assert ran(sh("dvc", "repro", "params/ablation/control/dvc.yaml", cwd=toy_repo)) == {
        "student_data@0.5-kl_ot-0",
        "report",
    }


def test_cli_arguments_reach_the_run(monkeypatch):
    """stages.ablation's arguments land in run_student / run_teacher; a wrong name is a one-line error."""
    from typer.testing import CliRunner

    import pipeline.ablation
    from stages.ablation import app

    calls = []
    monkeypatch.setattr(pipeline.ablation, "run_student", lambda abl, *a: calls.append(("student", abl, *a)))
    monkeypatch.setattr(pipeline.ablation, "run_teacher", lambda abl, *a: calls.append(("teacher", abl, *a)))
    params = str(ROOT / "params/ablation/params.yaml")
    runner = CliRunner()
    args = ["student", "split", "kl_ot", "2", "--fraction", "0.3", "--ablation", params]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, ["teacher", "hmm", "--ablation", params]).exit_code == 0
    assert [c[0] for c in calls] == ["student", "teacher"]
    assert calls[0][2:] == ("split", "kl_ot", 2, 0.3) and calls[1][2:] == ("hmm",)
    assert calls[0][1] == load_ablation(params)

    monkeypatch.undo()
    result = runner.invoke(app, ["student", "split", "kl_0t", "0", "--ablation", params])
    assert result.exit_code == 1 and "unknown variant 'kl_0t'" in result.output


def test_gap_closed_in_the_exact_metric_is_per_seed_with_an_interval():
    base = [{"kl_true": 0.05}, {"kl_true": 0.04}, {"kl_true": 0.03}, {"kl_true": 0.01}]
    runs = [{"kl_true": 0.03}, {"kl_true": 0.025}, {"kl_true": 0.02}, {"kl_true": 0.005}]
    got = gap_closed(runs, base, 0.01, "kl_true")
    # (0.05-0.03)/(0.05-0.01), (0.04-0.025)/(0.04-0.01), (0.03-0.02)/(0.03-0.01); the last seed has no gap
    assert got["per_seed"][:3] == pytest.approx([0.5, 0.5, 0.5]) and got["per_seed"][3] is None
    # a reference run per seed as the far end (the cross-tokenizer students' same-tokenizer twin)
    per = gap_closed(runs, base, [{"kl_true": 0.01}, {"kl_true": 0.01}, {"kl_true": 0.0}, {"kl_true": 0.02}], "kl_true")
    assert per["per_seed"][:3] == pytest.approx([0.5, 0.5, 1 / 3]) and per["per_seed"][3] is None
    assert got["mean"] == pytest.approx(0.5) and got["lo"] == pytest.approx(0.5) and got["hi"] == pytest.approx(0.5)
    uneven = gap_closed(runs[:2], [{"kl_true": 0.05}, {"kl_true": 0.02}], 0.01, "kl_true")
    assert uneven["per_seed"] == pytest.approx([0.5, -0.5]) and uneven["lo"] < 0 < uneven["hi"]
