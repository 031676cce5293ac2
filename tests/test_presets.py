"""Every preset in params/ through the real code: Stage 1 and a few Stage 2 steps (and the teacher SFT where the
preset has one) with random-weight models built from the shipped config.json files - shrunk to 1 layer x 64
wide, but with the real vocabularies (152,064 / 151,936 logit columns) and a tokenizer of the real size
(151,665 tokens for Qwen2.5, 151,669 for Qwen3). Only paths and step counts are overridden. The cross-tokenizer
preset runs its Stage 1 the same way, on the teacher's own tokenizer (Llama 3: 128,256 tokens).

Padded vocabulary: the teachers' and students' padded lm_head rows are set so that they would win every
softmax; Stage 1 must never store such an id and Stage 2 must put no probability on them.
"""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    PreTrainedTokenizerFast,
)

from bench.reference import reference_loss
from cache.reader import open_cache
from pipeline.config.params import load_config
from pipeline.data.records import ALPACA_TEMPLATE
from pipeline.data.task import generate_examples
from pipeline.data.tiny import CHAT_TEMPLATE, build_tokenizer
from pipeline.distill import train as distill
from pipeline.distill.batches import cache_fields, collate, curves_path
from pipeline.distill.model import DistillModel
from pipeline.distill.student import load_student
from pipeline.losses.ot import init_projection
from pipeline.models import ModelLoadError, check_vocab, load_tokenizer
from pipeline.planning.plan import MODELS_DIR
from pipeline.teacher import cache_teacher as teacher_cache
from pipeline.teacher import finetune
from tests.conftest import ROOT

