"""The ablation's config and runs: every task x loss variant x seed trained and evaluated alike (report.py sums up).

One run = one student: the task's params file, the variant's `distill.*` overrides and the seed (which fixes the
student's initial weights, P's, and the batch order, so that variants with the same seed differ only in their
losses).
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cache.errors import OtkdError
from pipeline.config.base import ConfigError, PathStr, apply_overrides, build, check_fields, require, save_config
from pipeline.config.cache import HIDDEN_CODEC
from pipeline.config.params import Config, load_config
from pipeline.versions import versions

METRICS = ("accuracy", "perplexity", "bits_per_char", "kl_teacher", "top1_agreement", "entropy", "train_seconds")
LAST_EVALS = 3  # val_nll averages the last this many evaluations: one checkpoint's noise is not the variant's effect
TRANSITION = 0.5  # transition_step: the first evaluation at which this share of the curve's answers is right


class AblationError(OtkdError, ValueError):
    """The ablation's parameters name a task, variant or seed that does not exist, or results are missing."""


@dataclass(slots=True)
class DataEfficiencyConfig:
    """Students trained on a share of the training cache, at the SAME number of steps as on all of it."""

    task: str = "hmm"
    """The task (a key of `tasks`) whose students are trained on fewer examples."""
    variants: list[str] = field(default_factory=list)
    """Variants compared (keys of `variants`), e.g. the baseline and a distilled student; none = no curves."""
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.3])
    """Shares of the training cache (distill.train_fraction); 1.0 is the main grid's run."""

    def __post_init__(self):
        check_fields(self)
        for f in self.fractions:
            require(0 < f < 1, "fractions", "in (0, 1) (1.0 is the main grid's run)", f)


@dataclass(slots=True)
class SweepConfig:
    """Settings tried on one task against a reference variant, paired by seed (to tune defaults with evidence)."""

    task: str = "hmm"
    """The task (a key of `tasks`) the sweep runs on."""
    reference: str = "kl"
    """The variant (a key of `variants`) each setting is compared with, seed by seed."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Setting name -> `distill.*` overrides (on top of the task's params, like `variants`)."""

    def __post_init__(self):
        check_fields(self)


@dataclass(slots=True)
class ExactTeacherConfig:
    """The exact teacher (distill.teacher_head: full-vocabulary KL from the cached hidden states) against the top-k KL
    on one task, paired by seed with `reference`; `codecs` caches the same teacher again with other hidden codecs."""

    task: str = "split"
    """The task (a key of `tasks`) whose teacher and cache the students use."""
    reference: str = "kl"
    """The variant (a key of `variants`) each setting is compared with, seed by seed (the top-k KL)."""
    codecs: dict[str, str] = field(default_factory=dict)
    """Name -> cache.hidden_codec: Stage 1 of the task's teacher again into `<out>/<task>/codecs/<name>` (DVC stage
    `codec_cache@<name>`); a variant reads it with `cache: <that folder>`."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Setting name -> `distill.*` overrides (on top of the task's params, like `variants`), e.g. teacher_head and
    cache."""

    def __post_init__(self):
        check_fields(self)
        for name, codec in self.codecs.items():
            require(
                HIDDEN_CODEC.fullmatch(codec) is not None and codec != "none",
                f"codecs.{name}",
                "a cache.hidden_codec with hidden states",
                codec,
            )


@dataclass(slots=True)
class CrossTokenizerConfig:
    """Students with their own tokenizer (the task's `<prepare.out_models>/student_x`, digits in pairs) distilled from
    the same teacher cache across tokenizers (distill.cross_tokenizer=true is implied), paired with `baseline`."""

    task: str = "split"
    """The task (a key of `tasks`) whose cache the cross-tokenizer students learn from."""
    baseline: str = "x_ce"
    """The cross-tokenizer variant the others are paired with (CE only on the student's own tokens)."""
    reference: str = "kl"
    """The same-tokenizer variant (of `variants`, on the same task and seeds) whose bits/char is the far end of the
    gap a cross-tokenizer variant closes: (baseline - variant) / (baseline - reference), seed by seed."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Variant name -> `distill.*` overrides on the task's params (names must differ from every other variant's;
    an empty mapping trains no cross-tokenizer student)."""

    def __post_init__(self):
        check_fields(self)


