"""pipeline/config/: params.yaml and the dataclass defaults are one source of truth, and every value is
validated (type, choices, range) before any stage imports torch or loads a model."""

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache.errors import OtkdError
from pipeline.config.base import ConfigError, LoraSettings, apply_overrides
from pipeline.config.distill import DistillConfig
from pipeline.config.params import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "params").glob("*.yaml") if p.name != "dvc.yaml")


def test_params_yaml_equals_the_dataclass_defaults():
    """`dvc repro` runs params.yaml, code and tests build Config(): they must be the same embedded default."""
    cfg = load_config(ROOT / "params.yaml")
    for section in dataclasses.fields(Config):  # name the drifted field, not just "not equal"
        got, want = getattr(cfg, section.name), getattr(Config(), section.name)
        if dataclasses.is_dataclass(want):
            for f in dataclasses.fields(want):
                assert getattr(got, f.name) == getattr(want, f.name), f"{section.name}.{f.name}"
    assert cfg == Config()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_are_valid(preset):
    cfg = load_config(preset)
    assert cfg.distill.mode == "lora" or cfg.distill.load_in_bits == 16


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, OtkdError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.kl_tail=buckt", "distill.kl_tail must be one of 'bucket', 'none', got 'buckt'"),
        ("distill.ot.objective=regularised", "distill.ot.objective must be one of 'linear', 'regularized'"),
        ("distill.mode=qlora", "distill.mode must be one of 'full', 'lora'"),
        ("distill.optim=adam", "distill.optim must be one of 'adamw_torch', 'adamw_8bit', 'paged_adamw_8bit'"),
        ("distill.report_to=wandb", "distill.report_to must be one of 'none', 'tensorboard'"),
        ("distill.dtype=float16", "distill.dtype must be one of 'auto', 'bf16', 'fp16', 'fp32'"),
        ("evaluate.load_in_bits=5", "evaluate.load_in_bits must be one of 4, 8, 16, got 5"),
        ("data.metric=accuracy", "data.metric must be one of 'exact', 'split', 'embedded_task'"),
        ("data.template=chatml", "data.template must be one of 'alpaca', 'chat'"),
        ("finetune.mode=qlora", "finetune.mode must be one of 'lora', 'full'"),
        ("cache.logprob_dtype=none", "cache.logprob_dtype must be one of 'bf16', 'fp16', 'fp32'"),
        ("cache.hidden_codec=fp32", "cache.hidden_codec must be bf16, fp16, int8, pca:<r>"),
        ("cache.splits=[train, valid]", "cache.splits[1] must be one of 'train', 'validation', 'test'"),
        ("distill.temperature=0", "distill.temperature must be > 0, got 0.0"),
        ("distill.ot.eps=-0.1", "distill.ot.eps must be > 0"),
        ("distill.w_kl=-1", "distill.w_kl must be >= 0"),
        ("distill.load_in_bits=4", "distill.load_in_bits=4 needs mode='lora'"),
        ("distill.ot.max_iter=0", "distill.ot.max_iter must be >= 1"),
        ("distill.ot_eps=0.1", "distill.ot_eps was renamed: set distill.ot.eps instead"),
        ("distill.epochs=0", "distill.epochs must be > 0"),
        ("distill.max_steps=0", "distill.max_steps must be -1 (all epochs) or >= 1"),
        ("distill.train_fraction=0", "distill.train_fraction must be in (0, 1], got 0.0"),
        ("distill.train_fraction=1.5", "distill.train_fraction must be in (0, 1]"),
        ("prepare.task=sum", "prepare.task must be one of 'digit_sum', 'split'"),
        ("prepare.n_digits=1", "prepare.n_digits must be >= 2 for the split task"),
        ("distill.warmup_ratio=1", "distill.warmup_ratio must be in [0, 1)"),
        ("distill.batch_size=0", "distill.batch_size must be >= 1"),
        ("distill.lora.r=0", "distill.lora.r must be >= 1"),
        ("distill.lora.dropout=1.5", "distill.lora.dropout must be in [0, 1)"),
        ("distill.student=", "distill.student must not be empty"),
        ("cache.k=0", "cache.k must be >= 1"),
        ("cache.chunk_rows=0", "cache.chunk_rows must be >= 1"),
        ("cache.shard_rows=-1", "cache.shard_rows must be >= 1"),
        ("cache.batch_tokens=0", "cache.batch_tokens must be >= 1"),
        ("cache.load_in_bits=2", "cache.load_in_bits must be one of 4, 8, 16"),
        ("data.val_fraction=1.0", "data.val_fraction must be in [0, 1)"),
        ("data.test_fraction=0.96", "data.val_fraction + test_fraction must be < 1"),
        ("data.max_length=0", "data.max_length must be >= 1"),
        ("finetune.batch_size=0", "finetune.batch_size must be >= 1"),
        ("finetune.lora.target_modules=[]", "finetune.lora.target_modules must be a non-empty list"),
        ("evaluate.models={}", "evaluate.models must be a non-empty mapping"),
        ("prepare.student.num_heads=3", "prepare.student.hidden_size must be a multiple of num_heads=3"),
    ],
)
def test_bad_override_names_the_field_and_what_it_allows(override, message):
    cfg = Config()
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfg, [override])
    assert message in str(e.value)
    assert cfg == Config()  # a refused override changes nothing


