"""The export (python -m stages.export_student): the merged checkpoint computes what the trained student computes
(full fine-tuning, LoRA, QLoRA merged into the dequantised or the original weights; float32 and bf16), loads with
plain transformers in a process where peft cannot be imported, is sharded with an index, carries its tokenizer,
generation config and a complete model card; and the refusals (incomplete folder, a base that does not fit the
adapter, missing inputs) are one line that writes nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline.config.distill import DistillParams
from pipeline.data.tiny import build_model
from pipeline.distill import train as distill
from pipeline.distill.student import load_trained
from pipeline.export.card import training_steps
from pipeline.export.export import ExportOptions, run
from pipeline.export.merge import ExportError, adapter_mismatch, exact_4bit, read_student
from pipeline.models import load_causal_lm, load_tokenizer
from tests.conftest import ROOT, distill_cfg, make_cache, stage

TOL_EPS = 8  # logits may differ by this many machine epsilons of the dtype, relative (||x - ref|| / ||ref||)
METRICS = {
    "teacher": {"perplexity": 1.6, "bits_per_char": 0.36, "accuracy": 1.0, "top1_agreement": 1.0, "kl_teacher": 0.0},
    "student_base": {"perplexity": 300.0, "bits_per_char": 4.6, "accuracy": 0.0, "top1_agreement": 0.1},
    "student_distilled": {
        "perplexity": 1.95,
        "bits_per_char": 0.52,
        "accuracy": 0.876,
        "top1_agreement": 0.736,
        "kl_teacher": 0.18,
        "entropy": 0.89,
    },
    "n": {"test_sequences": 30},
    "versions": {"torch": "x.y"},
}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def tolerance(dtype: torch.dtype) -> float:
    return TOL_EPS * torch.finfo(dtype).eps


def one_error_line(p) -> str:
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return lines[0]


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()  # (B, N, V)


def batch(tokenizer) -> torch.Tensor:
    """(3, 20) ids: another batch than the one the export checks itself on."""
    return torch.randint(0, len(tokenizer), (3, 20), generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A cache and three Stage-2 students of the tiny default: full fine-tuning (epoch-based, its last step not on
    the logged curve), LoRA on the 16-bit base, and QLoRA (NF4 base + LoRA); plus an evaluation's metrics.json."""
    root = tmp_path_factory.mktemp("export")
    cached = make_cache(tiny, root / "cache")
    students, steps = {}, {}
    kinds = {
        "full": dict(max_steps=-1, epochs=0.7, logging_steps=5),
        "lora": dict(mode="lora", lr=2e-2),
        "qlora": dict(mode="lora", load_in_bits=4, lr=2e-2),
    }
    for name, kw in kinds.items():
        cfg = distill_cfg(cached, root / name, **kw)
        cfg.distill.lora.r, cfg.distill.lora.dropout = 8, 0.0
        steps[name] = distill.run(cfg)["steps"]
        students[name] = Path(cfg.distill.out)
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    base = str(Path(cached.prepare.out_models) / "student")  # the 16-bit student Stage 2 started from
    return SimpleNamespace(cfg=cached, root=root, base=base, students=students, steps=steps, metrics=str(metrics))


def export(t, name: str, out: Path, **kw) -> dict:
    return run(ExportOptions(student=str(t.students[name]), out=str(out), metrics=t.metrics, **kw))


@pytest.mark.parametrize(
    "name, dtype, quantized_base, source",
    [
        ("full", "float32", "auto", "student"),
        ("full", "bfloat16", "auto", "student"),
        ("lora", "float32", "auto", "16-bit base"),
        ("lora", "bfloat16", "auto", "16-bit base"),
        ("qlora", "float32", "dequantized", "dequantized"),
        ("qlora", "bfloat16", "dequantized", "dequantized"),
    ],
)
def test_export_computes_what_the_trained_student_computes(trained, tmp_path, name, dtype, quantized_base, source):
    """Merged checkpoint (read back from disk) vs the student as the evaluation loads it (the adapter unmerged on
    its base, NF4 for QLoRA), on a batch the export did not check itself on: within the dtype's tolerance, while the
    untrained base is far outside it (the comparison can fail)."""
    out = tmp_path / "export"
    info = export(trained, name, out, dtype=dtype, quantized_base=quantized_base)
    assert info["base_source"] == source
    dt = getattr(torch, dtype)
    student = trained.students[name]
    ids = batch(load_tokenizer(str(student)))
    ref = logits_of(exact_4bit(load_trained(student)), ids)
    got = logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=dt), ids)
    assert got.shape == ref.shape
    assert rel(got, ref) <= tolerance(dt)
    untrained = logits_of(load_causal_lm(trained.base, "fp32"), ids)
    assert rel(untrained, ref) > tolerance(dt), rel(untrained, ref)
    assert info["logits_vs_trained"]["relative_error"] <= info["logits_vs_trained"]["tolerance"]