@dataclass(slots=True)
class AblationConfig:
    """params/ablation/params.yaml: which students the ablation trains and how the report compares them."""

    seeds: list[int] = field(default_factory=lambda: list(range(10)))
    """Seeds: each fixes the student's initial weights, P's and the batch order, shared by all variants."""
    tasks: dict[str, PathStr] = field(
        default_factory=lambda: {"hmm": "params/ablation/hmm.yaml", "split": "params/ablation/split.yaml"}
    )
    """Task name -> the otkd params file of its pipeline (data, teacher cache, student, distill defaults)."""
    variants: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "ce": {"w_kl": 0.0, "w_ot": 0.0, "w_ot_logits": 0.0},
            "kl": {"w_ot": 0.0, "w_ot_logits": 0.0},
            "kl_ot_hidden": {"w_ot_logits": 0.0},
            "kl_ot": {},
        }
    )
    """Variant name -> `distill.*` overrides on the task's params (an empty mapping = the task's defaults)."""
    baseline: str = "ce"
    """The variant every other is compared with (paired by seed) and whose gap to the teacher is measured."""
    data_efficiency: DataEfficiencyConfig = field(default_factory=DataEfficiencyConfig)
    """The data-efficiency curves (accuracy vs. share of the training data)."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Extra settings on one task (ε, weights, temperature), compared with a reference variant."""
    cross_tokenizer: CrossTokenizerConfig = field(default_factory=CrossTokenizerConfig)
    """The cross-tokenizer students (another tokenizer than the teacher's) and their loss variants."""
    exact_teacher: ExactTeacherConfig = field(default_factory=ExactTeacherConfig)
    """The exact teacher from its hidden states (and compressed hidden codecs) against the top-k KL."""
    eval_examples: int = 100
    """Test examples whose greedy answer is checked per student (0 = all)."""
    eval_steps: int = 25
    """Each student is evaluated every this many steps on `eval_fraction` of the validation cache (distill.eval_steps):
    the report's val_nll (mean of the last evaluations) and match_step (first step with half the answers exactly
    right) come from there. 0 = no evaluations during training (and neither metric)."""
    eval_fraction: float = 0.25
    """Share of the validation cache those evaluations read (distill.eval_fraction)."""
    curve_tasks: list[str] = field(default_factory=lambda: ["split"])
    """Tasks whose students also answer `curve_examples` validation prompts greedily at each of those evaluations:
    the report's first step past 50% accuracy per seed (the split task's sudden transition)."""
    curve_examples: int = 64
    """Validation prompts of that accuracy curve (one generation batch)."""
    out: PathStr = "artifacts/ablation"
    """Folder of the runs: <out>/runs/<section>/<task>/<variant>/s<seed>[_f<fraction>]/ (`run_dir`)."""
    report: PathStr = "bench/results/ablation"
    """Folder of the reports: <name>.{json,md,png} and <name>_data.png (stages.ablation_report --name)."""

    def __post_init__(self):
        check_fields(self)
        require(len(self.seeds) >= 1, "seeds", "non-empty", self.seeds)
        require(self.eval_examples >= 0, "eval_examples", ">= 0", self.eval_examples)
        require(self.eval_steps >= 0, "eval_steps", ">= 0", self.eval_steps)
        require(0 < self.eval_fraction <= 1, "eval_fraction", "in (0, 1]", self.eval_fraction)
        require(self.curve_examples >= 1, "curve_examples", ">= 1", self.curve_examples)
        for t in self.curve_tasks:
            require(t in self.tasks, "curve_tasks", f"keys of tasks {sorted(self.tasks)}", t)
        xt = self.cross_tokenizer
        clash = sorted(set(self.variants) & set(self.sweep.variants))
        require(not clash, "sweep.variants", "names other than the variants'", clash)
        clash = sorted(set(xt.variants) & (set(self.variants) | set(self.sweep.variants)))
        require(not clash, "cross_tokenizer.variants", "names other than the variants' and the sweep's", clash)
        ex = self.exact_teacher
        clash = sorted(set(ex.variants) & (set(self.variants) | set(self.sweep.variants) | set(xt.variants)))
        require(not clash, "exact_teacher.variants", "names other than every other variant's", clash)
        for name, over in {**self.variants, **self.sweep.variants, **xt.variants, **ex.variants}.items():
            if not isinstance(over, dict):
                raise ConfigError(f"variants.{name} must be a mapping of distill fields, got {over!r}")
            cross = {"cross_tokenizer": True} if name in xt.variants else {}  # what `overrides` adds
            try:  # a typo in a variant fails here, not after the teachers are trained
                apply_overrides(Config(), [f"distill.{k}={v}" for k, v in {**cross, **over}.items()])
            except ConfigError as e:
                raise ConfigError(f"variants.{name}: {e}") from None
        require(self.baseline in self.variants, "baseline", f"one of {sorted(self.variants)}", self.baseline)
        de = self.data_efficiency
        if de.variants:
            require(de.task in self.tasks, "data_efficiency.task", f"one of {sorted(self.tasks)}", de.task)
        for v in de.variants:
            require(v in self.variants, "data_efficiency.variants", f"keys of variants {sorted(self.variants)}", v)
        sw = self.sweep
        if sw.variants:
            require(sw.task in self.tasks, "sweep.task", f"one of {sorted(self.tasks)}", sw.task)
            require(sw.reference in self.variants, "sweep.reference", f"one of {sorted(self.variants)}", sw.reference)
        if ex.variants or ex.codecs:
            require(ex.task in self.tasks, "exact_teacher.task", f"one of {sorted(self.tasks)}", ex.task)
            require(
                ex.reference in self.variants,
                "exact_teacher.reference",
                f"one of {sorted(self.variants)}",
                ex.reference,
            )
        if xt.variants:
            require(xt.task in self.tasks, "cross_tokenizer.task", f"one of {sorted(self.tasks)}", xt.task)
            require(
                xt.baseline in xt.variants, "cross_tokenizer.baseline", f"one of {sorted(xt.variants)}", xt.baseline
            )
            require(
                xt.reference in self.variants,
                "cross_tokenizer.reference",
                f"one of {sorted(self.variants)}",
                xt.reference,
            )

    def overrides(self, variant: str) -> dict[str, Any]:
        """The `distill.*` overrides of a variant, a sweep setting or a cross-tokenizer variant (which adds
        cross_tokenizer=true)."""
        if variant in self.cross_tokenizer.variants:
            return {"cross_tokenizer": True, **self.cross_tokenizer.variants[variant]}
        every = {**self.variants, **self.sweep.variants, **self.exact_teacher.variants}
        if variant not in every:
            raise AblationError(
                f"unknown variant {variant!r} (variants: {', '.join([*every, *self.cross_tokenizer.variants])})"
            )
        return every[variant]


