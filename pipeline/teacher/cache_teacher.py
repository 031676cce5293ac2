"""Stage 1: run the teacher alone over the data and write its top-k targets to one Zarr store per split.

Row contract (see cache/schema.py): the row stored for position j is the teacher's distribution over token
j+1, and a row exists iff token j+1 is supervised. The batch plan is a pure function of the data and the
config, so a rerun after a crash recomputes exactly the same batches and the resumed store is bit-identical
to an uninterrupted one.
"""

import contextlib
import functools
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import zarr
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from tqdm import tqdm
from transformers import AutoConfig

from cache import CacheError, CacheMismatchError, CacheWriter, location
from cache.codecs import Basis, parse
from cache.location import is_url, join, loc
from cache.lock import store_lease
from cache.schema import EMBEDDINGS_FILE, TOKENIZER_DIR, canonical, hidden_codec, read_basis, read_root_attrs
from pipeline.config.base import save_config
from pipeline.config.cache import CacheParams
from pipeline.data.records import IGNORE, fingerprint, load_splits, pad_collate, tokenizer_hash
from pipeline.models import check_max_length, check_vocab, load_causal_lm, load_tokenizer, model_hash
from pipeline.teacher import parallel
from pipeline.teacher.codecs import fit_basis, needs_calibration
from pipeline.teacher.topk import topk_from_hidden


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive runs of (already length-sorted) sequences whose padded size stays within batch_tokens."""
    batches, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return batches + [cur] if cur else batches


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: a row is stored at position j iff token j+1 is supervised (the row predicts it)."""
    sup = torch.zeros_like(labels, dtype=torch.bool)
    sup[:, :-1] = labels[:, 1:] != IGNORE
    return sup


def teacher_rows(model, batch: dict, k: int, vocab_size: int, chunk_rows: int, keep_hidden: bool):
    """One teacher forward on a right-padded batch; the stored rows of all its sequences, in order:
    (top-k ids (R, k), top-k log-probs (R, k), tail (R,), hidden (R, D) or None, observed log-prob (R,))."""
    dev = next(model.parameters()).device
    # The decoder alone gives the hidden states that feed lm_head; calling the full model would build the
    # whole (B, L, V) logits tensor (1.2 GB in bf16 at 4k tokens for a 152k vocabulary).
    # use_cache=False: the KV cache of every layer would otherwise be kept for the whole forward (57 KB per
    # token for a 7B teacher) although nothing is generated.
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev), use_cache=False
    ).last_hidden_state  # (B, L, D)
    sup = supervised_rows(batch["labels"])  # (B, L)
    h = hidden[sup.to(dev)]  # (R, D) sequence by sequence, position by position
    # the row at j is followed by input_ids[j+1] (the row contract's target; sup[:, -1] is always False)
    targets = batch["input_ids"][:, 1:][sup[:, :-1]]  # (R,) in the same order as h
    top = topk_from_hidden(h, model.get_output_embeddings(), k, vocab_size, chunk_rows, targets=targets.to(dev))
    return top.ids, top.logprobs, top.tail, (h if keep_hidden else None), top.observed