def test_all_weights_zero_is_refused():
    zero = [f"distill.{w}=0" for w in ("w_ce", "w_kl", "w_ot", "w_ot_logits")]
    with pytest.raises(
        ConfigError, match="distill.w_ce, w_kl, w_ot, w_ot_logits, w_uld, w_tok_ot, w_chunk_kl, w_alm are all 0"
    ):
        apply_overrides(Config(), zero)
    assert apply_overrides(Config(), zero[1:]).distill.w_ce == 1.0  # CE alone is the baseline: fine


def test_nested_groups_override_one_field_and_keep_their_section_defaults(tmp_path):
    cfg = apply_overrides(Config(), ["distill.lora.r=8", "distill.mode=lora", "distill.load_in_bits=4"])
    assert cfg.distill.lora == LoraSettings(r=8, alpha=32, dropout=0.05)
    assert cfg.finetune.lora == LoraSettings(r=16, alpha=16, dropout=0.0)  # the other group is its own
    # a partial group in YAML takes the section's defaults for the rest, not the group class's
    (tmp_path / "p.yaml").write_text("distill:\n  lora: {r: 4}\nprepare:\n  student: {num_layers: 3}\n")
    cfg = load_config(tmp_path / "p.yaml")
    assert (cfg.distill.lora.r, cfg.distill.lora.alpha, cfg.distill.lora.dropout) == (4, 32, 0.05)
    assert cfg.prepare.student == dataclasses.replace(Config().prepare.student, num_layers=3)
    assert apply_overrides(Config(), ["distill.lora={r: 2}"]).distill.lora == LoraSettings(2, 32, 0.05)


def test_yaml_types_are_checked_and_ints_widen_to_floats(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("distill:\n  epochs: 2\n  lr: 1\nfinetune:\n  epochs: 3\n")
    cfg = load_config(p)
    assert type(cfg.distill.epochs) is type(cfg.distill.lr) is type(cfg.finetune.epochs) is float
    assert cfg == apply_overrides(Config(), ["distill.epochs=2.0", "distill.lr=1.0", "finetune.epochs=3.0"])
    for text, message in [
        ("distill:\n  lr: fast\n", "distill.lr must be a finite number, got 'fast'"),
        ("distill:\n  lr: 1e-4\n", "write 1.0e-4"),  # YAML 1.1 reads 1e-4 as a string
        ("distill:\n  batch_size: 8.5\n", "distill.batch_size must be an integer, got 8.5"),
        ("distill:\n  batch_size: true\n", "distill.batch_size must be an integer, got True"),
        ("distill:\n  resume: 1\n", "distill.resume must be true or false, got 1"),
        ("distill:\n  student: 7\n", "distill.student must be a string, got 7"),
        ("distill:\n  load_in_bits: 16.0\n", "distill.load_in_bits must be one of 4, 8, 16, got 16.0"),
        ("distill:\n  lora: {target_modules: q_proj}\n", "distill.lora.target_modules must be a list"),
        ("distill: [1]\n", "distill: expected a mapping"),
        ("distill:\n  fused_loss: true\n", "unknown parameter distill.fused_loss"),
        ("evaluate:\n  models: {teacher: ''}\n", "evaluate.models.teacher must not be empty"),
        ("distill:\n  lr: [\n", "is not valid YAML"),
    ]:
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(p)
        assert message in str(e.value) and str(p) in str(e.value), text
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_direct_construction_is_validated_and_fields_cannot_be_misspelt():
    with pytest.raises(ConfigError, match="kl_tail must be one of 'bucket', 'none', got 'buckt'"):
        DistillConfig(kl_tail="buckt")
    d = DistillConfig()
    with pytest.raises(AttributeError):
        d.lora_r = 8  # a removed or misspelt field is an error, not a new attribute nothing reads


def test_cli_typo_fails_fast_in_one_line():
    """The stage CLIs validate before importing torch: a typo is a one-line error well within a second of work."""
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "stages.distill_student", "--set", "distill.kl_tail=buckt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - t
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "error: distill.kl_tail must be one of 'bucket', 'none', got 'buckt'"
    assert elapsed < 5, elapsed  # ~0.2 s here; torch alone takes seconds to import (generous for a busy box)


def test_a_params_file_with_the_old_flat_ot_keys_names_the_new_ones(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("distill:\n  ot_max_iter: 50\n")
    with pytest.raises(ConfigError, match=r"distill.ot_max_iter was renamed: set distill.ot.max_iter instead"):
        load_config(p)