def test_qlora_merges_into_the_original_16_bit_weights(trained, tmp_path, capsys):
    """auto with a 16-bit student checkpoint: the adapter goes into the original weights. Merged = the adapter
    unmerged on those same weights (float32 tolerance); the distance to the NF4 weights it trained on is NF4's
    rounding, and the output says which base was used."""
    out = tmp_path / "export"
    info = export(trained, "qlora", out, dtype="float32")
    assert info["base_source"] == "original" and "original 16-bit weights" in capsys.readouterr().out
    assert 0.03 < info["base_weight_distance"] < 0.2  # NF4 of a Gaussian weight: ~0.09 relative
    student = trained.students["qlora"]
    ids = batch(load_tokenizer(str(student)))
    base = AutoModelForCausalLM.from_pretrained(trained.base, dtype=torch.float32)
    ref = logits_of(PeftModel.from_pretrained(base, str(student)).eval(), ids)
    got = logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids)
    assert rel(got, ref) <= tolerance(torch.float32)
    nf4 = logits_of(exact_4bit(load_trained(student)), ids)  # what trained: NF4's rounding away, not float32's
    assert rel(got, nf4) > 10 * tolerance(torch.float32)
    card = (out / "README.md").read_text()
    assert "base_source: original" in card and "quantisation error" in card


@pytest.fixture(scope="module")
def prequantised(trained):
    """A pre-quantised NF4 checkpoint of the tiny student (like unsloth/Qwen2.5-1.5B-bnb-4bit) and a QLoRA run on
    it; and another random 16-bit model of the same shape."""
    root, src = trained.root, trained.base
    bnb4 = root / "student_bnb4"
    load_causal_lm(src, "fp32", 4).save_pretrained(bnb4)
    load_tokenizer(src).save_pretrained(bnb4)
    cfg = distill_cfg(trained.cfg, root / "qlora_pre", mode="lora", load_in_bits=4, max_steps=4, lr=2e-2)
    cfg.distill.student, cfg.distill.lora.r, cfg.distill.lora.dropout = str(bnb4), 8, 0.0
    distill.run(cfg)
    other = root / "other_student"
    shape = trained.cfg.prepare.student
    build_model(
        load_tokenizer(src),
        other,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
        seed=12345,  # prepare builds the student with seed + 1
    )
    return SimpleNamespace(student=cfg.distill.out, original=src, other=str(other))


def test_a_prequantised_student_merges_into_what_it_can(trained, prequantised, tmp_path, capsys):
    """No 16-bit original known: the NF4 weights dequantised (said so), equal to the trained student; with --base
    naming the original: merged into it; a checkpoint of the same shape but other weights is refused in one line."""
    run_ = lambda out, **kw: run(  # noqa: E731
        ExportOptions(student=prequantised.student, out=str(tmp_path / out), metrics=trained.metrics, **kw)
    )
    info = run_("dq")
    assert info["base_source"] == "dequantized" and "pre-quantised" in capsys.readouterr().out
    ids = batch(load_tokenizer(prequantised.student))
    ref = logits_of(exact_4bit(load_trained(prequantised.student)), ids)
    got = logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "dq", dtype=torch.bfloat16), ids)
    assert rel(got, ref) <= tolerance(torch.bfloat16)

    info = run_("orig", base=prequantised.original)
    assert info["base_source"] == "original" and info["merged_into"] == prequantised.original
    meta = yaml.safe_load((tmp_path / "orig/README.md").read_text().split("---")[1])
    assert meta["base_model"] == prequantised.original

    with pytest.raises(ExportError, match=r"does not match the adapter in .*qlora_pre: its weights are 1\.\d+"):
        run_("bad", base=prequantised.other)
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()
    with pytest.raises(ExportError, match="drop one of them"):
        run_("bad", base=prequantised.original, quantized_base="dequantized")