def cache_split(
    cfg: CacheParams,
    name: str,
    ds,
    get_model,
    tokenizer,
    provenance: dict,
    replace_mismatched: bool = False,
    basis: Basis | None = None,
) -> Path:
    """Cache one split; resumes a partial store and does nothing for a complete, matching one.

    `get_model()` loads the teacher on first use, so a wrong or complete output store is reported before
    minutes are spent loading a 7B checkpoint. `replace_mismatched` deletes a store made from other inputs
    instead of refusing it (DVC uses it: there a param change is deliberate).
    """
    c = cfg.cache
    ds = storage_order(ds)
    input_ids = [np.asarray(x, dtype=np.int32) for x in ds["input_ids"]]
    labels = ds["labels"]
    supervised = [supervised_rows(torch.tensor([lab]))[0].numpy() for lab in labels]  # (L,) each
    path = join(loc(c.out), f"{name}.zarr")
    create = functools.partial(
        CacheWriter.create_or_resume,
        path,
        sample_ids=list(ds["sample_id"]),
        input_ids_per_seq=input_ids,
        supervised_per_seq=supervised,
        k=c.k,
        logprob_dtype=c.logprob_dtype,
        hidden_size=None if c.hidden_codec == "none" else provenance["hidden_size"],
        hidden_codec=None if c.hidden_codec == "none" else c.hidden_codec,
        hidden_basis=basis,
        provenance={**provenance, "split": name, "dataset_fingerprint": fingerprint(ds, cfg.data.template)},
        shard_rows=c.shard_rows,
    )
    # One run per store (cache/lock.py): the lease is taken before create_or_resume reads the shard records
    # and released only after the writer is closed, so a second run can neither snapshot shard_done while this
    # one is writing nor rewrite the shards it finishes. A crashed run's lease goes with its process. Under
    # torchrun rank 0 holds it for the job and creates or repairs the store; the other ranks join after it
    # (pipeline/teacher/parallel.py).
    rank, world = parallel.world()
    with contextlib.ExitStack() as held:

        def open_writer() -> CacheWriter:
            held.enter_context(store_lease(path))
            if rank > 0:
                return CacheWriter.open(path)
            try:
                return create()
            except CacheMismatchError as e:
                if not replace_mismatched:
                    raise
                print(f"cache {path}: replacing a store made with other inputs ({e})")
                location.remove_tree(path)
                return create()

        writer = parallel.rank0_first(open_writer)
        if writer.complete:
            if rank == 0:
                print(f"cache {path}: complete and up to date, nothing to do")
            parallel.barrier()  # rank 0 keeps the lease until every rank has checked it
            return path
        batches, rows = plan_batches(input_ids, supervised, c.batch_tokens)
        n_all = sum(
            len(input_ids[i]) for b, (r0, r1) in zip(batches, rows) for i in b if not writer.is_row_range_done(r0, r1)
        )  # what one process would run
        owned = deal_shards(writer, batches, rows, input_ids, path) if world > 1 else None
        todo = [(b, r0) for b, (r0, r1) in zip(batches, rows) if not writer.is_row_range_done(r0, r1)]
        n_tok = sum(len(input_ids[i]) for b, _ in todo for i in b)
        who = f"rank {rank}/{world}: {len(owned[rank])} of {writer.n_shards} shards, " if world > 1 else ""
        print(
            f"cache {path}: {who}{len(ds)} sequences, {rows[-1][1] if rows else 0} rows, "
            f"{len(todo)}/{len(batches)} batches to run"
        )
        t0 = time.perf_counter()
        with writer, tqdm(total=n_tok, unit="tok", unit_scale=True, desc=f"teacher {name}", disable=rank > 0) as bar:
            for b, r0 in todo:  # the teacher's forward on one batch, its rows written from row r0 on
                batch = pad_collate(
                    [{"input_ids": input_ids[i], "labels": labels[i]} for i in b], tokenizer.pad_token_id
                )
                ids, lp, tail, hidden, observed = teacher_rows(
                    get_model(), batch, c.k, len(tokenizer), c.chunk_rows, c.hidden_codec != "none"
                )
                writer.write_rows(r0, ids, lp, tail, hidden, observed=observed)
                bar.update(sum(len(input_ids[i]) for i in b))
            writer.close(mark_complete=world == 1)
        seconds = time.perf_counter() - t0
        if world > 1:  # every rank has written and closed its shards; rank 0 keeps the lease until then
            stats = parallel.gather((n_tok, seconds))
            if rank == 0:
                done = writer.finish()
                report_balance(path, stats, n_all)
                if not done:
                    raise CacheError(f"cache {path}: shards missing after every rank finished; rerun Stage 1")
            parallel.barrier()
        print(f"cache {path}: done in {seconds:.1f}s")
        return path


