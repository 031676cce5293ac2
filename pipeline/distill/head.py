"""The teacher's lm_head, read alone from its checkpoint: what Stage 2 needs to rebuild the teacher's exact
distribution softmax(W h + b) from the final hidden states h that Stage 1 cached.

Why only this tensor: W is (V_logits, D), 1.09 GB in bf16 for Qwen2.5-7B, whereas the whole teacher is 15 GB
and would have to be instantiated next to the student. safetensors files are memory-mapped with a JSON header
naming every tensor, so the head's rows are read straight from the one file holding them; no other tensor is
read and no model is built. The checkpoint is checked against the cache's provenance (the teacher_hash, the
logits and hidden sizes that cache_teacher.run recorded), so a W that did not produce the cached h is refused.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from cache.errors import CacheMismatchError
from pipeline.models import ModelLoadError, load_pretrained, model_hash

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class _HubFile:
    """hf_hub_download behind the `from_pretrained` interface, so that a hub problem (offline, unreachable, no
    such repo or file) gets `load_pretrained`'s one-line ModelLoadError and its quick offline fallback."""

    @staticmethod
    def from_pretrained(repo_id: str, filename: str, **kwargs) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename, **kwargs)


def _weight_files(source: str) -> tuple[dict[str, str], Callable[[str], str]]:
    """({tensor name: file name}, file name -> local path) of a checkpoint, reading only headers/the index."""
    folder = Path(source)
    if folder.is_dir():

        def local(name: str) -> str:
            if not (folder / name).is_file():
                raise ModelLoadError(f"teacher checkpoint {source}: {INDEX} names {name}, which is missing")
            return str(folder / name)

        if (folder / INDEX).is_file():
            return json.loads((folder / INDEX).read_text())["weight_map"], local
        files = sorted(f.name for f in folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(
                f"teacher checkpoint {source} has no safetensors weights ({SINGLE} or {INDEX}): "
                "point distill.teacher_head at the folder Stage 1 ran (save it with safetensors)"
            )
        names = {}
        for name in files:  # safe_open only parses the header: cheap even for a 15 GB file
            with safe_open(str(folder / name), framework="pt") as f:
                names.update(dict.fromkeys(f.keys(), name))
        return names, local
    # A hub name: Stage 1 loaded the same repo with from_pretrained, so the index and the shard are normally in the
    # local HF cache already (nothing is downloaded); only the index and the head's shard are ever fetched.
    fetch = lambda name: load_pretrained(_HubFile, source, filename=name)  # noqa: E731
    try:
        index = fetch(INDEX)
    except ModelLoadError:  # a single-file checkpoint has no index
        path = fetch(SINGLE)
        with safe_open(path, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE), lambda name: path
    return json.loads(Path(index).read_text())["weight_map"], fetch


def _find(names, suffix: str) -> str | None:
    """The tensor called `suffix`, else the shortest name ending in "." + suffix: some checkpoints prefix the
    language model's tensors (e.g. "model.language_model.embed_tokens.weight" in multimodal ones)."""
    hits = sorted((n for n in names if n == suffix or n.endswith("." + suffix)), key=lambda n: (len(n), n))
    return hits[0] if hits else None


def load_teacher_head(
    source: str, provenance: dict, *, device="cpu", dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V_tok, D), bias (V_tok,) or None) of the teacher's lm_head, rows sliced to the tokenizer size.

    source: a local checkpoint folder (config.json + model.safetensors, or model.safetensors.index.json + shards)
    or a hub name; for a hub name only config.json, the index and the shard holding the head are fetched with
    huggingface_hub, which reuses the HF cache Stage 1 filled. provenance: a cache store's provenance.
    A tied checkpoint (tie_word_embeddings: no lm_head.weight stored) gives its input embedding, which is the
    matrix its lm_head multiplies by. Returned contiguous in `dtype` (default: as stored) on `device`.
    Raises CacheMismatchError if `source` is not the cache's teacher, ModelLoadError if a file or tensor is missing.
    """
    # model_hash reads config.json only (and the weight files' names and sizes): cheap, and it tells a wrong
    # checkpoint before anything big is read.
    have = model_hash(source)
    if have != provenance["teacher_hash"]:
        raise CacheMismatchError(
            f"distill.teacher_head={source} is not the teacher the cache was made with (teacher_hash {have} != "
            f"{provenance['teacher_hash']}): point it at {provenance['teacher']}"
        )
    names, path_of = _weight_files(source)
    weight = _find(names, "lm_head.weight") or _find(names, "embed_tokens.weight")
    if weight is None:
        raise ModelLoadError(
            f"teacher checkpoint {source} has neither an lm_head.weight nor an embed_tokens.weight "
            "tensor: it is not a causal LM checkpoint"
        )
    bias = _find(names, "lm_head.bias") if weight.endswith("lm_head.weight") else None
    n = provenance["tokenizer_size"]
    want = (provenance["logits_size"], provenance["hidden_size"])
    out = []
    for name in filter(None, (weight, bias)):
        with safe_open(path_of(names[name]), framework="pt", device=str(device)) as f:
            part = f.get_slice(name)
            if name == weight and tuple(part.get_shape()) != want:
                field = "logits_size" if part.get_shape()[0] != want[0] else "hidden_size"
                raise CacheMismatchError(
                    f"distill.teacher_head={source}: {name} has shape {tuple(part.get_shape())} but the cache's "
                    f"teacher has (logits_size, hidden_size) = {want} ({field} differs): point it at the cache's "
                    f"teacher {provenance['teacher']}, or recreate the cache with this one"
                )
            # Only the first tokenizer_size rows, as Stage 1 sliced the logits: padded rows are never tokens, and a
            # row slice of the memory map reads just those bytes (no full copy to cut down afterwards).
            t = part[:n]
        out.append(t.to(dtype or t.dtype).contiguous())
    return out[0], (out[1] if bias else None)
