"""Stage 2: collator alignment, the 4-bit + LoRA student trains, resume, and the refusals (tokenizer, missing
cache, NaN loss) through the real `python -m stages.distill_student`."""
import copy
import csv
import shutil
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
import zarr
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from cache.reader import open_cache
from pipeline.distill import train as distill
from pipeline.teacher import cache_teacher as teacher_cache
from pipeline.config import save_config
from pipeline.data.records import ALPACA_TEMPLATE, IGNORE, load_splits, read_records
from pipeline.distill.train import DistillCollator, cache_fields, curves_path
from pipeline.losses.ot import init_projection
from pipeline.models import load_tokenizer
from pipeline.distill.student import PROJECTION_FILE, load_student, load_trained
from pipeline.data.tiny import build_model, build_tokenizer
from tests.test_stage1 import stage

STAGE1 = "python -m stages.cache_teacher"


def make_cache(tiny, out: Path, teacher: str | None = None):
    """Stage 1 (in process) into `out` with the tiny random teacher, or another `teacher`."""
    cfg = copy.deepcopy(tiny)
    cfg.cache.out = str(out)
    cfg.cache.teacher = teacher or tiny.cache.teacher
    teacher_cache.run(cfg)
    return cfg


def distill_cfg(cfg, out: Path, **kw):
    """A copy of cfg whose Stage 2 trains the tiny student briefly into `out` (curves next to it)."""
    cfg = copy.deepcopy(cfg)
    d = cfg.distill
    d.student = str(Path(cfg.prepare.out_models) / "student")
    d.cache, d.out, d.plots = cfg.cache.out, str(out), str(out.parent / "plots")
    d.batch_size, d.num_workers, d.logging_steps, d.max_steps, d.lr, d.warmup_ratio = 16, 0, 1, 8, 1e-2, 0.0
    for k, v in kw.items():
        setattr(d, k, v)
    return cfg


def read_tsv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def one_error_line(p) -> str:
    assert p.returncode != 0
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    return make_cache(tiny, tmp_path_factory.mktemp("stage2") / "cache")


