"""Scale-out benchmark on this CPU: Stage 1 and Stage 2 with 1 and 2 processes, and the data-loading share of a
Stage-2 step.

    python bench/scale_bench.py [--examples 6000] [--steps 60]   # writes bench/results/scale_bench.{json,md}

Honest about the machine: 2 cores. Two processes with one thread each are compared with one process with one
thread (the per-process rate a GPU box multiplies by its GPUs) and with one process using both cores (what this
machine can do at best), so the table shows what data parallelism costs and what it cannot buy here.

Setup: the embedded default's task and model shapes (params.yaml: 4 x 128 teacher, 2 x 64 student), random-init
teacher (Stage 1's speed does not depend on what it knows), `--examples` records built in a temp folder, cache
shards of 4,096 rows (the default 65,536 would make this split one shard: nothing to share between ranks).

Stage 1: `python -m stages.cache_teacher` and `torchrun --nproc_per_node=2 -m stages.cache_teacher` over the train
split; tokens/s over the teacher passes of the run (its own "done in" time: model loading and process start are
not in it; with 2 ranks the slowest rank's time), per-rank tokens and the imbalance (max / mean) it prints, the
share of tokens run twice (batches across the boundary of two ranks' shards), and whether the two stores are
byte-identical (they must be).
Stage 2: `python -m stages.distill_student` (CE + KL + OT on hidden states and logits, as the default) for
--steps steps with 1 process and with torchrun 2 processes, the same per-process batch; optimizer steps/s and
sequences/s from Trainer's train_runtime (model loading excluded).
Data loading: in this process, the time the training loop waits in the DataLoader's `__next__`, as a share of
the training time, with num_workers 0 and 1 (target <= 5% with a worker).
"""

import argparse
import copy
import filecmp
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config.base import save_config  # noqa: E402
from pipeline.config.params import Config, load_config  # noqa: E402
from pipeline.versions import versions, versions_line  # noqa: E402

RESULTS = ROOT / "bench/results"
# ~16 shards for the default 6,000 records (66k rows): the unit ranks share (a 10^8-token run has ~1,500 of 65,536)
SHARD_ROWS = 4096


def env(threads: int) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(cmd: list[str], threads: int) -> str:
    p = subprocess.run(cmd, cwd=ROOT, env=env(threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def launch(nproc: int, module: str, params: Path, threads: int = 1) -> str:
    if nproc == 1:
        return run([sys.executable, "-m", module, "--params", str(params)], threads)
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            module,
            "--params",
            str(params),
        ],
        threads,
    )


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    if any(not filecmp.cmp(a / f, b / f, shallow=False) for f in cmp.common_files):
        return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def stage1(cfg: Config, tmp: Path) -> list[dict]:
    rows, stores = [], {}
    for name, nproc, threads in (
        ("1 process x 1 thread", 1, 1),
        ("1 process x 2 threads", 1, 2),
        ("2 processes x 1 thread", 2, 1),
    ):
        c = copy.deepcopy(cfg)
        c.cache.out, c.cache.splits = str(tmp / f"cache_{nproc}_{threads}"), ["train"]
        c.cache.shard_rows = SHARD_ROWS
        save_config(c, tmp / "s1.yaml")
        log = launch(nproc, "stages.cache_teacher", tmp / "s1.yaml", threads)
        secs = max(float(x) for x in re.findall(r"done in ([\d.]+)s", log))
        n_tok = int(re.search(r"(\d+) rows", log).group(1))  # rows; tokens below from the store
        stores[name] = Path(c.cache.out) / "train.zarr"
        attrs = json.loads((stores[name] / "zarr.json").read_text())["attributes"]
        row = {
            "setting": name,
            "processes": nproc,
            "threads": threads,
            "seconds": secs,
            "tokens": attrs["n_tokens"],
            "rows": n_tok,
            "tok_per_s": attrs["n_tokens"] / secs,
        }
        m = re.search(
            r"ranks ran (.*); imbalance \(max/mean\) ([\d.]+) in tokens, ([\d.]+) in time; ([\d.]+)% of the "
            r"tokens run twice",
            log,
        )
        if m:
            row.update(
                per_rank=m.group(1),
                imbalance_tokens=float(m.group(2)),
                imbalance_time=float(m.group(3)),
                duplicated=float(m.group(4)) / 100,
            )
        rows.append(row)
        print(row, flush=True)
    ref = stores["1 process x 1 thread"]
    for r in rows:
        r["identical_to_1_process"] = same_tree(ref, stores[r["setting"]])
    return rows


def stage2(cfg: Config, tmp: Path, steps: int) -> list[dict]:
    rows = []
    for name, nproc, threads in (
        ("1 process x 1 thread", 1, 1),
        ("1 process x 2 threads", 1, 2),
        ("2 processes x 1 thread", 2, 1),
    ):
        c = copy.deepcopy(cfg)
        d = c.distill
        d.out, d.plots, d.max_steps, d.num_workers = str(tmp / f"s_{nproc}_{threads}"), str(tmp / "plots"), steps, 0
        d.logging_steps, d.save_steps, d.eval_steps = steps, 0, 0
        save_config(c, tmp / "s2.yaml")
        log = launch(nproc, "stages.distill_student", tmp / "s2.yaml", threads)
        runtime = max(float(x) for x in re.findall(r"'train_runtime': '([\d.]+)'", log))  # the slowest rank
        rows.append(
            {
                "setting": name,
                "processes": nproc,
                "threads": threads,
                "steps": steps,
                "batch_per_process": d.batch_size,
                "seconds": runtime,
                "steps_per_s": steps / runtime,
                "seq_per_s": steps * d.batch_size * nproc / runtime,
            }
        )
        print(rows[-1], flush=True)
    return rows