def test_stage_writes_a_servable_export_with_its_model_card(trained, tmp_path):
    """The real entry point on the full-fine-tuning student (the embedded default's mode): several safetensors
    shards + index, tokenizer, generation config, model card; nothing used only for training; loads and computes
    the trained student's logits in a fresh process where `import peft` fails."""
    student, out = trained.students["full"], tmp_path / "export"
    p = stage(
        "export_student", "--student", str(student), "--out", str(out), "--metrics", trained.metrics,
        "--max-shard-size", "20KB",
    )  # fmt: skip
    assert "full fine-tuning" in p.stdout and "Within the tolerance" in p.stdout

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and shards == {f.name for f in out.glob("*.safetensors")}
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / f).is_file(), f
    assert not {"projection.pt", "config.yaml", "checkpoints", "adapter_config.json"} & {f.name for f in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    d, c = trained.cfg.distill, trained.cfg.cache
    assert meta["library_name"] == "transformers" and meta["base_model"] == trained.base
    results = meta["model-index"][0]["results"][0]
    assert {m["type"]: m["value"] for m in results["metrics"]}["perplexity"] == 1.95
    assert results["dataset"]["name"] == trained.cfg.data.path
    o = meta["otkd"]
    assert o["teacher"]["name"] == c.teacher and o["teacher"]["hash"]
    assert o["data"]["path"] == trained.cfg.data.path and o["data"]["train_sequences"] > 0
    assert (o["cache"]["k"], o["cache"]["hidden_codec"]) == (c.k, c.hidden_codec)
    assert (o["losses"]["w_ce"], o["losses"]["w_kl"], o["losses"]["w_ot"]) == (d.w_ce, d.w_kl, d.w_ot)
    assert o["losses"]["temperature"] == d.temperature and o["ot"]["eps"] == d.ot.eps
    assert o["training"]["steps"] == trained.steps["full"] == 12  # 0.7 epochs of 16 batches; last logged: 10
    assert o["evaluation"]["student_distilled"] == METRICS["student_distilled"]
    assert o["versions"]["export"]["torch"] == torch.__version__ and o["versions"]["evaluation"] == {"torch": "x.y"}
    assert o["export"]["base_source"] == "student" and o["export"]["not_exported"] == [
        "projection.pt",
        "checkpoints",
        "config.yaml",
    ]
    assert "| **student_distilled** (this model) |" in card and f"vllm serve {out}" in card

    tok = load_tokenizer(str(student))
    ids = batch(tok)
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys; sys.modules['peft'] = None\n"  # `import peft` now raises ImportError
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "try:\n    import peft\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('peft importable')\n"
        f"out = {str(out)!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(out)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(input_ids=ids).logits.float(), {str(tmp_path / 'logits.pt')!r})\n"
        "print(model.dtype, AutoTokenizer.from_pretrained(out)('8604 + 12').input_ids)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    fresh = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.split("\n")[0] == f"torch.bfloat16 {tok('8604 + 12').input_ids}"
    ref = logits_of(exact_4bit(load_trained(student)), ids)
    got = torch.load(tmp_path / "logits.pt")
    assert rel(got, ref) <= tolerance(torch.bfloat16)


def test_incomplete_student_folder_is_refused_in_one_line(trained, tmp_path):
    broken = tmp_path / "student"
    shutil.copytree(trained.students["qlora"], broken)
    (broken / "adapter_model.safetensors").unlink()
    out = tmp_path / "export"
    msg = one_error_line(stage("export_student", "--student", str(broken), "--out", str(out), check=False))
    assert msg == (
        f"error: incomplete student folder {broken}: missing adapter_model.safetensors — rerun "
        "`python -m stages.distill_student` (it writes config.yaml last, after the weights)"
    )
    assert not out.exists() and not (tmp_path / ".export.partial").exists()

    full = tmp_path / "full"
    shutil.copytree(trained.students["full"], full)
    (full / "config.yaml").unlink()
    (full / "model.safetensors").unlink()
    with pytest.raises(ExportError, match=r"missing config\.yaml, model\.safetensors — rerun"):
        read_student(full)
    with pytest.raises(ExportError, match=f"no student folder at {tmp_path / 'nothing'}"):
        read_student(tmp_path / "nothing")


def test_a_base_that_does_not_fit_the_adapter_is_refused_in_one_line(trained, tmp_path):
    """--base with another architecture: one line naming the base, the adapter and what differs; nothing written."""
    student, teacher, out = trained.students["lora"], trained.cfg.cache.teacher, tmp_path / "export"
    args = ["--student", str(student), "--out", str(out), "--metrics", trained.metrics, "--base", teacher]
    p = stage("export_student", *args, check=False)
    assert one_error_line(p) == (
        f"error: base checkpoint {teacher} does not match the adapter in {student} (trained on "
        f"{trained.base}): num_hidden_layers 2 vs 1, intermediate_size 128 vs 64"
    )
    assert not out.exists()


def test_the_adapter_check_finds_layers_it_would_leave_unmerged(trained, tmp_path):
    """The check behind a base whose config cannot be read: every adapted module must exist with its shape, and
    every module the adapter targets must have its update (a deeper base would otherwise load silently)."""
    student, shape = trained.students["lora"], trained.cfg.prepare.student
    tok = load_tokenizer(str(student))
    dims = dict(num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, hidden_size=shape.hidden_size)
    build_model(tok, tmp_path / "deeper", num_layers=2, intermediate_size=shape.intermediate_size, **dims)
    build_model(tok, tmp_path / "wider", num_layers=1, intermediate_size=2 * shape.intermediate_size, **dims)
    deeper = AutoModelForCausalLM.from_pretrained(tmp_path / "deeper")
    with pytest.raises(ExportError, match=r"^base checkpoint deeper does not match the adapter in .*: 7 targeted "):
        adapter_mismatch(deeper, student, "deeper")
    wider = AutoModelForCausalLM.from_pretrained(tmp_path / "wider")
    with pytest.raises(ExportError, match=r"down_proj is 128 -> 64 there, 64 -> 64 in the adapter \(and 2 more\)$"):
        adapter_mismatch(wider, student, "wider")
    adapter_mismatch(AutoModelForCausalLM.from_pretrained(trained.base), student, "its own base")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(metrics="nowhere.json"), "no evaluation metrics at nowhere.json: run `python -m stages.evaluate`"),
        (dict(metrics_entry="student_x"), r"has no model 'student_x' \(it has teacher, student_base, student_dist"),
        (dict(dtype="int8"), "--dtype must be one of bfloat16, float16, float32, got 'int8'"),
        (dict(max_shard_size="big"), "--max-shard-size must be a size such as 5GB"),
        (dict(cache="nowhere"), r"no teacher cache at nowhere/train\.zarr"),
        (dict(quantized_base="original"), "--quantized-base is for a student trained on quantised weights"),
        (dict(out="INSIDE"), "must be outside the student folder"),
    ],
)
def test_options_and_inputs_are_checked_before_anything_loads(trained, tmp_path, change, message):
    o = dict(student=str(trained.students["full"]), out=str(tmp_path / "export"), metrics=trained.metrics)
    o.update(change)
    if o["out"] == "INSIDE":
        o["out"] = str(trained.students["full"] / "export")
    with pytest.raises(ExportError, match=message):
        run(ExportOptions(**o))
    assert not (tmp_path / "export").exists()


