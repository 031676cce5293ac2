"""Stage 2: the batch contract (row j at position j), the fused step against the plain full-logits reference,
the 4-bit + LoRA student trains, P is checkpointed, restored and read back, resume, TensorBoard logs, Sinkhorn
diagnostics, and the refusals (tokenizer, missing cache, NaN loss) through the real
`python -m stages.distill_student`."""

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

from bench.reference import reference_loss
from cache.manifest import make_shard_manifest, write_manifest
from cache.reader import CacheBlocks, open_cache
from cache.schema import LOG_FLOOR, n_shards, read_root_attrs
from pipeline.config.base import save_config
from pipeline.data.records import ALPACA_TEMPLATE, IGNORE, load_splits, read_records
from pipeline.data.tiny import build_model, build_tokenizer
from pipeline.distill import train as distill
from pipeline.distill.batches import BlockCollator, cache_fields, collate, curves_path
from pipeline.distill.model import PROJECTION_FILE, DistillModel
from pipeline.distill.student import load_student, load_trained
from pipeline.losses.ot import init_projection
from pipeline.models import load_tokenizer
from tests.conftest import distill_cfg, make_cache, read_tsv, stage

STAGE1 = "python -m stages.cache_teacher"


def one_error_line(p) -> str:
    assert p.returncode != 0
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    return make_cache(tiny, tmp_path_factory.mktemp("stage2") / "cache")