def data_share(cfg: Config, tmp: Path, steps: int) -> list[dict]:
    """Time spent waiting in DataLoader.__next__ during trainer.train(), as a share of it (this process)."""
    import torch
    from torch.utils.data import dataloader

    from pipeline.distill import train

    torch.set_num_threads(1)
    rows = []
    for workers in (0, 1):
        waited = [0.0]
        orig = dataloader._BaseDataLoaderIter.__next__

        def timed(self, _orig=orig):
            t0 = time.perf_counter()
            try:
                return _orig(self)
            finally:
                waited[0] += time.perf_counter() - t0  # noqa: B023

        dataloader._BaseDataLoaderIter.__next__ = timed
        trained = [0.0]
        orig_train = train.DistillTrainer.train

        def timed_train(self, *a, _orig=orig_train, **kw):
            t0 = time.perf_counter()
            try:
                return _orig(self, *a, **kw)
            finally:
                trained[0] = time.perf_counter() - t0  # noqa: B023

        train.DistillTrainer.train = timed_train
        try:
            c = copy.deepcopy(cfg)
            d = c.distill
            d.out, d.plots, d.max_steps, d.num_workers = str(tmp / f"dl{workers}"), str(tmp / "plots"), steps, workers
            d.logging_steps, d.save_steps, d.eval_steps = steps, 0, 0
            train.run(c)
        finally:
            dataloader._BaseDataLoaderIter.__next__ = orig
            train.DistillTrainer.train = orig_train
        rows.append(
            {
                "num_workers": workers,
                "steps": steps,
                "train_seconds": trained[0],
                "waiting_seconds": waited[0],
                "share": waited[0] / trained[0],
            }
        )
        print(rows[-1], flush=True)
    return rows


def table(results: dict) -> str:
    out = [
        "### Stage 1 (teacher passes over the train split; tokens/s excludes loading)",
        "",
        "| setting | tokens/s | vs 1 process x 1 thread | per rank (tokens, seconds) | imbalance tokens / time "
        "| run twice | store identical |",
        "|---|---:|---:|---|---|---:|---|",
    ]
    base = results["stage1"][0]["tok_per_s"]
    for r in results["stage1"]:
        imb = f"{r['imbalance_tokens']:.3f} / {r['imbalance_time']:.3f}" if "imbalance_tokens" in r else "—"
        dup = f"{r['duplicated']:.1%}" if "duplicated" in r else "—"
        out.append(
            f"| {r['setting']} | {r['tok_per_s']:,.0f} | {r['tok_per_s'] / base:.2f}x | "
            f"{r.get('per_rank', '—')} | {imb} | {dup} | {'yes' if r['identical_to_1_process'] else 'NO'} |"
        )
    out += [
        "",
        "### Stage 2 (CE + KL + OT, same per-process batch; from Trainer's train_runtime)",
        "",
        "| setting | steps/s | sequences/s | vs 1 process x 1 thread |",
        "|---|---:|---:|---:|",
    ]
    base = results["stage2"][0]["seq_per_s"]
    for r in results["stage2"]:
        out.append(f"| {r['setting']} | {r['steps_per_s']:.2f} | {r['seq_per_s']:.0f} | {r['seq_per_s'] / base:.2f}x |")
    out += [
        "",
        "### Data loading share of a Stage-2 step (1 process, 1 thread)",
        "",
        "| num_workers | waiting in the DataLoader | share of training time | target |",
        "|---:|---:|---:|---|",
    ]
    for r in results["data"]:
        target = ("met" if r["share"] <= 0.05 else "missed") if r["num_workers"] else "—"
        out.append(
            f"| {r['num_workers']} | {r['waiting_seconds']:.2f} s of {r['train_seconds']:.1f} s | "
            f"{r['share']:.1%} | {target} |"
        )
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=6000, help="records of the embedded task to build")
    ap.add_argument("--steps", type=int, default=60, help="Stage-2 optimizer steps per setting")
    args = ap.parse_args()
    from pipeline.data import prepare

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        cfg = load_config(ROOT / "params.yaml")
        cfg.prepare.out_data, cfg.prepare.out_models = str(tmp / "data/task.jsonl"), str(tmp / "base")
        cfg.prepare.n_examples = args.examples
        cfg.data.path = cfg.prepare.out_data
        cfg.cache.teacher = str(tmp / "base/teacher")
        cfg.distill.student, cfg.distill.cache = str(tmp / "base/student"), str(tmp / "cache_1_1")
        cfg.cache.shard_rows = SHARD_ROWS
        prepare.run(cfg)
        t0 = time.time()
        results = {
            "machine": f"{os.cpu_count()} cores",
            "examples": args.examples,
            "stage1": stage1(cfg, tmp),
            "stage2": stage2(cfg, tmp, args.steps),
            "data": data_share(cfg, tmp, args.steps),
        }
        results["seconds"] = time.time() - t0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale_bench.json").write_text(json.dumps({**results, "versions": versions()}, indent=1))
    md = table(results)
    (RESULTS / "scale_bench.md").write_text(f"{md}\n{versions_line()}\n")
    print(md)


if __name__ == "__main__":
    main()
