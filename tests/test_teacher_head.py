"""pipeline/distill/head.py: the teacher's lm_head read alone from a checkpoint, checked against a cache's provenance.

Tiny Qwen2 checkpoints (96 logit rows for a 90-token "tokenizer", as Qwen2.5 pads its logits) saved in several
shards, so that reading only the head's shard, the row slicing and the tied/biased/prefixed variants are real.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from cache.errors import CacheMismatchError
from pipeline.distill import head
from pipeline.distill.head import INDEX, load_teacher_head
from pipeline.models import ModelLoadError, model_hash

V_LOGITS, V_TOK, D = 96, 90, 32


def build(out: Path, tied: bool, shard: str | None = "8KB") -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=V_LOGITS,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1 if tied else 0)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return model


def provenance(path: Path, **kw) -> dict:
    """As cache_teacher.run builds it (the fields load_teacher_head reads), with a 90-token tokenizer."""
    cfg = json.loads((path / "config.json").read_text())
    return {
        "teacher": str(path),
        "teacher_hash": model_hash(str(path)),
        "tokenizer_size": V_TOK,
        "logits_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        **kw,
    }


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("untied")
    return path, build(path, tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied")
    return path, build(path, tied=True, shard=None)  # one model.safetensors, no index


@pytest.fixture
def reads(monkeypatch):
    """Every tensor name head.py reads through safe_open (get_tensor or get_slice)."""
    names, real = [], head.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            names.append(name)
            return self.f.get_tensor(name)

        def get_slice(self, name):
            names.append(name)
            return self.f.get_slice(name)

        def __getattr__(self, attr):  # keys(), metadata(): the header only
            return getattr(self.f, attr)

    monkeypatch.setattr(head, "safe_open", Recording)
    return names


def test_reads_only_the_head_rows(untied, tmp_path, reads):
    src, model = untied
    path = Path(shutil.copytree(src, tmp_path / "teacher"))
    index = json.loads((path / INDEX).read_text())["weight_map"]
    assert len(set(index.values())) > 2, "the tiny checkpoint must be sharded"
    prov = provenance(path)
    # Every other shard becomes garbage of the same size (model_hash sees names and sizes only): still loads.
    for f in path.glob("*.safetensors"):
        if f.name != index["lm_head.weight"]:
            f.write_bytes(os.urandom(f.stat().st_size))
    assert model_hash(str(path)) == prov["teacher_hash"]
    w, b = load_teacher_head(str(path), prov)
    assert reads == ["lm_head.weight"] and b is None
    assert w.shape == (V_TOK, D) and w.is_contiguous() and w.dtype == model.lm_head.weight.dtype
    assert torch.equal(w, model.lm_head.weight.detach()[:V_TOK])
    w16, _ = load_teacher_head(str(path), prov, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert w16.dtype == torch.bfloat16 and torch.equal(w16, w.bfloat16())


def test_tied_embeddings(tied, reads):
    path, model = tied
    assert not (path / INDEX).exists()
    w, b = load_teacher_head(str(path), provenance(path))
    assert reads == ["model.embed_tokens.weight"] and b is None
    assert torch.equal(w, model.model.embed_tokens.weight.detach()[:V_TOK])


def test_prefixed_names_and_bias(untied, tmp_path, reads):
    """A hand-written checkpoint whose names carry a prefix and whose head has a bias: both come back sliced."""
    src, _ = untied
    path = tmp_path / "biased"
    path.mkdir()
    shutil.copy(src / "config.json", path)
    g = torch.Generator().manual_seed(3)
    t = {
        "language_model.lm_head.weight": torch.randn(V_LOGITS, D, generator=g),
        "language_model.lm_head.bias": torch.randn(V_LOGITS, generator=g),
        "language_model.model.embed_tokens.weight": torch.randn(V_LOGITS, D, generator=g),
    }
    save_file(t, str(path / "model.safetensors"))
    w, b = load_teacher_head(str(path), provenance(path))
    assert sorted(reads) == ["language_model.lm_head.bias", "language_model.lm_head.weight"]
    assert torch.equal(w, t["language_model.lm_head.weight"][:V_TOK])
    assert torch.equal(b, t["language_model.lm_head.bias"][:V_TOK]) and b.is_contiguous()


def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_mismatches(untied, tied):
    path, _ = untied
    with pytest.raises(CacheMismatchError) as e:  # another checkpoint than the cache's teacher
        load_teacher_head(str(path), provenance(tied[0]))
    one_line(e, "teacher_hash", str(path), str(tied[0]))
    with pytest.raises(CacheMismatchError) as e:
        load_teacher_head(str(path), provenance(path, logits_size=V_LOGITS + 4))
    one_line(e, "logits_size", str(V_LOGITS), str(V_LOGITS + 4))
    with pytest.raises(CacheMismatchError) as e:
        load_teacher_head(str(path), provenance(path, hidden_size=2 * D))
    one_line(e, "hidden_size", str(2 * D))


def test_missing_weights(untied, tmp_path):
    src, _ = untied
    empty = tmp_path / "config_only"
    empty.mkdir()
    shutil.copy(src / "config.json", empty)
    with pytest.raises(ModelLoadError) as e:
        load_teacher_head(str(empty), provenance(empty))
    one_line(e, "no safetensors", str(empty))
    broken = Path(shutil.copytree(src, tmp_path / "broken"))
    shard = json.loads((broken / INDEX).read_text())["weight_map"]["lm_head.weight"]
    (broken / shard).unlink()
    with pytest.raises(ModelLoadError) as e:
        load_teacher_head(str(broken), provenance(broken))
    one_line(e, shard, "missing")
    with pytest.raises(ModelLoadError) as e:
        load_teacher_head(str(tmp_path / "nowhere"), provenance(src))
    one_line(e, "does not exist")


@pytest.mark.parametrize("sharded", [True, False])
def test_hub_name_fetches_only_the_heads_file(untied, tied, monkeypatch, reads, sharded):
    """A hub name: the index and the head's shard only (hf_hub_download faked with a local folder, no hub here)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    import pipeline.models

    path, model = untied if sharded else tied
    fetched = []

    def fake_download(repo_id, filename, **kw):
        assert repo_id == "someone/teacher"
        fetched.append(filename)
        if not (path / filename).is_file():
            raise LocalEntryNotFoundError(f"{filename} is not in the cache")
        return str(path / filename)

    prov = provenance(path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(pipeline.models, "_hub_unreachable", lambda: None)
    monkeypatch.setattr(head, "model_hash", lambda source: prov["teacher_hash"])
    w, _ = load_teacher_head("someone/teacher", prov)
    if sharded:
        assert fetched == [INDEX, json.loads((path / INDEX).read_text())["weight_map"]["lm_head.weight"]]
        assert torch.equal(w, model.lm_head.weight.detach()[:V_TOK])
    else:
        assert fetched == [INDEX, "model.safetensors"]
        assert torch.equal(w, model.model.embed_tokens.weight.detach()[:V_TOK])


def test_unknown_hub_name_is_one_line():
    with pytest.raises(ModelLoadError) as e:
        load_teacher_head("nobody-xyz/no-such-teacher", {"teacher_hash": "0"})
    one_line(e, "nobody-xyz/no-such-teacher")