def test_collator_puts_row_j_at_position_j(cached):
    """Row j sits at student position j and is the teacher's distribution over token j+1 (checked against the
    data's labels and a fresh teacher forward on the padded batch)."""
    cfg = cached
    tok = load_tokenizer(cfg.cache.teacher)
    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    items = c.read_many(range(0, len(c), len(c) // 6))  # mixed lengths -> real padding
    b = DistillCollator(tok.pad_token_id)(items)
    by_id = {r["sample_id"]: r for r in load_splits(cfg.data, tok, log=lambda *_: None)["train"]}
    teacher = AutoModelForCausalLM.from_pretrained(cfg.cache.teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        out = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    V = len(tok)
    assert len({len(x["input_ids"]) for x in items}) > 1
    for i, x in enumerate(items):
        ex = by_id[x["sample_id"]]
        n = len(ex["input_ids"])
        assert b["input_ids"][i, :n].tolist() == ex["input_ids"] and b["attention_mask"][i].sum() == n
        assert b["labels"][i, 1:n].tolist() == ex["labels"][1:]  # labels rebuilt from the rows = the data's
        assert (b["labels"][i, n:] == IGNORE).all()
        j = b["row_mask"][i].nonzero()[:, 0]
        assert j.tolist() == [p for p in range(n - 1) if ex["labels"][p + 1] != IGNORE]
        lp = out.logits[i, j, :V].log_softmax(-1)  # teacher at position j: predicts token j+1
        assert (b["teacher_ids"][i, j, 0] == lp.argmax(-1)).float().mean() > 0.95
        torch.testing.assert_close(b["teacher_logprobs"][i, j], lp.gather(-1, b["teacher_ids"][i, j]),
                                   atol=3e-2, rtol=1e-2)  # bf16 storage
        r = len(j)
        assert b["row_pos"][i, :r].tolist() == j.tolist() and b["row_pos_mask"][i].sum() == r
        torch.testing.assert_close(b["teacher_hidden"][i, :r], out.hidden_states[-1][i, j], atol=5e-2, rtol=2e-2)
        assert not b["row_pos_mask"][i, r:].any()


def test_ce_only_reads_no_teacher_rows(cached):
    d = distill_cfg(cached, Path("unused"), w_kl=0.0, w_ot=0.0, w_ot_logits=0.0).distill
    assert cache_fields(d) == ["input_ids", "supervised"]
    b = DistillCollator(0)(open_cache(Path(cached.cache.out) / "train.zarr").read_many([0, 1], cache_fields(d)))
    assert "teacher_ids" not in b and "teacher_hidden" not in b and b["labels"].ne(IGNORE).any()


def test_qlora_student_trains_and_loss_decreases(cached, tmp_path):
    """Real bitsandbytes NF4 base + LoRA on CPU: the loss goes down, only adapters and P train, P is saved."""
    cfg = distill_cfg(cached, tmp_path / "student", mode="lora", load_in_bits=4, lora_r=8, lora_dropout=0.0,
                      lr=2e-2, max_steps=10, logging_steps=1)
    model = load_student(cfg.distill)
    for name in cfg.distill.target_modules:
        layers = [m for n, m in model.named_modules() if n.endswith(name)]
        assert layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers), name
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    del model

    distill.run(cfg)
    rows = read_tsv(curves_path(cfg.distill))
    loss = [float(r["loss"]) for r in rows]
    assert len(loss) == 10 and all(np.isfinite(loss))
    assert np.mean(loss[-3:]) < loss[0] - 0.05, loss
    assert {"ce", "kl", "ot_hidden", "ot_logits", "sinkhorn_iters_hidden"} <= set(rows[0])

    out = Path(cfg.distill.out)
    assert (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    D = open_cache(Path(cfg.cache.out) / "train.zarr").provenance["hidden_size"]
    d = AutoConfig.from_pretrained(cfg.distill.student).hidden_size
    P0 = init_projection(D, d, torch.Generator().manual_seed(cfg.seed))
    P = torch.load(out / PROJECTION_FILE, weights_only=True)
    assert P.shape == P0.shape and not torch.allclose(P, P0)  # trained with the adapters

    reloaded = load_trained(out)  # NF4 base + adapter, as evaluate loads it
    assert isinstance(reloaded, PeftModel)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_resume_from_checkpoint_matches_an_uninterrupted_run(cached, tmp_path):
    """Full fine-tuning with hidden-state OT: stop-and-resume at step 4 ends where a straight run ends."""
    cfg = distill_cfg(cached, tmp_path / "student", max_steps=8, save_steps=4, logging_steps=2)
    out = Path(cfg.distill.out)
    distill.run(cfg)
    ref_w, ref_p = load_file(out / "model.safetensors"), torch.load(out / PROJECTION_FILE, weights_only=True)
    ref_rows = read_tsv(curves_path(cfg.distill))

    shutil.rmtree(out / "checkpoints/checkpoint-8")  # as if the run had died after step 4's checkpoint
    (out / "model.safetensors").unlink()
    cfg.distill.resume = True
    distill.run(cfg)
    w, p = load_file(out / "model.safetensors"), torch.load(out / PROJECTION_FILE, weights_only=True)
    assert w.keys() == ref_w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(p, ref_p, atol=1e-6, rtol=0)
    rows = read_tsv(curves_path(cfg.distill))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == ["1", "2", "4", "6", "8"]
    assert not any(torch.equal(w[k], v) for k, v in load_file(
        Path(cfg.distill.student) / "model.safetensors").items() if "layers" in k)  # it did train


def params(cfg, path: Path) -> str:
    save_config(cfg, path)
    return str(path)


def test_cache_from_another_tokenizer_is_refused(tiny, cached, tmp_path):
    # same texts, other vocabulary size: a genuinely different tokenizer (it maps ids to other strings)
    texts = [ALPACA_TEMPLATE.format(**r) + r["output"] for r in read_records(tiny.data.path)]
    tok = build_tokenizer(texts, tmp_path / "tok", tiny.prepare.tokenizer_vocab - 40)
    build_model(tok, tmp_path / "other", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                intermediate_size=32, vocab_multiple=64, seed=0)
    other = make_cache(tiny, tmp_path / "cache", teacher=str(tmp_path / "other"))
    cfg = distill_cfg(other, tmp_path / "student")
    msg = one_error_line(stage("distill_student", "--params", params(cfg, tmp_path / "p.yaml"), check=False))
    assert "another tokenizer" in msg and str(tmp_path / "cache") in msg
    assert not (tmp_path / "student").exists()


def test_missing_cache_names_the_stage_to_run(cached, tmp_path):
    cfg = distill_cfg(cached, tmp_path / "student")
    p = stage("distill_student", "--params", params(cfg, tmp_path / "p.yaml"), "--cache", str(tmp_path / "nope"),
              check=False)
    msg = one_error_line(p)
    assert str(tmp_path / "nope") in msg and STAGE1 in msg


def test_nan_loss_stops_training_naming_the_step(cached, tmp_path):
    """Train 2 clean steps with a checkpoint, poison the cache's log-probs with NaN, resume: step 3 fails."""
    cache = tmp_path / "cache"
    shutil.copytree(cached.cache.out, cache)
    cfg = distill_cfg(cached, tmp_path / "student", cache=str(cache), max_steps=2, save_steps=2, w_ot=0.0)
    distill.run(cfg)
    arr = zarr.open_group(str(cache / "train.zarr"), mode="r+")["topk_logprobs"]
    arr[...] = np.full(arr.shape, 0x7FC0, dtype=np.uint16)  # bf16 NaN bits
    p = stage("distill_student", "--params", params(cfg, tmp_path / "p.yaml"), "--resume", "--max-steps", "8",
              check=False)
    msg = one_error_line(p)
    assert "non-finite loss at training step 3" in msg and "kl=nan" in msg


@pytest.mark.parametrize("name, option", [("distill_student", "--resume"), ("evaluate", "--eval-examples")])
def test_help(name, option):
    p = stage(name, "--help")
    assert "--params" in p.stdout and option in p.stdout


@pytest.mark.parametrize("weights", [dict(w_ce=1.0, w_kl=1.0, w_ot=0.5, w_ot_logits=0.5),
                                     dict(w_ce=1.0, w_kl=0.0, w_ot=0.0, w_ot_logits=0.0)])
def test_fused_and_full_logits_paths_agree(cached, tmp_path, weights):
    """Stage 2's default fused path (no [tokens x vocab] logits) equals the plain full-logits path: loss and
    gradients, with every term on, and for the CE baseline that reads no teacher rows."""
    from pipeline.distill.train import student_losses

    cfg = distill_cfg(cached, tmp_path / "s", **weights)
    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    batch = DistillCollator(load_tokenizer(cfg.distill.student).pad_token_id)(
        c.read_many(range(0, len(c), len(c) // 5), cache_fields(cfg.distill)))
    model = load_student(cfg.distill)
    V = len(load_tokenizer(cfg.distill.student))
    D, d = c.provenance["hidden_size"], AutoConfig.from_pretrained(cfg.distill.student).hidden_size
    got = {}
    for fused in (True, False):
        cfg.distill.fused_loss = fused
        model.zero_grad()
        P = init_projection(D, d, torch.Generator().manual_seed(0)).requires_grad_()
        loss, logs = student_losses(model, batch, cfg.distill, V, P, batch["row_mask"].sum())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        got[fused] = (loss.detach(), logs, grads, None if P.grad is None else P.grad.clone())
    (l1, logs1, g1, p1), (l0, logs0, g0, p0) = got[True], got[False]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert logs1.keys() == logs0.keys()
    for k in logs0:
        torch.testing.assert_close(logs1[k], logs0[k], rtol=1e-4, atol=1e-5)
    assert g1.keys() == g0.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
    if weights["w_ot"]:
        torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-7)