def load_ablation(*paths: str | Path) -> AblationConfig:
    """The ablation's params from one file, or from several whose top-level keys are disjoint: the core file
    (params/ablation/params.yaml: seeds, tasks, variants) and an optional section's file beside its own dvc.yaml
    (params/ablation/<section>/params.yaml), as that dvc.yaml's `vars` reads them."""
    values, origin = {}, {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"ablation params file {path} does not exist")
        got = yaml.safe_load(path.read_text()) or {}
        for key in got:
            if key in origin:
                raise ConfigError(f"{path}: {key!r} is already set by {origin[key]} (each key in one file)")
            origin[key] = path
        values.update(got)
    try:
        return build(AblationConfig, values, "")
    except ConfigError as e:
        raise ConfigError(f"{', '.join(map(str, paths))}: {e}") from None


def run_group(abl: AblationConfig, variant: str, fraction: float = 1.0) -> str:
    """The section a run belongs to, and the folder its runs share: each pipeline's report depends on its sections'
    folders only (`dvc repro params/ablation/dvc.yaml` must not run an optional section's students)."""
    if fraction < 1:
        return "data"
    for name, section in (
        ("sweep", abl.sweep.variants),
        ("crosstok", abl.cross_tokenizer.variants),
        ("exact", abl.exact_teacher.variants),
    ):
        if variant in section:
            return name
    return "core"