def plan_batches(input_ids: list, supervised: list, batch_tokens: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The teacher's batches (sequence indices, by length) and the range of rows [r0, r1) each one writes. They
    depend on the data and batch_tokens only, never on the world size: every row comes out of the same batch
    whichever rank computes it, so the store is the same for any number of ranks."""
    row_start = np.r_[0, np.cumsum([s.sum() for s in supervised])]
    batches = length_batches([len(x) for x in input_ids], batch_tokens)
    return batches, [(int(row_start[b[0]]), int(row_start[b[-1] + 1])) for b in batches]


def deal_shards(writer: CacheWriter, batches, rows, input_ids, path) -> list:
    """Data-parallel Stage 1: the shards still to write, dealt out by cost. Rank 0 deals them from the records it
    read before anyone writes, and sends the deal to all: a rank that opened the store later could otherwise see a
    shard rank 0 already finished and deal differently. Each rank's writer then owns its part; returns the deal."""
    rank, world = parallel.world()
    cost = parallel.shard_costs(
        rows, [len(b) * max(len(input_ids[i]) for i in b) for b in batches], writer.shard_rows, writer.n_shards
    )
    owned = parallel.broadcast(parallel.assign_shards(cost, np.flatnonzero(~writer.done), world) if rank == 0 else None)
    writer.own(owned[rank])
    if rank == 0 and sum(map(bool, owned)) < world:
        print(
            f"cache {path}: only {int((~writer.done).sum())} shards to write for {world} ranks, some ranks "
            f"have nothing to do; a smaller cache.shard_rows (now {writer.shard_rows}) spreads a small split"
        )
    return owned


def report_balance(path: Path, stats: list[tuple[int, float]], n_all: int) -> None:
    """Rank 0's summary of a data-parallel split: tokens and seconds per rank, the imbalance (max / mean) and the
    share computed twice (batches straddling two ranks' shards; n_all = the tokens one process would run)."""
    tok = np.array([t for t, _ in stats], dtype=float)
    sec = np.array([s for _, s in stats], dtype=float)
    per = ", ".join(f"{int(t)} tok in {s:.1f}s" for t, s in stats)
    imb = [x.max() / x.mean() if x.mean() > 0 else 1.0 for x in (tok, sec)]
    print(
        f"cache {path}: ranks ran {per}; imbalance (max/mean) {imb[0]:.3f} in tokens, {imb[1]:.3f} in time; "
        f"{tok.sum() / max(n_all, 1) - 1:.1%} of the tokens run twice (batches across two ranks' shards); "
        f"{n_all / max(sec.max(), 1e-9):.0f} tok/s in total"
    )


def run(cfg: CacheParams, replace_mismatched: bool = False) -> None:
    """Stage 1 entry: load only the teacher, cache each configured split, save the resolved config."""
    c = cfg.cache
    out = loc(c.out)  # a folder, or an fsspec URL (s3://bucket/prefix; docs/design.md "Caches on ... storage")
    if not is_url(out):
        check_writable_folder(out)
    check_max_length(c.teacher, cfg.data.max_length, c.teacher)  # from its config: before data or weights load
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(c.teacher)
    if c.k > len(tokenizer):
        raise CacheError(f"cache.k={c.k} is larger than the tokenizer's vocabulary ({len(tokenizer)} tokens)")
    splits = load_splits(cfg.data, tokenizer)
    missing = [s for s in c.splits if s not in splits.splits]
    if missing:
        raise CacheError(f"cache.splits: unknown split {missing[0]!r} (use train, validation, test)")
    teacher_cfg = AutoConfig.from_pretrained(c.teacher)
    check_vocab(teacher_cfg.vocab_size, len(tokenizer), c.teacher)  # padded logits are sliced to the tokenizer
    provenance = {
        "teacher": c.teacher,
        "teacher_hash": model_hash(c.teacher),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "tokenizer_size": len(tokenizer),
        "logits_size": teacher_cfg.vocab_size,
        "hidden_size": teacher_cfg.hidden_size,
        "template": cfg.data.template,
        "max_length": cfg.data.max_length,
        # what shapes the stored values; `out`, `splits` and `device_map` only say where and which, so they may change
        "params": {k: v for k, v in asdict(c).items() if k not in ("out", "splits", "device_map")},
    }
    get_model = functools.cache(lambda: load_causal_lm(c.teacher, c.dtype, c.load_in_bits, c.device_map).eval())

    parallel.init()  # under torchrun: each rank writes its own shards of every split (pipeline/teacher/parallel.py)
    rank, _ = parallel.world()
    try:
        with torch.inference_mode():
            basis = None
            if c.hidden_codec != "none" and parse(c.hidden_codec)[1]:  # a low-rank code: one basis for every split
                # fitted (or read back) by rank 0, sent to the others: every rank encodes with the very same basis
                basis = parallel.broadcast(
                    parallel.rank0_first(
                        lambda: (
                            (
                                stored_basis(cfg, provenance)
                                or fit_hidden_basis(cfg, splits[c.splits[0]], get_model, tokenizer, len(tokenizer))
                            )
                            if rank == 0
                            else None
                        )
                    )
                )
            paths = [
                cache_split(cfg, name, splits[name], get_model, tokenizer, provenance, replace_mismatched, basis)
                for name in c.splits
            ]
            if rank == 0:
                # What a student with another tokenizer needs besides the stores (pipeline/distill/crosstok.py): the
                # teacher's tokenizer (Stage 2 checks it against each store's tokenizer_hash) and its input-embedding
                # rows of every id in a cached top-k (the token-level OT places the teacher's distribution at them).
                with tempfile.TemporaryDirectory() as tmp:  # written locally, then put in place (or uploaded)
                    tokenizer.save_pretrained(tmp)
                    location.upload(Path(tmp), join(out, TOKENIZER_DIR))
                save_embedding_rows(join(out, EMBEDDINGS_FILE), paths, get_model)
                with tempfile.TemporaryDirectory() as tmp:
                    save_config(cfg, Path(tmp) / "config.yaml")
                    location.upload(Path(tmp) / "config.yaml", join(out, "config.yaml"))
        parallel.barrier()
    finally:
        parallel.shutdown()


def storage_order(ds):
    """Storage order = processing order: sorted by length (then id) so that batches waste little padding."""
    lengths, sids = [len(x) for x in ds["input_ids"]], ds["sample_id"]
    return ds.select(sorted(range(len(ds)), key=lambda i: (lengths[i], sids[i])))


def stored_basis(cfg: CacheParams, provenance: dict) -> Basis | None:
    """The basis of a store of this run that already exists (resume, or a split added later): the splits of one
    cache share one basis, and a resumed store must go on with the one its finished shards were encoded with."""
    c = cfg.cache
    for name in c.splits:
        path = join(loc(c.out), f"{name}.zarr")
        try:
            attrs = read_root_attrs(path)
        except CacheError:  # absent, or not a cache: nothing to reuse
            continue
        prov = attrs.get("provenance", {})
        same = all(prov.get(k) == provenance[k] for k in ("teacher_hash", "tokenizer_hash"))
        if same and hidden_codec(attrs) == c.hidden_codec and prov.get("params") == canonical(provenance["params"]):
            try:
                return read_basis(zarr.open_group(path, mode="r"), attrs)
            except Exception:  # a damaged basis: another split's store holds the same one; else it is fitted again
                continue  # (and a store encoded with the lost one no longer matches: it is replaced or refused)
    return None


def fit_hidden_basis(cfg: CacheParams, ds, get_model, tokenizer, vocab_size: int) -> Basis:
    """Fit cache.hidden_codec's basis on ~hidden_calibration_rows rows from batches spread over `ds` (a teacher pass
    of their own: a few percent of the run at the default 16,384 rows) and lm_head's real-token rows."""
    c = cfg.cache
    ds = storage_order(ds)
    model = get_model()
    head = model.get_output_embeddings()
    weight, bias = head.weight[:vocab_size], (head.bias[:vocab_size] if head.bias is not None else None)
    hidden = None
    if needs_calibration(c.hidden_codec):
        batches = length_batches([len(x) for x in ds["input_ids"]], c.batch_tokens)
        rows = [sum(sum(x != IGNORE for x in ds[i]["labels"][1:]) for i in b) for b in batches]
        want = max(1, -(-c.hidden_calibration_rows * len(batches) // max(sum(rows), 1)))  # batches to run
        pick = sorted({int(round(x)) for x in np.linspace(0, len(batches) - 1, min(want, len(batches)))})
        hs = []
        for j in tqdm(pick, desc=f"calibration ({c.hidden_codec})", unit="batch"):
            batch = pad_collate(
                [{"input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]} for i in batches[j]],
                tokenizer.pad_token_id,
            )
            hs.append(teacher_rows(model, batch, 1, vocab_size, c.chunk_rows, True)[3].float().cpu())
        hidden = torch.cat(hs)[: c.hidden_calibration_rows]  # (n, D) on the CPU: the fit's float64 sums run there
        if len(hidden) < parse(c.hidden_codec)[1]:
            raise CacheError(
                f"cache.hidden_codec={c.hidden_codec}: only {len(hidden)} calibration rows for a rank of "
                f"{parse(c.hidden_codec)[1]}; lower the rank or raise cache.hidden_calibration_rows"
            )
    t0 = time.perf_counter()
    basis = fit_basis(c.hidden_codec, hidden, weight, bias)
    print(
        f"hidden codec {c.hidden_codec}: basis fitted on {0 if hidden is None else len(hidden)} rows in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return basis


def cached_ids(paths: list) -> np.ndarray:
    """The distinct token ids in the top-k of the given stores (read shard by shard: bounded memory)."""
    ids = np.zeros(0, dtype=np.int64)
    for path in paths:
        arr = zarr.open_group(path, mode="r")["topk_ids"]
        step = arr.shards[0] if arr.shards else arr.chunks[0]
        for r0 in range(0, arr.shape[0], step):
            ids = np.union1d(ids, np.unique(arr[r0 : r0 + step]))
    return ids


def save_embedding_rows(path, stores: list, get_model) -> None:
    """`path` (safetensors) = {"ids": (n,) int64, "weight": (n, D) float32}: the teacher's input-embedding rows of
    every id in the stores' top-k. Distinct ids only (a few thousand for real data, not the 1 GB matrix); the
    teacher is loaded for it only when the file is missing or covers other ids."""
    ids = cached_ids(stores)
    if location.exists(path) and np.array_equal(safetensors_load(location.read_bytes(path))["ids"].numpy(), ids):
        return
    emb = get_model().get_input_embeddings().weight  # (V, D)
    rows = emb[torch.as_tensor(ids, device=emb.device)].float().cpu()  # (n, D)
    # atomic: a crash never leaves a torn file under the final name
    location.write_atomic(path, safetensors_save({"ids": torch.as_tensor(ids), "weight": rows.contiguous()}))


def check_writable_folder(out: Path) -> None:
    """Checked before anything is loaded or created: a file or a read-only folder on the way to cache.out would
    otherwise fail deep in the Zarr writer, after the data and the teacher have been loaded."""
    first = out  # the nearest existing entry on the way to cache.out; everything below it gets created
    while not os.path.lexists(first) and first != first.parent:
        first = first.parent
    if not first.is_dir():
        where = "is an existing file" if first == out else f"is below {first}, which is a file"
        raise CacheError(f"cache.out={out} {where}, not a folder: move the file away or set cache.out to a folder path")
    if not os.access(first, os.W_OK | os.X_OK):
        raise CacheError(
            f"cache.out={out}: cannot write in {first} (read-only or no permission): make it "
            "writable or set cache.out to a writable folder"
        )
