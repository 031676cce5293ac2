"""Data-parallel Stage 2: real torchrun / `accelerate launch` jobs of 2 CPU processes (gloo) train exactly like one
process that takes the same two blocks per optimizer step, with all four loss terms (CE, top-k KL, OT on hidden
states and on logits): the same loss curve, every loss part, gradient norm and final weights, within float32
rounding. That needs each rank to read other blocks (Trainer's sampler, sharded by accelerate), the loss scaled to
DDP's averaging, the parts averaged over ranks for the curves, P inside the trained module, rank 0 alone writing."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config.base import save_config
from pipeline.distill.model import PROJECTION_FILE
from tests.conftest import ROOT, distill_cfg, make_cache, read_tsv, stage
from tests.test_parallel_stage1 import ENV, torchrun

COLUMNS = ("loss", "ce", "kl", "ot_hidden", "ot_logits", "grad_norm", "learning_rate", "epoch")
# `accelerate launch --multi_gpu` is accelerate's torchrun launcher; without CUDA the ranks run on the CPU (gloo)
ACCELERATE = [
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes=2",
    "--num_machines=1",
    "--mixed_precision=no",
    "--dynamo_backend=no",
]


@pytest.fixture(scope="module")
def cached(tiny, tmp_path_factory):
    return make_cache(tiny, tmp_path_factory.mktemp("ddp") / "cache")


# the real-model setting too: a 4-bit base with LoRA adapters (dropout off: each rank draws its own dropout masks,
# so with dropout the two runs are equally valid but not equal)
MODES = {"full": {}, "lora4": {"mode": "lora", "load_in_bits": 4}}


@pytest.fixture(scope="module")
def one_process(cached, tmp_path_factory):
    """The reference per mode: one process, 2 micro-batches (blocks) of 8 sequences per optimizer step."""
    runs = {}

    def get(mode: str) -> Path:
        if mode not in runs:
            runs[mode] = train(cached, tmp_path_factory.mktemp(f"ddp1_{mode}"), None, mode, grad_accum=2)
        return runs[mode]

    return get


def train(cached, tmp: Path, launcher: str | None, mode: str, **kw) -> Path:
    d = distill_cfg(
        cached, tmp / "s", batch_size=8, max_steps=4, w_kl=1.0, w_ot=0.5, w_ot_logits=0.5, **MODES[mode], **kw
    )
    d.distill.lora.dropout = 0.0
    save_config(d, tmp / "p.yaml")
    args = ("-m", "stages.distill_student", "--params", str(tmp / "p.yaml"))
    if launcher is None:
        stage("distill_student", *args[2:])
        return tmp
    if launcher == "torchrun":
        p = torchrun(2, *args)
    else:
        p = subprocess.run([sys.executable, *ACCELERATE, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert (p.stdout + p.stderr).count("distill: 4 steps") == 1  # rank 0 alone reports and saves
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("launcher, mode", [("torchrun", "full"), ("accelerate", "full"), ("torchrun", "lora4")])
def test_two_ranks_train_like_one_process_with_both_blocks(cached, one_process, tmp_path, launcher, mode):
    one = one_process(mode)
    two = train(cached, tmp_path, launcher, mode, grad_accum=1)
    a, b = read_tsv(one / "plots/train_s.tsv"), read_tsv(two / "plots/train_s.tsv")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for k in COLUMNS:
            assert float(rb[k]) == pytest.approx(float(ra[k]), rel=2e-5, abs=1e-7), (ra["step"], k)
    assert float(a[-1]["ce"]) < float(a[0]["ce"])  # it trained
    name = "adapter_model.safetensors" if mode == "lora4" else "model.safetensors"
    wa, wb = load_file(str(one / "s" / name)), load_file(str(two / "s" / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    pa, pb = torch.load(one / "s" / PROJECTION_FILE), torch.load(two / "s" / PROJECTION_FILE)
    torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-6)