def run_dir(abl: AblationConfig, task: str, variant: str, seed: int, fraction: float = 1.0) -> Path:
    """<out>/runs/<group>/<task>/<variant>/s<seed>[_f<fraction>] (group: `run_group`)."""
    tail = f"s{seed}" + (f"_f{fraction:g}" if fraction < 1 else "")
    return Path(abl.out) / "runs" / run_group(abl, variant, fraction) / task / variant / tail


def teacher_json(abl: AblationConfig, task: str) -> Path:
    """The task's teacher evaluation, beside the core's runs (the top of every gap)."""
    return Path(abl.out) / "runs" / "core" / task / "teacher.json"


def task_config(abl: AblationConfig, task: str, overrides: list[str] = ()) -> Config:
    if task not in abl.tasks:
        raise AblationError(f"unknown task {task!r} (tasks: {', '.join(abl.tasks)})")
    return load_config(abl.tasks[task], overrides)


def student_config(abl: AblationConfig, task: str, variant: str, seed: int, fraction: float = 1.0) -> Config:
    """The task's Config with the variant's overrides, the seed and this run's paths; `fraction` is a share of the
    task's own training share (distill.train_fraction of its params: the positive control's students see a tenth)."""
    over = abl.overrides(variant)
    cfg = task_config(abl, task, [f"seed={seed}", *(f"distill.{k}={v}" for k, v in over.items())])
    run = run_dir(abl, task, variant, seed, fraction)
    cfg.distill.out, cfg.distill.plots = str(run / "student"), str(run)
    cfg.distill.train_fraction *= fraction
    cfg.evaluate.eval_examples = abl.eval_examples
    cfg.distill.eval_steps, cfg.distill.eval_fraction = abl.eval_steps, abl.eval_fraction
    if cfg.distill.cross_tokenizer and Path(cfg.distill.student) == Path(cfg.prepare.out_models) / "student":
        cfg.distill.student = str(Path(cfg.prepare.out_models) / "student_x")  # the embedded student's twin
    return cfg