# Qwen2.5's 22 added tokens (ids 151,643-151,664); Qwen3 appends 4 more (151,665-151,668).
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN3_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
REGULAR = 151643  # Qwen's byte-level BPE entries before the added tokens
PRESETS = {  # preset -> (teacher, student) as named in it (the teacher SFT preset starts from finetune.base)
    "qwen2.5-7b_to_1.5b": ("Qwen/Qwen2.5-7B", "unsloth/Qwen2.5-1.5B-bnb-4bit"),
    "qwen3-4b_to_0.6b": ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B"),
    "qwen2.5-3b-instruct_sft_to_0.5b-instruct": ("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
}
CROSS_PRESETS = {  # distill.cross_tokenizer: the teacher and the student each have their own tokenizer
    "llama3.1-8b-instruct_to_qwen2.5-1.5b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
}
# Llama 3.1's tokenizer: 128,000 byte-level BPE entries, then 256 special tokens (128,000-128,255) = its 128,256 logits
LLAMA_REGULAR = 128000
LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA_SPECIALS))]
# Llama 3.1's chat template without its tool and date system block: the header tokens around each role
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def padded_bpe(texts: list[str], out: Path, regular: int, filler: str = "zzfill") -> Tokenizer:
    """A byte-level BPE learnt on `texts` (short sequences) without its special tokens, padded with unreachable
    filler entries (`filler` + number) to `regular` entries."""
    small = json.loads(build_tokenizer(texts, out / "small", 400).backend_tokenizer.to_str())
    specials = {t["content"] for t in small["added_tokens"]}
    vocab = {
        tok: i
        for i, (tok, _) in enumerate(
            sorted(((t, i) for t, i in small["model"]["vocab"].items() if t not in specials), key=lambda x: x[1])
        )
    }
    vocab.update({f"{filler}{i}": i for i in range(len(vocab), regular)})  # no merge ever builds these
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in small["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    base = Tokenizer.from_str(json.dumps(small))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = base.normalizer, base.pre_tokenizer, base.decoder
    return tok


def qwen_sized_tokenizer(texts: list[str], out: Path, qwen3: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE learnt on `texts` (short sequences), padded with unreachable filler entries to Qwen's
    151,643 regular tokens, then Qwen's added tokens at their real ids: len() is 151,665 (Qwen3: 151,669)."""
    tok = padded_bpe(texts, out, REGULAR)
    tok.add_special_tokens(QWEN_SPECIALS + (QWEN3_EXTRA if qwen3 else []))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIALS[1:3],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    assert len(hf) == REGULAR + len(QWEN_SPECIALS) + (4 if qwen3 else 0)
    return hf


def llama_sized_tokenizer(texts: list[str], out: Path) -> PreTrainedTokenizerFast:
    """Like qwen_sized_tokenizer, with Llama 3.1's 128,000 regular entries, its 256 special tokens at their real
    ids (len() = 128,256 = its logits: no padded columns), BOS and end-of-turn EOS, no pad token. Its fillers are
    not Qwen's: only the learnt entries have an identical string in qwen_sized_tokenizer."""
    tok = padded_bpe(texts, out, LLAMA_REGULAR, "yyllama")
    tok.add_special_tokens(LLAMA_SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", clean_up_tokenization_spaces=False
    )
    hf.chat_template = LLAMA_CHAT_TEMPLATE
    assert len(hf) == 128256 and hf.convert_tokens_to_ids("<|eot_id|>") == 128009
    return hf


def shrunk(name: str) -> AutoConfig:
    """The shipped config.json of `name`, 1 layer x 64 wide (2 heads, 1 KV head, head_dim 32); vocabulary,
    tying, biases and the rest unchanged."""
    cfg = json.loads((MODELS_DIR / name.replace("/", "--") / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        max_window_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    if "head_dim" in cfg:
        cfg["head_dim"] = 32
    return AutoConfig.for_model(**cfg)


def trap(weight: torch.Tensor, start: int, gen: torch.Generator) -> None:
    """Rows >= start (padding, not tokens) become +-100 x random unit directions: for any hidden state one of
    them has a logit of ~100 |h . u|, far above every real token's."""
    n, d = weight.shape[0] - start, weight.shape[1]
    u = torch.randn((n + 1) // 2, d, generator=gen)
    u = 100 * u / u.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        weight[start:] = torch.cat([u, -u])[:n].to(weight.dtype)


def build(name: str, tok, out: Path, seed: int, prequantize: bool = False) -> Path:
    """A random-init shrunk `name` with trapped padding rows, saved like its hub checkpoint (NF4 if it is one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(shrunk(name))
    trap(model.get_output_embeddings().weight, len(tok), gen)
    eos = tok.eos_token_id
    model.generation_config.update(eos_token_id=eos, pad_token_id=eos, bos_token_id=None, do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if prequantize:  # like unsloth/Qwen2.5-1.5B-bnb-4bit: the NF4 weights and quantization_config on disk
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        AutoModelForCausalLM.from_pretrained(out, quantization_config=q, device_map={"": "cpu"}).save_pretrained(out)
    return out


def write_task(tmp: Path, n: int) -> list[str]:
    """`n` examples of the embedded task as <tmp>/data.jsonl; returns their rendered texts (to train tokenizers on)."""
    records = generate_examples(n, 0, 4)
    (tmp / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return [ALPACA_TEMPLATE.format(**r) + r["output"] for r in records]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, the two tokenizers and every preset's teacher and student, built once."""
    tmp = tmp_path_factory.mktemp("presets")
    texts = write_task(tmp, 80)
    toks = {q3: qwen_sized_tokenizer(texts, tmp / f"tok{int(q3)}", q3) for q3 in (False, True)}
    models_ = {}
    for i, (preset, (teacher, student)) in enumerate(PRESETS.items()):
        tok = toks["qwen3" in preset]
        models_[preset] = (
            build(teacher, tok, tmp / preset / "teacher_base", 2 * i),
            build(student, tok, tmp / preset / "student_base", 2 * i + 1, "bnb-4bit" in student),
        )
    return tmp, toks, models_


def preset_config(world, preset: str):
    """The preset with its paths (data, models, artifacts) and sizes (steps, workers) pointed at the test's."""
    tmp, _, built = world
    teacher, student = built[preset]
    out = tmp / preset / "run"
    sets = {
        "data.path": tmp / "data.jsonl",
        "distill.student": student,
        "distill.max_steps": 3,
        "distill.num_workers": 0,
        "distill.logging_steps": 1,
        "distill.save_steps": 0,
        "distill.cache": out / "cache",
        "distill.out": out / "student",
        "distill.plots": out / "plots",
        "cache.out": out / "cache",
    }
    if "sft" in preset:  # Stage 1 caches the SFT output
        sets.update(
            {
                "finetune.base": teacher,
                "finetune.out": out / "teacher",
                "cache.teacher": out / "teacher",
                "finetune.metrics": out / "teacher.json",
                "finetune.eval_examples": 4,
            }
        )
    else:
        sets["cache.teacher"] = teacher
    return load_config(ROOT / f"params/{preset}.yaml", [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_runs_stage1_and_stage2_at_the_real_vocabulary(world, preset):
    toks = world[1]
    cfg = preset_config(world, preset)
    tok = toks["qwen3" in preset]
    if "sft" in preset:
        metrics = finetune.run(cfg)  # LoRA SFT + merge_and_unload -> a plain checkpoint Stage 1 loads
        assert 0.0 <= metrics["teacher_accuracy"] <= 1.0 and (Path(cfg.finetune.out) / "config.json").exists()
    teacher_cache.run(cfg)

    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    V, logits = len(tok), AutoConfig.from_pretrained(cfg.cache.teacher).vocab_size
    assert (c.provenance["tokenizer_size"], c.provenance["logits_size"]) == (V, logits) and logits > V
    assert c.k == cfg.cache.k == 64 and c.has_hidden == (cfg.cache.hidden_codec != "none")
    teacher = AutoModelForCausalLM.from_pretrained(cfg.cache.teacher, dtype=torch.float32).eval()
    for i in range(len(c)):
        s = c.read(i)
        assert (s["topk_ids"] < V).all()  # never a padded column ...
        mass = np.exp(s["topk_logprobs"].astype(np.float64)).sum(-1) + np.exp(s["tail_logmass"])
        np.testing.assert_allclose(mass, 1.0, atol=0.02)  # ... and all the mass over the real tokens
    with torch.no_grad():  # ... although the padded columns win the full-width softmax: the trap is live
        full = teacher(input_ids=torch.as_tensor(c.read(0)["input_ids"], dtype=torch.long)[None]).logits[0]
    assert (full.argmax(-1) >= V).all()

    metrics = distill.run(cfg)
    assert metrics["steps"] == 3 and np.isfinite(metrics["train_loss"])
    rows = [r for r in __import__("csv").DictReader(curves_path(cfg.distill).open(), delimiter="\t")]
    # a random student's CE over V real tokens is ~log V = 12; a padded column's logit (~100+) would dominate it
    assert all(float(r["ce"]) < 2 * np.log(V) for r in rows)
    if cfg.distill.w_kl:
        assert all(float(r["kl"]) < 2 * np.log(V) for r in rows)
    out = Path(cfg.distill.out)
    assert (out / ("adapter_config.json" if cfg.distill.mode == "lora" else "model.safetensors")).exists()


def test_every_preset_is_tested_here():
    """A preset added to params/ must be named in PRESETS (run end to end above) or CROSS_PRESETS."""
    assert set(PRESETS) | set(CROSS_PRESETS) == {p.stem for p in (ROOT / "params").glob("*.yaml")} - {"dvc"}


@pytest.mark.parametrize("preset", list(PRESETS) + list(CROSS_PRESETS))
def test_preset_models_are_shipped_and_their_vocabularies_match_its_mode(preset):
    """The teacher and student a preset names have shipped configs; their logits widths agree up to Qwen's padding
    (one tokenizer) exactly when the preset is not cross-tokenizer."""
    cfg = load_config(ROOT / f"params/{preset}.yaml")
    teacher, student = {**PRESETS, **CROSS_PRESETS}[preset]
    assert (cfg.finetune.base if "sft" in preset else cfg.cache.teacher, cfg.distill.student) == (teacher, student)
    assert cfg.evaluate.models["student_base"] == student
    assert cfg.distill.cross_tokenizer == (preset in CROSS_PRESETS)
    vocab = [
        json.loads((MODELS_DIR / n.replace("/", "--") / "config.json").read_text())["vocab_size"]
        for n in (teacher, student)
    ]
    assert (abs(vocab[0] - vocab[1]) > 512) == cfg.distill.cross_tokenizer, vocab


CROSS = "llama3.1-8b-instruct_to_qwen2.5-1.5b-instruct"


@pytest.fixture(scope="module")
def cross_world(tmp_path_factory):
    """The cross-tokenizer preset's teacher on a Llama-3.1-sized tokenizer and student on a Qwen2.5-sized one."""
    tmp = tmp_path_factory.mktemp("cross")
    texts = write_task(tmp, 40)
    teacher, student = CROSS_PRESETS[CROSS]
    llama, qwen = llama_sized_tokenizer(texts, tmp / "tok_llama"), qwen_sized_tokenizer(texts, tmp / "tok_qwen", False)
    return (
        tmp,
        None,
        {CROSS: (build(teacher, llama, tmp / "teacher_base", 8), build(student, qwen, tmp / "student_base", 9))},
    )


@pytest.mark.slow
def test_cross_tokenizer_preset_runs_stage1_and_stage2_on_each_sides_tokenizer(cross_world):
    """The Llama 3.1 -> Qwen2.5 preset. Stage 1: the teacher's top-k over its own 128,256 ids (no padded columns),
    all the mass on real tokens, on sequences of its own tokenizer and chat template (BOS, header tokens, EOT).
    Stage 2: three steps of the 4-bit student on its own 151,665-token tokenizer against that cache."""
    cfg = preset_config(cross_world, CROSS)
    assert cfg.distill.cross_tokenizer and cfg.data.template == "chat"
    teacher_cache.run(cfg)
    c = open_cache(Path(cfg.cache.out) / "train.zarr")
    tok = load_tokenizer(cfg.cache.teacher)
    assert (c.provenance["tokenizer_size"], c.provenance["logits_size"], len(tok)) == (128256, 128256, 128256)
    assert c.k == cfg.cache.k == 64 and c.has_hidden and c.provenance["template"] == "chat"
    header, eot = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|eot_id|>"])
    for i in range(len(c)):
        s = c.read(i)
        ids = list(s["input_ids"])
        assert ids[0] == tok.bos_token_id == 128000 and header in ids and ids[-1] == eot == 128009
        assert (s["topk_ids"] < 128256).all()
        mass = np.exp(s["topk_logprobs"].astype(np.float64)).sum(-1) + np.exp(s["tail_logmass"])
        np.testing.assert_allclose(mass, 1.0, atol=0.02)

    metrics = distill.run(cfg)
    assert metrics["steps"] == 3 and np.isfinite(metrics["train_loss"])
    V = len(load_tokenizer(cfg.distill.student))
    assert V == 151665
    rows = [r for r in __import__("csv").DictReader(curves_path(cfg.distill).open(), delimiter="\t")]
    assert all(float(r["ce"]) < 2 * np.log(V) and float(r["kl"]) < 2 * np.log(V) for r in rows)
    assert all(np.isfinite(float(r[x])) for r in rows for x in ("ot_hidden", "ot_logits"))
    assert (Path(cfg.distill.out) / "adapter_config.json").exists()


def test_student_losses_ignore_padded_columns(world):
    """The 4-bit student of the 7B preset (151,936 columns, 151,665 tokens), every loss term on: the same loss
    and gradients whether its padded lm_head rows win every softmax or lose it, fused and full-logits paths."""
    toks = world[1]
    cfg = preset_config(world, "qwen2.5-7b_to_1.5b")
    cache = Path(cfg.cache.out) / "train.zarr"
    if not cache.exists():
        teacher_cache.run(copy.deepcopy(cfg))
    tok, d = toks[False], cfg.distill
    c = open_cache(cache)
    batch = collate(c.read_many(range(0, len(c), max(1, len(c) // 4)), cache_fields(d)), tok.pad_token_id)
    P0 = init_projection(
        c.provenance["hidden_size"], AutoConfig.from_pretrained(d.student).hidden_size, torch.Generator().manual_seed(0)
    )
    model = DistillModel(load_student(d), d, len(tok), P0)
    emb = model.student.get_output_embeddings().weight  # tied: the embedding matrix, fp32 after k-bit preparation
    assert emb.shape[0] == 151936 and not emb.requires_grad
    got = {}
    for fused in (True, False):
        for sign in (1, -1):
            with torch.no_grad():
                emb[len(tok) :] = sign * emb[len(tok) :].abs()  # +: padded columns would take all the mass
            model.zero_grad()
            loss, logs = model(batch) if fused else reference_loss(model, batch)
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            got[fused, sign] = (loss.detach(), logs, grads)
    assert set(got[True, 1][1]) >= {"ce", "kl", "ot_hidden", "ot_logits"}
    for fused in (True, False):
        (l1, logs1, g1), (l0, logs0, g0) = got[fused, 1], got[fused, -1]
        torch.testing.assert_close(l1, l0)
        for k in logs0:
            torch.testing.assert_close(logs1[k], logs0[k])
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b)
    assert got[True, 1][1]["ce"] < 2 * np.log(len(tok))


def test_a_model_narrower_than_its_tokenizer_is_refused(world, tmp_path):
    built = world[2]
    check_vocab(152064, 151665, "teacher")  # padded: fine
    with pytest.raises(ModelLoadError, match="151000 logit columns but its tokenizer has 151665 tokens"):
        check_vocab(151000, 151665, "teacher")
    narrow = tmp_path / "narrow"
    shutil.copytree(built["qwen2.5-7b_to_1.5b"][0], narrow)
    cfg = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**cfg, "vocab_size": 151000}))
    run = preset_config(world, "qwen2.5-7b_to_1.5b")
    run.cache.teacher, run.cache.out = str(narrow), str(tmp_path / "cache")
    with pytest.raises(ModelLoadError, match="logit columns"):
        teacher_cache.run(run)
    assert load_tokenizer(str(narrow)).pad_token == "<|endoftext|>"


def test_prequantized_checkpoint_loads_as_is_and_trains_only_as_qlora(world):
    """unsloth-style NF4 checkpoint: evaluation loads it with load_in_bits=16 (its own quantization_config
    applies); Stage 2 refuses to treat it as a 16-bit model."""
    from pipeline.models import load_causal_lm

    cfg = preset_config(world, "qwen2.5-7b_to_1.5b")
    assert load_causal_lm(cfg.distill.student, "fp32", 16).is_loaded_in_4bit
    cfg.distill.load_in_bits = 16
    with pytest.raises(ValueError, match="pre-quantised 4-bit checkpoint"):
        load_student(cfg.distill)