def test_collator_puts_row_j_at_position_j(cached):
    """Row r sits at student position p_r (row_pos) and is the teacher's distribution over token p_r + 1
    (checked against the data's labels and a fresh teacher forward on the padded batch)."""
    cfg = cached
    tok = load_tokenizer(cfg.cache.teacher)
    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    items = c.read_many(range(0, len(c), len(c) // 6))  # mixed lengths -> real padding
    b = collate(items, tok.pad_token_id)
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
        r = int(b["row_mask"][i].sum())
        j = b["row_pos"][i, :r]
        assert j.tolist() == [p for p in range(n - 1) if ex["labels"][p + 1] != IGNORE]
        lp = out.logits[i, j, :V].log_softmax(-1)  # teacher at position j: predicts token j+1
        assert (b["teacher_ids"][i, :r, 0] == lp.argmax(-1)).float().mean() > 0.95
        torch.testing.assert_close(
            b["teacher_logprobs"][i, :r], lp.gather(-1, b["teacher_ids"][i, :r]), atol=3e-2, rtol=1e-2
        )  # bf16 storage
        torch.testing.assert_close(b["teacher_hidden"][i, :r], out.hidden_states[-1][i, j], atol=5e-2, rtol=2e-2)
        # the log-prob of the token that actually follows (schema 4), in the teacher's top-k or not
        observed = lp.gather(-1, b["input_ids"][i, j + 1, None])[:, 0]  # (r,)
        torch.testing.assert_close(b["teacher_observed"][i, :r], observed, atol=3e-2, rtol=1e-2)
        assert (b["teacher_observed"][i, r:] == LOG_FLOOR).all()  # padding rows
        assert not b["row_mask"][i, r:].any() and b["row_mask"][i, :r].all()
    outside = ~(b["teacher_ids"] == b["input_ids"].gather(1, b["row_pos"] + 1)[..., None]).any(-1) & b["row_mask"]
    assert outside.any()  # some rows' observed token is not in their top-k: those values exist only in this array


def test_blocks_are_batches_of_neighbours(cached):
    """CacheBlocks + BlockCollator: one batch = one block of consecutive entries, every entry exactly once."""
    c = open_cache(Path(cached.cache.out) / "train.zarr")
    ds = CacheBlocks(c, 16, ["input_ids", "supervised"])
    assert len(ds) == -(-len(c) // 16)
    seen = [x["index"] for i in range(len(ds)) for x in ds[i]]
    assert seen == list(range(len(c)))
    b = BlockCollator(0)([ds[1]])
    assert b["input_ids"].shape[0] == 16 and len(ds[len(ds) - 1]) == len(c) - 16 * (len(ds) - 1)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_ce_only_reads_no_teacher_rows(cached):
    d = distill_cfg(cached, Path("unused"), w_kl=0.0, w_ot=0.0, w_ot_logits=0.0).distill
    assert cache_fields(d) == ["input_ids", "supervised"]
    b = collate(open_cache(Path(cached.cache.out) / "train.zarr").read_many([0, 1], cache_fields(d)), 0)
    assert "teacher_ids" not in b and "teacher_hidden" not in b and b["labels"].ne(IGNORE).any()


def test_qlora_student_trains_and_loss_decreases(cached, tmp_path):
    """Real bitsandbytes NF4 base + LoRA on CPU: the loss goes down, only adapters and P train, P is saved."""
    cfg = distill_cfg(cached, tmp_path / "student", mode="lora", load_in_bits=4, lr=2e-2, max_steps=10, logging_steps=1)
    cfg.distill.lora.r, cfg.distill.lora.dropout = 8, 0.0
    model = load_student(cfg.distill)
    for name in cfg.distill.lora.target_modules:
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
    spread = [float(r[f"ot_cost_spread_{t}"]) for r in rows for t in ("hidden", "logits")]
    assert all(0 <= s < 1 for s in spread), spread

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
    assert not any(
        torch.equal(w[k], v)
        for k, v in load_file(Path(cfg.distill.student) / "model.safetensors").items()
        if "layers" in k
    )  # it did train

    ckpt = load_file(out / "checkpoints/checkpoint-8/model.safetensors")  # what trains, P included
    torch.testing.assert_close(ckpt["projection"], p)
    assert {k.removeprefix("student.") for k in ckpt} - {"projection"} <= w.keys()
    cfg.distill.student = str(out)  # continuing from a Stage-2 output reads its P back as the start
    again = distill.build_model(cfg.distill, ckpt["projection"].shape[0], 400, seed=123)
    torch.testing.assert_close(again.projection.detach(), p)


def test_gradient_accumulation_adds_up_to_the_whole_batch(cached, tmp_path):
    """Two micro-batches (each term normalised by the step's counts) give the loss and gradients of one batch."""
    cfg = distill_cfg(cached, tmp_path / "s", w_ot=0.5, w_ot_logits=0.5)
    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    tok = load_tokenizer(cfg.distill.student)
    reads = c.read_many(range(3, 11), cache_fields(cfg.distill))
    D, d = c.provenance["hidden_size"], AutoConfig.from_pretrained(cfg.distill.student).hidden_size
    model = DistillModel(
        load_student(cfg.distill), cfg.distill, len(tok), init_projection(D, d, torch.Generator().manual_seed(0))
    )
    whole = collate(reads, tok.pad_token_id)
    n = whole["row_mask"].sum()
    got = []
    for parts in ([reads], [reads[:4], reads[4:]]):
        model.zero_grad()
        loss = sum(model(collate(r, tok.pad_token_id), num_items_in_batch=n, n_micro=len(parts))[0] for r in parts)
        loss.backward()
        got.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[0][1], got[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_tensorboard_logs_every_loss_component_offline(cached, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = distill_cfg(cached, tmp_path / "student", max_steps=2, report_to="tensorboard", eval_steps=2)
    distill.run(cfg)
    events = list((tmp_path / "student/checkpoints/runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/ce",
        "train/kl",
        "train/ot_hidden",
        "train/ot_logits",
        "train/sinkhorn_capped_hidden",
    } <= tags, tags
    assert len(acc.Scalars("train/kl")) == 2 and all(np.isfinite(e.value) for e in acc.Scalars("train/kl"))
    assert {"eval/loss", "eval/ce", "eval/kl", "eval/ot_hidden"} <= tags, tags  # eval_steps: the validation cache
    rows = list(csv.DictReader(curves_path(cfg.distill, "eval").open(), delimiter="\t"))  # the evaluations' own file
    assert [r["step"] for r in rows] == ["2"] and float(rows[0]["eval_ce"]) > 0 and float(rows[0]["eval_kl"]) >= 0
    assert not any(k.startswith("eval_") for k in read_tsv(curves_path(cfg.distill))[0])


def test_unconverged_sinkhorn_is_logged_and_warned_once(cached, tmp_path):
    cfg = distill_cfg(cached, tmp_path / "student", max_steps=3)
    cfg.distill.ot.max_iter = 2
    with pytest.warns(
        UserWarning, match="Sinkhorn did not reach distill.ot.tol=1e-05 within distill.ot.max_iter=2"
    ) as caught:
        distill.run(cfg)
    assert sum("Sinkhorn did not reach" in str(w.message) for w in caught) == 1
    rows = read_tsv(curves_path(cfg.distill))
    assert all(float(r["sinkhorn_capped_hidden"]) == 1.0 and float(r["sinkhorn_err_hidden"]) > 1e-4 for r in rows)
    assert all(0 < float(r["sinkhorn_iters_logits"]) <= 2.0 for r in rows)  # the cap counts every iteration


def test_a_non_finite_gradient_stops_before_the_optimizer_step():
    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.zeros(2, 3)
    layer.bias.grad = torch.tensor([0.0, float("nan")])
    state = type("State", (), {"global_step": 6})()
    with pytest.raises(distill.NonFiniteLossError, match="non-finite gradient at training step 7"):
        distill.FiniteGradients().on_pre_optimizer_step(None, state, None, model=layer)
    layer.bias.grad = torch.zeros(2)
    distill.FiniteGradients().on_pre_optimizer_step(None, state, None, model=layer)  # finite: no error


def params(cfg, path: Path) -> str:
    save_config(cfg, path)
    return str(path)


def test_cache_from_another_tokenizer_is_refused(tiny, cached, tmp_path):
    # same texts, other vocabulary size: a genuinely different tokenizer (it maps ids to other strings)
    texts = [ALPACA_TEMPLATE.format(**r) + r["output"] for r in read_records(tiny.data.path)]
    tok = build_tokenizer(texts, tmp_path / "tok", tiny.prepare.tokenizer_vocab - 40)
    build_model(
        tok,
        tmp_path / "other",
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        vocab_multiple=64,
        seed=0,
    )
    other = make_cache(tiny, tmp_path / "cache", teacher=str(tmp_path / "other"))
    cfg = distill_cfg(other, tmp_path / "student")
    msg = one_error_line(stage("distill_student", "--params", params(cfg, tmp_path / "p.yaml"), check=False))
    assert "another tokenizer" in msg and str(tmp_path / "cache") in msg
    assert not (tmp_path / "student").exists()


def test_missing_cache_names_the_stage_to_run(cached, tmp_path):
    cfg = distill_cfg(cached, tmp_path / "student")
    p = stage(
        "distill_student", "--params", params(cfg, tmp_path / "p.yaml"), "--cache", str(tmp_path / "nope"), check=False
    )
    msg = one_error_line(p)
    assert str(tmp_path / "nope") in msg and STAGE1 in msg


def test_nan_loss_stops_training_naming_the_step(cached, tmp_path):
    """Train 2 clean steps with a checkpoint, poison the cache's log-probs with NaN, resume: step 3 fails."""
    cache = tmp_path / "cache"
    shutil.copytree(cached.cache.out, cache)
    cfg = distill_cfg(cached, tmp_path / "student", cache=str(cache), max_steps=2, save_steps=2, w_ot=0.0)
    distill.run(cfg)
    store = cache / "train.zarr"
    # NaN is also the fill value: write the chunks anyway, as Stage 1's writer does
    arr = zarr.open_group(str(store), mode="r+")["topk_logprobs"].with_config({"write_empty_chunks": True})
    arr[...] = np.full(arr.shape, 0x7FC0, dtype=np.uint16)  # bf16 NaN bits
    attrs = read_root_attrs(store)  # as if the teacher had emitted NaN: Stage 1 would have recorded these files
    for s in range(n_shards(int(arr.shape[0]), attrs["shard_rows"])):
        write_manifest(store, s, make_shard_manifest(store, attrs, s))
    p = stage(
        "distill_student", "--params", params(cfg, tmp_path / "p.yaml"), "--resume", "--max-steps", "8", check=False
    )
    msg = one_error_line(p)
    assert "non-finite loss at training step 3" in msg and "kl=nan" in msg


@pytest.mark.parametrize("name, option", [("distill_student", "--resume"), ("evaluate", "--eval-examples")])
def test_help(name, option):
    p = stage(name, "--help")
    assert "--params" in p.stdout and option in p.stdout


@pytest.mark.parametrize(
    "weights",
    [dict(w_ce=1.0, w_kl=1.0, w_ot=0.5, w_ot_logits=0.5), dict(w_ce=1.0, w_kl=0.0, w_ot=0.0, w_ot_logits=0.0)],
)
def test_fused_step_equals_the_full_logits_reference(cached, tmp_path, weights):
    """DistillModel's step (no [tokens x vocab] logits) equals the plain full-logits losses (tests/conftest.py
    reference_loss): loss, parts and gradients of the student and of P, with every term on, and for the CE
    baseline that reads no teacher rows."""
    cfg = distill_cfg(cached, tmp_path / "s", **weights)
    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    tok = load_tokenizer(cfg.distill.student)
    batch = collate(c.read_many(range(0, len(c), len(c) // 5), cache_fields(cfg.distill)), tok.pad_token_id)
    D, d = c.provenance["hidden_size"], AutoConfig.from_pretrained(cfg.distill.student).hidden_size
    P = init_projection(D, d, torch.Generator().manual_seed(0)) if weights["w_ot"] else None
    model = DistillModel(load_student(cfg.distill), cfg.distill, len(tok), P)
    got = {}
    for name, step in (("fused", lambda: model(batch)), ("reference", lambda: reference_loss(model, batch))):
        model.zero_grad()
        loss, logs = step()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        # diagnostics (Sinkhorn's iterations, the cost's spread) are not part of the step's value
        logs = {k: v for k, v in logs.items() if not k.startswith(("sinkhorn_", "ot_cost_spread_"))}
        got[name] = (loss.detach(), logs, grads)
    (l1, logs1, g1), (l0, logs0, g0) = got["fused"], got["reference"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert logs1.keys() == logs0.keys()
    for k in logs0:
        torch.testing.assert_close(logs1[k], logs0[k], rtol=1e-4, atol=1e-5)
    assert g1.keys() == g0.keys() and len(g0) > 0 and ("projection" in g0) == bool(weights["w_ot"])
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "dtype, bf16, fp16", [("bf16", True, False), ("fp32", False, False), ("auto", torch.cuda.is_available(), False)]
)
def test_mixed_precision_follows_distill_dtype(tiny, tmp_path, dtype, bf16, fp16):
    cfg = distill_cfg(tiny, tmp_path / "s", dtype=dtype)
    args = distill.training_args(cfg.distill, seed=0)
    assert (args.bf16, args.fp16) == (bf16, fp16)
    assert args.report_to == [] and args.per_device_train_batch_size == 1  # one sample = one block


@pytest.mark.parametrize("eps_scale, eps", [("absolute", 0.005), ("std", 0.05)])
def test_sharp_ot_on_the_embedded_data_is_finite_and_converges(cached, tmp_path, eps_scale, eps):
    """Issue 11: a sharp plan (eps = 0.005, and a relative eps) in float32 on the embedded task's cache: both OT
    terms finite, every sequence converged, finite gradients for the student and P."""
    cfg = distill_cfg(cached, tmp_path / "s", w_ot=0.5, w_ot_logits=0.5)
    cfg.distill.ot.eps, cfg.distill.ot.eps_scale = eps, eps_scale
    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    tok = load_tokenizer(cfg.distill.student)
    batch = collate(c.read_many(range(0, len(c), len(c) // 16), cache_fields(cfg.distill)), tok.pad_token_id)
    D, d = c.provenance["hidden_size"], AutoConfig.from_pretrained(cfg.distill.student).hidden_size
    model = DistillModel(
        load_student(cfg.distill), cfg.distill, len(tok), init_projection(D, d, torch.Generator().manual_seed(0))
    )
    loss, logs = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logs["ot_hidden"]) and torch.isfinite(logs["ot_logits"])
    assert logs["sinkhorn_capped_hidden"] == 0 and logs["sinkhorn_capped_logits"] == 0, logs
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.projection.grad.abs().sum() > 0