def full_steps(cfg, share: float | None = None) -> int:
    """Optimizer steps of this Stage-2 config on `share` of its training cache (default distill.train_fraction:
    what Trainer runs), counted on the very blocks CacheBlocks keeps."""
    from cache.reader import CacheBlocks, open_cache

    d = cfg.distill
    if d.max_steps > 0:
        return d.max_steps
    blocks = CacheBlocks(
        open_cache(Path(d.cache) / "train.zarr"), d.batch_size, ["input_ids"], share or d.train_fraction
    )
    return math.ceil(d.epochs * max(len(blocks) // d.grad_accum, 1))


def eval_summary(path: Path, curve: list[tuple[int, float]], steps: int) -> dict:
    """From a run's evaluations during training: "val_nll", the validation CE (nats per answer token) of
    `eval_<name>.tsv` averaged over the last LAST_EVALS evaluations; from its accuracy curve (a task in curve_tasks),
    "accuracy_curve" and "transition_step", the first step whose greedy accuracy reaches TRANSITION (None: not within
    the run, censored at "steps"). {} without evaluations."""
    out = {}
    if path.is_file():
        import csv

        nll = [float(r["eval_ce"]) for r in csv.DictReader(path.open(), delimiter="\t")][-LAST_EVALS:]
        out["val_nll"] = sum(nll) / len(nll) if nll else None
    if curve:
        hit = [step for step, acc in curve if acc >= TRANSITION]
        out |= {"accuracy_curve": curve, "transition_step": hit[0] if hit else None, "transition_censored_at": steps}
    return out


def run_student(abl: AblationConfig, task: str, variant: str, seed: int, fraction: float = 1.0) -> dict:
    """Train one student (Stage 2) and evaluate it; writes <run>/metrics.json and returns it."""
    from pipeline.data.records import load_splits
    from pipeline.data.tiny import build_model
    from pipeline.distill import train
    from pipeline.distill.batches import curves_path
    from pipeline.evaluation.curve import AccuracyCurve
    from pipeline.evaluation.evaluate import dump_metrics, evaluate_model
    from pipeline.evaluation.generate import checker
    from pipeline.models import load_tokenizer

    cfg = student_config(abl, task, variant, seed, fraction)
    run = run_dir(abl, task, variant, seed, fraction)
    d = cfg.distill
    if fraction < 1:  # equal steps: fewer examples are seen more often, not trained less
        d.max_steps = full_steps(cfg, task_config(abl, task).distill.train_fraction)
    # the embedded default's student is a random init: draw it from the seed (as `prepare` does for seed 0), so
    # seeds also vary the initial weights; a pretrained student (a user's task) is used as it is
    embedded = Path(d.student) in (Path(cfg.prepare.out_models) / "student", Path(cfg.prepare.out_models) / "student_x")
    tokenizer = load_tokenizer(d.student)
    splits = load_splits(cfg.data, tokenizer, log=lambda *_: None)
    if embedded:
        build_model(
            tokenizer,
            run / "base_student",
            **asdict(cfg.prepare.student),
            vocab_multiple=cfg.prepare.vocab_multiple,
            seed=seed + 1,
        )
        d.student = str(run / "base_student")
    curve = None
    if task in abl.curve_tasks and d.eval_steps:  # greedy answers to fixed validation prompts at each evaluation
        prompts, check = splits["validation"].to_list()[: abl.curve_examples], checker(cfg.data.metric)
        curve = AccuracyCurve(prompts, tokenizer, cfg.data.template, check, cfg.evaluate.max_new_tokens)
    start = time.perf_counter()
    train.run(cfg, callbacks=(curve,) if curve else ())
    train_seconds = time.perf_counter() - start

    test = splits["test"].to_list()
    gen = test[: abl.eval_examples] if abl.eval_examples else test
    metrics, _ = evaluate_model(cfg, d.out, test, gen, Path(d.cache) / "validation.zarr", f"{task}/{variant}/s{seed}")
    steps = d.max_steps if d.max_steps > 0 else full_steps(cfg)
    out = {
        "task": task,
        "variant": variant,
        "seed": seed,
        "fraction": fraction,
        **metrics,
        **eval_summary(curves_path(d, "eval"), curve.points if curve else [], steps),
        "train_seconds": train_seconds,
        "steps": steps,
        "reinitialised_student": embedded,
        "versions": versions(),
    }
    (run / "metrics.json").write_text(dump_metrics(out))
    save_config(cfg, run / "config.yaml")
    print(
        f"ablation {task}/{variant}/s{seed} (fraction {fraction:g}): " + ", ".join(f"{k} {out[k]:.4g}" for k in METRICS)
    )
    return out


def run_teacher(abl: AblationConfig, task: str) -> dict:
    """Evaluate the task's teacher once (the top of every gap); writes `teacher_json`."""
    from pipeline.data.records import load_splits
    from pipeline.evaluation.evaluate import dump_metrics, evaluate_model
    from pipeline.models import load_tokenizer

    cfg = task_config(abl, task)
    cfg.evaluate.eval_examples = abl.eval_examples
    path = cfg.cache.teacher
    test = load_splits(cfg.data, load_tokenizer(path), log=lambda *_: None)["test"].to_list()
    gen = test[: abl.eval_examples] if abl.eval_examples else test
    metrics, _ = evaluate_model(cfg, path, test, gen, Path(cfg.distill.cache) / "validation.zarr", f"{task}/teacher")
    out = {"task": task, **metrics, "versions": versions()}
    dest = teacher_json(abl, task)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(dump_metrics(out))
    print(f"ablation {task}/teacher: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return out
