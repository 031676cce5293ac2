"""Data-parallel Stage 1 under torchrun: which process this is, the few collective steps it needs, and which shards
each rank writes.

Design (cache/writer.py says why a shard must have one writer): the batch plan (`cache_teacher.length_batches`)
depends on the data and `cache.batch_tokens` only, never on the world size, and every stored row comes out of the
same batch whoever computes it. Each rank writes only the shards it owns, a contiguous run of similar cost; a batch
whose rows straddle the last shard of one rank and the first of the next is computed by both (each keeps its own
rows): world size - 1 batches at most, and the store is bit-identical for every world size and to a single-process
run. Rank 0 creates or repairs the store, the other ranks open it after it, rank 0 deals the shards out from the
records it read before anyone writes and sends the assignment (a rank reading the records later could see a shard
rank 0 had finished meanwhile), and rank 0 sets `complete` once every rank has closed. Resume works at any world size:
the shards without a record are dealt out again.

The coordination runs on gloo (CPU objects only, also on GPU machines): nothing but a few barriers and small
objects crosses processes in Stage 1, and gloo rendezvouses across nodes through torchrun's MASTER_ADDR as well.
"""

import os
from datetime import timedelta

import numpy as np
import torch.distributed as dist

# A rank that finishes its shards waits at a barrier for the slowest one; the default 30-minute collective timeout
# would end a long run with an imbalance of more than that. A rank that dies is handled by torchrun (it stops the
# job), not by this timeout.
BARRIER_TIMEOUT = timedelta(days=7)


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init() -> None:
    """Join the job's gloo process group (torchrun's env:// rendezvous); nothing in a plain process."""
    if world()[1] > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj, src: int = 0):
    """`obj` of rank `src` on every rank (picklable objects)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank0_first(fn):
    """fn() on rank 0, then on the other ranks; an exception on rank 0 is raised on every rank (so a refused store
    ends the whole job with rank 0's message, not with ranks waiting at a barrier)."""
    rank, _ = world()
    if rank == 0:
        try:
            out = fn()
        except Exception as e:
            broadcast(e)
            raise
        broadcast(None)
        return out
    err = broadcast(None)
    if err is not None:
        raise err
    return fn()


def shard_costs(batch_rows: list[tuple[int, int]], batch_cost: list[int], shard_rows: int, n_shards: int) -> np.ndarray:
    """(n_shards,) the cost of writing each shard: the cost of every batch whose rows [r0, r1) touch it (a batch
    straddling a boundary counts for both shards: both owners run it)."""
    cost = np.zeros(n_shards, dtype=np.int64)
    for (r0, r1), c in zip(batch_rows, batch_cost):
        if r1 > r0:
            cost[r0 // shard_rows : (r1 - 1) // shard_rows + 1] += c
    return cost


def assign_shards(cost: np.ndarray, todo: np.ndarray, world_size: int) -> list[list[int]]:
    """Deal the shards `todo` (indices) out to `world_size` ranks as contiguous runs of similar total cost: rank r's
    run ends where the cumulative cost comes nearest to (r + 1) / world_size of the total. Sequences are stored
    sorted by length, so runs of equal shard counts would give the last rank the longest sequences; cutting by cost
    keeps every rank within one shard's cost of the mean. Contiguous, because a batch straddling two shards of
    different ranks runs on both: with runs that happens world_size - 1 times, not at every shard boundary.
    Deterministic; each rank's shards in increasing order (a rank may get none when shards are fewer than ranks)."""
    todo = np.sort(np.asarray(todo, dtype=np.int64))
    cum = np.cumsum(cost[todo]) if len(todo) else np.zeros(0)
    total = cum[-1] if len(cum) else 0
    cuts = [0]
    for r in range(1, world_size):
        target = total * r / world_size
        i = int(np.searchsorted(cum, target))  # first shard whose cumulative cost reaches the target
        if i < len(cum) and (i == 0 or abs(cum[i] - target) <= abs(cum[i - 1] - target)):
            i += 1  # ending the run after shard i comes nearer to the target than before it
        cuts.append(min(max(i, cuts[-1]), len(todo)))
    cuts.append(len(todo))
    return [todo[a:b].tolist() for a, b in zip(cuts[:-1], cuts[1:])]