def test_steps_are_recomputed_from_the_logged_curve(tmp_path):
    """10 micro-batches per epoch, grad_accum 3: 4 updates per epoch (3 + 3 + 3 + 1), 2 epochs = 8 steps; logged every
    3 steps: step 3 (9 micro-batches: epoch 0.9) and 6 (epoch 1 + 6/10). A curve that cannot be reconciled gives its
    last step, said so."""
    params = DistillParams()
    params.distill.epochs, params.distill.grad_accum, params.distill.logging_steps = 2.0, 3, 3
    curve = tmp_path / "train.tsv"
    curve.write_text("step\tepoch\tloss\n3\t0.9\t1\n6\t1.6\t1\n")
    assert training_steps(curve, params) == (8, "2 epochs of 4 optimizer steps")
    curve.write_text("step\tepoch\tloss\n3\t0.9\t1\n30\t1.6\t1\n")
    assert training_steps(curve, params) == (30, f"the last logged step in {curve}")
    params.distill.max_steps = 5
    assert training_steps(curve, params) == (5, "distill.max_steps")


def test_help():
    p = stage("export_student", "--help")
    assert "--max-shard-size" in p.stdout and "--quantized-base" in p.stdout and "vllm serve" in p.stdout


def test_dvc_stages_export_each_student():
    """The embedded default exports artifacts/student after evaluate, each preset its own student."""
    main = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["export_student"]
    assert main["outs"] == ["artifacts/export"]
    assert {"artifacts/student", "artifacts/metrics/metrics.json"} <= set(main["deps"])
    presets = yaml.safe_load((ROOT / "params/dvc.yaml").read_text())["stages"]
    assert set(presets["export"]["foreach"]) == set(presets["evaluate"]["foreach"])
