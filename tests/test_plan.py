"""The VRAM planner (pipeline/planning/plan.py, pipeline/planning/memory.py) against ground truth.

References: parameter counts of models built by transformers on the meta device (exact) and the model cards'
published counts; memory measured on the CPU in fresh processes (tests/memprobe.py: peak resident set of one
step, or growth of anonymous memory) within +-15%; tensors saved for the backward (autograd's saved-tensor
hooks) for the activation formula. Measurements use fp32 (a = 4): the formulas take the dtype width.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline.config.params import load_config
from pipeline.planning import memory as mm
from pipeline.planning import plan
from tests import memprobe
from tests.conftest import ROOT

TOL = 0.15
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHIPPED = sorted(p.parent for p in plan.MODELS_DIR.glob("*/config.json"))
PRESETS = sorted(p for p in ROOT.glob("params/*.yaml") if p.name != "dvc.yaml")
# Model cards: "Number of Parameters" and "(Non-Embedding)", in billions, as printed (they round 7.6156 to 7.61);
# None where the card prints no non-embedding count. Llama 3.2's card: "1B (1.23B)"; SmolLM2's: "1.7B"; Llama 3.1's:
# "8B".
CARDS = {
    "Qwen/Qwen2.5-7B": ("7.61", "6.53"),
    "Qwen/Qwen2.5-1.5B": ("1.54", "1.31"),
    "Qwen/Qwen2.5-1.5B-Instruct": ("1.54", "1.31"),
    "meta-llama/Llama-3.1-8B-Instruct": ("8", None),
    "unsloth/Qwen2.5-1.5B-bnb-4bit": ("1.54", "1.31"),
    "Qwen/Qwen2.5-3B-Instruct": ("3.09", "2.77"),
    "Qwen/Qwen2.5-0.5B-Instruct": ("0.49", "0.36"),
    "Qwen/Qwen3-4B": ("4.0", "3.6"),
    "Qwen/Qwen3-0.6B": ("0.6", "0.44"),
    "meta-llama/Llama-3.2-1B": ("1.23", None),
    "HuggingFaceTB/SmolLM2-1.7B": ("1.7", None),
}
# Exact totals of the shipped Llama-family configs (= the meta-device model's count, checked below): the planner's
# Llama support must not drift from these published architectures.
LLAMA_PARAMS = {
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "HuggingFaceTB/SmolLM2-1.7B": 1_711_376_384,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
}


def name_of(folder) -> str:
    return folder.name.replace("--", "/")


def near(formula: float, measured: float, what: str):
    assert measured > 0 and abs(formula / measured - 1) <= TOL, (
        f"{what}: formula {formula / 1e6:.2f} MB, measured {measured / 1e6:.2f} MB ({formula / measured - 1:+.1%})"
    )


@pytest.mark.parametrize("folder", SHIPPED, ids=name_of)
def test_parameter_counts_equal_a_model_built_on_meta(folder):
    """Total, per-tensor, quantisable (decoder projections) and LoRA counts, exactly."""
    arch = mm.Arch.from_config(json.loads((folder / "config.json").read_text()), name_of(folder))
    cfg = AutoConfig.from_pretrained(folder)
    cfg.quantization_config = None  # the architecture, not bitsandbytes' loading path
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        params = list(model.parameters())  # a tied embedding is one parameter
        assert arch.params == sum(p.numel() for p in params)
        assert sorted(arch.tensor_sizes()) == sorted(p.numel() for p in params)
        assert arch.linear_weights == sum(
            m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
        )
        lora = get_peft_model(model, LoraConfig(r=16, target_modules=ALL[:4] + ["down_proj"]))
        assert sum(mm.lora_sizes(arch, 16, ALL[:4] + ["down_proj"])) == sum(
            p.numel() for p in lora.parameters() if p.requires_grad
        )
    assert arch.vocab == cfg.vocab_size and arch.prequantized == (4 if "bnb-4bit" in folder.name else 16)
    assert LLAMA_PARAMS.get(arch.name, arch.params) == arch.params


def test_the_llama_family_is_shipped():
    assert set(LLAMA_PARAMS) <= {name_of(f) for f in SHIPPED}


@pytest.mark.parametrize(
    "model_type, attention_bias, mlp_bias",
    [
        ("qwen2", True, False),
        ("qwen3", True, False),
        ("llama", True, False),
        ("llama", False, True),
        ("llama", True, True),
    ],
)
def test_bias_flags_follow_transformers(model_type, attention_bias, mlp_bias):
    """Which projections have a bias: Qwen2 q/k/v always (attention_bias ignored), Qwen3 and Llama all four
    attention projections with attention_bias, Llama's MLP with mlp_bias (Qwen's MLPs never)."""
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=False,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
    )
    arch = mm.Arch.from_config({**cfg.to_dict(), "model_type": model_type}, model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sorted(arch.tensor_sizes()) == sorted(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    biased = {
        n.split(".")[-1] for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
    }
    assert biased == {n for n, (_, _, b) in arch.linears().items() if b}


@pytest.mark.parametrize("folder", SHIPPED, ids=name_of)
def test_shipped_configs_give_the_model_cards_counts(folder):
    arch = mm.Arch.from_config(json.loads((folder / "config.json").read_text()), name_of(folder))
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    for card, count in zip(CARDS[arch.name], (arch.params, arch.params - embeddings)):
        if card is None:
            continue
        unit = 10.0 ** -len((card.split(".") + [""])[1])  # "8" (B): to the unit
        assert abs(count / 1e9 - float(card)) <= unit, (card, count)  # to the card's last printed digit


def test_constants_follow_the_fused_loss():
    from pipeline.losses.chunked import CHUNK_ELEMS, SLICE, default_chunk_rows

    assert (mm.FUSED_SLICE, mm.FUSED_CHUNK_ELEMS) == (SLICE, CHUNK_ELEMS)
    assert all(mm.fused_chunk_rows(v) == default_chunk_rows(v) for v in (389, 32768, 151936, 152064))


# ---------------------------------------------------------------------------------------------------------
# Formulas against measured CPU memory
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bf16 Qwen2 checkpoint whose projections dominate its weights (NF4 must show), saved once."""
    path = tmp_path_factory.mktemp("plan") / "m"
    cfg = Qwen2Config(
        vocab_size=2048,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def test_weights_lora_gradients_and_optimizer_states(checkpoint):
    """Stage 2's QLoRA student on the CPU: bf16 checkpoint loaded as fp32 (16-bit formula), NF4 + fp32 rest after
    prepare_model_for_kbit_training, LoRA r=64 on every projection, its gradients, both optimizers' states."""
    arch = mm.Arch.from_config(json.loads((checkpoint / "config.json").read_text()), "m")
    sizes = mm.lora_sizes(arch, 64, ALL)
    m = memprobe.run("student", path=str(checkpoint), r=64, targets=ALL, optims=["adamw_torch", "adamw_8bit"])
    assert m["n_lora"] == sum(sizes)
    near(mm.weight_bytes(arch, 16, 4, False), m["weights16"], "fp32 weights")
    near(mm.weight_bytes(arch, 4, 4, True), m["weights"], "NF4 weights + fp32 embeddings/norms")
    near(4 * sum(sizes), m["lora"], "LoRA adapters")
    near(4 * sum(sizes), m["grads"], "LoRA gradients")
    for optim in ("adamw_torch", "adamw_8bit"):
        near(mm.optimizer_bytes(sizes, 4, optim), m[optim], f"{optim} states")


@pytest.mark.parametrize(
    "R, V, w_ce, w_kl",
    [
        (1024, 32768, 1.0, 1.0),  # one chunk: logits + gradient + a 128-row temporary
        (4096, 32768, 1.0, 1.0),  # two chunks: a chunk's buffers are freed before the next chunk's
        (300, 151936, 0.0, 1.0),  # the real vocabulary, KL only
    ],
)
def test_fused_loss_peak(R, V, w_ce, w_kl):
    measured = memprobe.run("fused", R=R, d=64, V=V, w_ce=w_ce, w_kl=w_kl)["peak"]
    near(mm.fused_loss_bytes(R, V, V, 64, 4, w_ce, w_kl, False), measured, "fused CE+KL")


@pytest.mark.parametrize(
    "R, V, w_ce, jsd_beta, teacher_dtype",
    [
        (1024, 32768, 1.0, 0.0, "float32"),  # one chunk: two (C, V) buffers + 3 SLICE-row temporaries + teacher rows
        (4096, 32768, 1.0, 0.0, "bfloat16"),  # two chunks, a bf16 teacher head (S x V bf16 matmul outputs)
        (1024, 32768, 1.0, 0.5, "float32"),  # the JSD: a 4th SLICE-row temporary (log m)
        (300, 151936, 0.0, 0.0, "float32"),  # the real vocabulary, KL only
    ],
)
def test_exact_loss_peak(R, V, w_ce, jsd_beta, teacher_dtype):
    """fused_ce_exact_kl (distill.teacher_head): the teacher's head and hidden states are inputs, not measured."""
    measured = memprobe.run("exact", R=R, d=64, D=128, V=V, w_ce=w_ce, jsd_beta=jsd_beta, teacher_dtype=teacher_dtype)[
        "peak"
    ]
    near(mm.exact_loss_bytes(R, V, V, 64, 128, False, bool(jsd_beta)), measured, "fused CE + exact KL")


@pytest.mark.parametrize(
    "B, N, V, k, hidden, logits",
    [
        (2, 512, 4096, 16, True, False),  # B x N x M dominated: Sinkhorn's working set
        (1, 1024, 4096, 16, True, True),  # both terms, B x N x M dominated
        (1, 256, 65536, 64, False, True),  # the vocabulary pass of OT on logits
        (1, 512, 8192, 64, False, True),  # OT on logits' blocks of teacher tokens (distinct ids)
    ],
)
def test_ot_peak(B, N, V, k, hidden, logits):
    measured = memprobe.run("ot", B=B, N=N, V=V, d=64, D=128, k=k, hidden=hidden, logits=logits)["peak"]
    near(mm.ot_bytes(B, N, N, V, k, hidden, logits), measured, "OT")


@pytest.mark.parametrize(
    "R, n, k, d, D",
    [
        (256, 8, 64, 1536, 4096),  # the preset's widths: the teacher rows and their projection dominate
        (2048, 16, 32, 128, 1024),  # many rows, a wider student top-n
    ],
)
def test_token_level_ot_saved_and_peak(R, n, k, d, D):
    m = memprobe.run("tok_ot", R=R, n=n, k=k, d=d, D=D, V=4096)
    saved, work = mm.tok_ot_bytes(R, n, k, d, D)
    near(saved, m["saved"], "token-level OT saved for the backward")
    near(saved + work, m["peak"], "token-level OT forward + backward")


def test_stage1_topk_peak():
    measured = memprobe.run("topk", R=300, D=256, V=151665, V_logits=152064, chunk_rows=256)["peak"]
    near(mm.topk_bytes(300, 151665, 152064, 4, 256), measured, "lm_head + top-k chunk")


@pytest.mark.parametrize("B, L", [(1, 2048), (4, 512)])
def test_stage1_forward_working_set(B, L):
    """One decoder layer's no-grad working set (+ the decoder's output), one long sequence or a padded batch."""
    measured = memprobe.run("forward", B=B, L=L, hidden=512, intermediate=2048, heads=8, kv_heads=2)["peak"]
    arch = mm.Arch.from_config(
        {
            "model_type": "qwen2",
            "hidden_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "intermediate_size": 2048,
            "vocab_size": 512,
        },
        "qwen2",
    )
    near(B * L * (mm.infer_layer_bytes(arch, 4, B > 1, L) + 4 * 512), measured, "Stage 1 forward")


@pytest.mark.parametrize(
    "model_type, mode, B",
    [
        ("qwen2", "full", 2),
        ("qwen2", "lora", 1),
        ("qwen2", "kbit", 2),
        ("qwen3", "full", 1),
        ("qwen3", "lora", 2),
        ("qwen3", "kbit", 1),
        ("llama", "full", 1),
        ("llama", "lora", 2),
        ("llama", "kbit", 2),
    ],
)
def test_saved_activations_per_layer(model_type, mode, B, tmp_path):
    """Bytes a decoder layer saves for the backward (deduplicated storages, parameters excluded), per token.
    kbit = the QLoRA path: NF4 projections, prepare_model_for_kbit_training, bf16 autocast (on the CPU here)."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from pipeline.distill.student import cpu_4bit_guard

    L, r = 128, 16
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64 if model_type == "qwen2" else 32,
        tie_word_embeddings=True,
    )
    arch = mm.Arch.from_config({**cfg.to_dict(), "model_type": model_type}, model_type)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    if mode == "kbit":
        model.save_pretrained(tmp_path)
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map={"": "cpu"})
        model = prepare_model_for_kbit_training(cpu_4bit_guard(model), use_gradient_checkpointing=False)
    if mode != "full":
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=ALL)).get_base_model()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, where = {}, [None]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if where[0] is not None and ptr not in params and not any(ptr in s for s in saved.values()):
            saved.setdefault(where[0], {})[ptr] = t.untyped_storage().nbytes()
        return t

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i))
        layer.register_forward_hook(lambda *_: where.__setitem__(0, None))
    ids = torch.randint(0, 512, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1:, -7:] = 0  # padding in every batch of more than one sequence
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "kbit"),
    ):
        model.model(input_ids=ids, attention_mask=mask)
    measured = sum(saved[1].values()) / (B * L)  # layer 1: what layer 0 shares with it (rotary tables) excluded
    formula = mm.train_layer_bytes(
        arch, 2 if mode == "kbit" else 4, mode == "kbit", None if mode == "full" else tuple(ALL), r, 0.0, B > 1, L
    )
    near(formula, measured, f"{model_type} {mode} layer")


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_fit_on_24_gib_and_the_longest_fit_is_the_edge(preset):
    cfg = load_config(preset)
    p = plan.plan(cfg, 24.0)
    t = mm.Arch.from_config(plan.find_config(plan.teacher_name(cfg)), "t")
    s = mm.Arch.from_config(plan.find_config(cfg.distill.student), "s")
    for name, at, arch in (
        ("stage1", lambda n: plan.stage1(cfg, t, n), t),
        ("stage2", lambda n: plan.stage2(cfg, s, t, n), s),
    ):
        st = p[name]
        assert st["fits"] and st["total_gib"] <= 24 and st["max_seq_len"] >= cfg.data.max_length
        n = st["max_seq_len"]
        assert at(n).total <= 24 * plan.GIB
        assert n + 128 > arch.max_positions or at(n + 128).total > 24 * plan.GIB
        resident = sum(v for k, v in st["gib"].items() if k not in st["transient"] + ["context", "margin"])
        assert st["total_gib"] == pytest.approx(
            resident + st["gib"][st["peak"]] + st["gib"]["context"] + st["gib"]["margin"]
        )


def test_main_case_numbers():
    """Stage 1's bf16 7B weights are exactly 2 bytes per parameter. The NF4 student, recounted here from a model
    built on the meta device: 4.127 bits per weight of the decoder's linear layers (QLoRA's double-quantised
    NF4) and fp32 for everything else (embeddings / tied lm_head, norms, biases after k-bit preparation), plus
    the bf16 copy of the largest projection that bitsandbytes dequantises for each matmul. At
    sequence 2,048 the fused CE + KL chunk is the largest working set (README "Will it fit?")."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = plan.plan(load_config(ROOT / "params/qwen2.5-7b_to_1.5b.yaml"))
    assert p["stage1"]["gib"]["weights"] * plan.GIB == 2 * 7_615_616_512
    cfg = AutoConfig.from_pretrained(plan.MODELS_DIR / "unsloth--Qwen2.5-1.5B-bnb-4bit")
    cfg.quantization_config = None  # build plain: only the shapes matter here
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    other = sum(t.numel() for t in model.parameters()) - linear  # parameters() counts the tied head once
    dequant = max(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    expected = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + 4 * other + 2 * dequant
    assert p["stage2"]["gib"]["weights"] * plan.GIB == pytest.approx(expected, rel=1e-9)
    assert p["stage2"]["peak"] == "loss"


def test_a_llama_pair_is_planned():
    """Llama-3.2-1B teaching itself (the same tokenizer) plans and fits; SmolLM2's 49,152-token vocabulary cannot
    share Llama 3's 128,256-token tokenizer: refused unless distill.cross_tokenizer says they need not."""
    preset = ROOT / "params/qwen3-4b_to_0.6b.yaml"
    llama = ["cache.teacher=meta-llama/Llama-3.2-1B", "distill.student=meta-llama/Llama-3.2-1B"]
    p = plan.plan(load_config(preset, llama), 24.0)
    assert p["stage1"]["fits"] and p["stage2"]["fits"]
    assert p["stage1"]["gib"]["weights"] * plan.GIB == 2 * 1_235_814_400  # bf16, the tied embedding once
    with pytest.raises(ValueError, match="cannot share a tokenizer"):
        plan.plan(load_config(preset, llama[:1] + ["distill.student=HuggingFaceTB/SmolLM2-1.7B"]), 24.0)
    cross = plan.plan(
        load_config(preset, llama[:1] + ["distill.student=HuggingFaceTB/SmolLM2-1.7B", "distill.cross_tokenizer=true"]),
        24.0,
    )
    assert cross["cross_tokenizer"] and cross["vocab"] == {"teacher": 128256, "student": 49152}


CROSS = ROOT / "params/llama3.1-8b-instruct_to_qwen2.5-1.5b-instruct.yaml"


def test_cross_tokenizer_plan_uses_each_sides_vocabulary():
    """Llama-3.1-8B-Instruct -> Qwen2.5-1.5B-Instruct: Stage 1 budgets the teacher's 128,256-wide head and 4,096-wide
    hidden states, Stage 2 the student's 151,936-wide loss chunks; the table says so; the same pair without
    cross_tokenizer is refused."""
    p = plan.plan(load_config(CROSS), 24.0)
    assert p["cross_tokenizer"] and p["vocab"] == {"teacher": 128256, "student": 151936}
    assert p["stage1"]["gib"]["weights"] * plan.GIB == 2 * 8_030_261_248  # bf16, untied lm_head
    tokens, chunk = 8192, 1024  # cache.batch_tokens, cache.chunk_rows
    head = 2 * 2 * 4096 * tokens + chunk * (2 * 128256 + 8 * 128256) + tokens * (12 * 64 + 4)
    assert p["stage1"]["gib"]["head"] * plan.GIB == head and "1,024 x 128,256" in p["stage1"]["labels"]["head"]
    assert "441 rows x 151,936" in p["stage2"]["labels"]["loss"]  # 2^26 // 151,936 rows per fused chunk
    assert "cross-tokenizer" in p["stage2"]["title"]
    assert (
        "cross-tokenizer: Stage 1 on the teacher's vocabulary (128,256 logits), Stage 2 on the student's (151,936)"
    ) in plan.table(p)
    assert "cross-tokenizer:" not in plan.table(plan.plan(load_config(ROOT / "params/qwen2.5-7b_to_1.5b.yaml")))
    with pytest.raises(ValueError, match="cannot share a tokenizer"):
        plan.plan(load_config(CROSS, ["distill.cross_tokenizer=false"]), 24.0)


def test_cross_tokenizer_stage2_terms():
    """What cross-tokenizer distillation adds to Stage 2, counted by hand at sequence 2,048 (2,047 rows, k = 64,
    student d = 1,536, teacher D = 4,096): the mapped top-k ids (as large as the cached ids, in the batch and
    gathered: 2 x 8k B per token) and the alignment (10 B per token); with w_tok_ot, the learned P_e (D x d, fp32,
    with its gradient), Stage 1's teacher embedding rows (at most 128,256 x D fp32, + an int64 index by id), and
    the token-level OT: saved per row its 64 teacher rows (D), their projection (64 x d), 8 normalised student rows
    and the 8 x 64 plan, and five 64 x d gradients in its backward."""
    cfg, same = load_config(CROSS), load_config(CROSS, ["distill.cross_tokenizer=false"])
    t, s = (mm.Arch.from_config(plan.find_config(n), n) for n in (cfg.cache.teacher, cfg.distill.student))
    L, rows, k, d, D = 2048, 2047, 64, 1536, 4096
    cross, one = ({i.key: i.nbytes for i in plan.stage2(c, s, t, L).items} for c in (cfg, same))
    assert cross["batch"] - one["batch"] == L * (2 * 8 * k + 10)
    assert set(cross) == set(one) and all(cross[x] == one[x] for x in cross if x != "batch")
    items = plan.stage2(load_config(CROSS, ["distill.w_tok_ot=0.1"]), s, t, L).items
    with_tok = {i.key: i.nbytes for i in items}
    assert with_tok["teacher_emb"] == 4 * 128256 * D + 8 * 128256
    assert with_tok["tok_ot"] == 4 * rows * (k * D + k * d + 8 * d + 8 * k)
    assert with_tok["tok_ot_work"] == 5 * 4 * rows * k * d
    transient = {i.key for i in items if i.transient}
    assert "tok_ot_work" in transient and not {"tok_ot", "teacher_emb"} & transient  # saved: next to every other
    assert with_tok["trainable"] - cross["trainable"] == with_tok["gradients"] - cross["gradients"] == 4 * D * d
    assert "P_e (6.3 M)" in items[1].label
    # ULD and the token-level OT read the cached top-k even with KL and OT on logits off
    uld = load_config(CROSS, ["distill.w_kl=0", "distill.w_ot_logits=0", "distill.w_uld=0.5"])
    bare = load_config(CROSS, ["distill.w_kl=0", "distill.w_ot_logits=0"])
    sizes = [next(i.nbytes for i in plan.stage2(c, s, t, L).items if i.key == "batch") for c in (uld, bare)]
    assert sizes[0] - sizes[1] == L * (2 * (12 * k + 4) + 2 * 8 * k)


def test_model_configs_are_found_locally_or_shipped(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    assert plan.find_config(str(tmp_path))["hidden_size"] == 8
    assert plan.find_config("Qwen/Qwen2.5-7B")["vocab_size"] == 152064
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen2.5-7B.*pipeline/planning/models/Org--Nope"):
        plan.find_config("Org/Nope")
    # a teacher SFT output that does not exist yet is planned as its base model
    assert (
        plan.teacher_name(load_config(ROOT / "params/qwen2.5-3b-instruct_sft_to_0.5b-instruct.yaml"))
        == "Qwen/Qwen2.5-3B-Instruct"
    )


def run_plan(*args):
    return subprocess.run(
        [sys.executable, "-m", "stages.plan", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_cli_prints_the_table_and_writes_the_metric(tmp_path):
    out = tmp_path / "plan.json"
    p = run_plan(
        "--params", "params/qwen2.5-7b_to_1.5b.yaml", "--max-length", "4096", "--gpu-gb", "16", "--out", str(out)
    )
    assert p.returncode == 0, p.stderr
    assert "Stage 1 - teacher Qwen/Qwen2.5-7B" in p.stdout and "DOES NOT FIT" in p.stdout  # 17.8 GiB > 16
    m = json.loads(out.read_text())
    assert m["seq_len"] == 4096 and m["gpu_gib"] == 16 and not m["stage1"]["fits"] and m["stage2"]["fits"]
    assert set(m["stage2"]["gib"]) >= {"weights", "trainable", "gradients", "optimizer", "activations", "loss", "ot"}
    bad = run_plan("--params", "params/qwen2.5-7b_to_1.5b.yaml", "--set", "distill.student=Org/Nope")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: no config.json for model 'Org/Nope'")


def preset_items(stage: str) -> dict:
    import yaml

    items = yaml.safe_load((ROOT / "params/dvc.yaml").read_text())["stages"][stage]["foreach"]
    return items if isinstance(items, dict) else {k: {} for k in items}


def test_preset_pipeline_matches_the_presets():
    """Every preset is planned, distilled and evaluated; the data file each stage depends on is the preset's."""
    names = {p.stem for p in PRESETS}
    for stage in ("plan", "distill_student", "evaluate"):
        assert set(preset_items(stage)) == names, stage
    cached = {**preset_items("cache_teacher"), **preset_items("cache_finetuned_teacher")}
    assert set(cached) == names and set(preset_items("finetune_teacher")) <= set(
        preset_items("cache_finetuned_teacher")
    )
    for stage in ("cache_teacher", "cache_finetuned_teacher", "finetune_teacher", "evaluate"):
        for name, item in preset_items(stage).items():
            assert item["data"] == load_config(ROOT / f"params/{name}.yaml").data.path, (stage, name)


@pytest.mark.slow
def test_dvc_runs_a_presets_plan_and_only_its_params_rerun_it(tmp_path):
    """`dvc repro params/dvc.yaml:plan@<preset>` in a copy of the repo; distill.lr does not rerun it."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, text=True, capture_output=True, check=True
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and f != "dvc.lock":
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tmp_path / f)
    env_bin = str(__import__("pathlib").Path(sys.executable).parent)
    env = {"PATH": f"{env_bin}:/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(tmp_path)}

    def sh(*cmd):
        p = subprocess.run(cmd, cwd=tmp_path, env=env, text=True, capture_output=True, check=False)
        assert p.returncode == 0, f"{cmd}: {p.stdout[-2000:]}{p.stderr[-2000:]}"
        return p.stdout + p.stderr

    sh("git", "init", "-q")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    stage = "params/dvc.yaml:plan@qwen2.5-7b_to_1.5b"
    assert "Running stage" in sh("dvc", "repro", stage)
    assert json.loads((tmp_path / "artifacts/qwen2.5-7b_to_1.5b/plan.json").read_text())["stage2"]["fits"]
    assert "qwen2.5-7b_to_1.5b/plan.json" in sh("dvc", "metrics", "show")
    preset = tmp_path / "params/qwen2.5-7b_to_1.5b.yaml"
    preset.write_text(preset.read_text().replace("lr: 0.0002", "lr: 0.0001"))
    assert "Running stage" not in sh("dvc", "repro", stage)
    preset.write_text(preset.read_text().replace("batch_size: 1 ", "batch_size: 2 "))
    assert "Running stage" in sh("dvc", "repro", stage)


MAIN = ROOT / "params/qwen2.5-7b_to_1.5b.yaml"


def write_provenance(cache, **prov):
    """A cache's train split as far as the planner reads it: its root zarr.json with the provenance."""
    (cache / "train.zarr").mkdir(parents=True)
    (cache / "train.zarr/zarr.json").write_text(
        json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {"format": "otkd-teacher-cache", "provenance": prov}}
        )
    )


def test_exact_teacher_adds_its_lm_head_to_stage2(tmp_path):
    """distill.teacher_head=Qwen/Qwen2.5-7B on the main preset (7B -> NF4 1.5B, sequence 2,048, w_ot and w_ot_logits
    on): Stage 2 holds the teacher's lm_head, bf16 (its config's torch_dtype), 3,584 wide, with the tokenizer's
    151,665 rows once the cache records them, the logits width 152,064 before (the label says which); the top-k KL's
    chunk gives way to the exact KL's (two C x V fp32 buffers + 3 SLICE-row temporaries + the chunk's teacher rows,
    + the supervised rows' teacher hidden states gathered from the batch); the batch is unchanged (the top-k is
    still read for OT on logits, the hidden states for OT). The total grows by the head's bytes (+ the margin) and
    the loss difference, and still fits 24 GiB."""
    cache = tmp_path / "cache"  # no cache there yet
    base = load_config(MAIN, [f"distill.cache={cache}"])
    exact = load_config(MAIN, [f"distill.cache={cache}", "distill.teacher_head=Qwen/Qwen2.5-7B"])
    t, s = (mm.Arch.from_config(plan.find_config(n), n) for n in (base.cache.teacher, base.distill.student))
    assert t.stored_dtype == "bfloat16" and t.stored_bytes == 2
    L, rows, D, V = 2048, 2047, 3584, 151936
    one, two = ({i.key: i for i in plan.stage2(c, s, t, L).items} for c in (base, exact))
    assert set(two) - set(one) == {"teacher_head"} and not two["teacher_head"].transient
    assert two["teacher_head"].nbytes == 2 * 152064 * D  # 1.09 GB
    assert two["teacher_head"].label == "teacher lm_head (exact KL): 152,064 (config vocab_size) x 3,584, bf16"
    C = 2**26 // V  # 441
    assert two["loss"].nbytes == 8 * C * V + 3 * 4 * 128 * V + 4 * C * D + 4 * rows * 1536 + 4 * rows * D
    assert two["loss"].label == "fused CE + exact KL (441 rows x 151,936 per chunk) + teacher rows"
    assert all(two[k].nbytes == one[k].nbytes for k in one if k != "loss")
    p0, p1 = plan.plan(base, 24.0), plan.plan(exact, 24.0)
    assert p0["stage2"]["peak"] == p1["stage2"]["peak"] == "loss"
    grow = (two["teacher_head"].nbytes + two["loss"].nbytes - one["loss"].nbytes) * (1 + plan.MARGIN) / plan.GIB
    assert p1["stage2"]["total_gib"] - p0["stage2"]["total_gib"] == pytest.approx(grow, rel=1e-9)
    head = two["teacher_head"].nbytes * (1 + plan.MARGIN) / plan.GIB
    assert p1["stage2"]["total_gib"] - p0["stage2"]["total_gib"] == pytest.approx(head, rel=0.15)  # the head dominates
    assert p1["stage2"]["fits"] and p1["stage2"]["total_gib"] < 5 and p1["stage2"]["max_seq_len"] >= L
    assert p1["stage1"] == p0["stage1"]
    table = plan.table(p1)
    assert "  teacher lm_head (exact KL): 152,064 (config vocab_size) x 3,584, bf16" + " " * 10 + "1.02" in table

    # once Stage 1 has run, the head has the tokenizer's rows (pipeline/distill/head.py slices it so)
    write_provenance(cache, tokenizer_size=151665, logits_size=152064, hidden_size=D)
    item = {i.key: i for i in plan.stage2(exact, s, t, L).items}["teacher_head"]
    assert item.nbytes == 2 * 151665 * D == 1_087_134_720
    assert item.label == "teacher lm_head (exact KL): 151,665 (cache's tokenizer size) x 3,584, bf16"
    # the top-k KL has no teacher head, whatever the cache
    assert "teacher_head" not in {i.key for i in plan.stage2(base, s, t, L).items}
    # from a low-rank cache the head is folded into the basis (cache/codecs.py fold): r columns, a float32 bias-sized
    # offset, and the exact KL's teacher rows are r coefficients (the batch carries them beside the hidden states OT
    # decodes)
    low = load_config(
        MAIN, [f"distill.cache={cache}", "distill.teacher_head=Qwen/Qwen2.5-7B", "cache.hidden_codec=fisher:512"]
    )
    three = {i.key: i for i in plan.stage2(low, s, t, L).items}
    assert three["teacher_head"].nbytes == 2 * 151665 * (512 + 1)
    assert (
        three["teacher_head"].label == "teacher lm_head (exact KL) folded: 151,665 (cache's tokenizer size) x 512, bf16"
    )
    assert three["loss"].nbytes == two["loss"].nbytes - 4 * C * (D - 512) - 4 * rows * (D - 512)
    assert three["batch"].nbytes == two["batch"].nbytes + 4 * L * 512


def test_exact_teacher_rows_dtype_and_batch(tmp_path):
    """The head's rows come from a cache of this teacher only; its width from the checkpoint's torch_dtype (fp32: 4
    B); w_kl = 0 leaves the exact teacher off; without OT the batch carries the teacher's hidden states instead of
    the top-k (pipeline/distill/batches.py cache_fields); the JSD holds one more SLICE-row temporary."""
    other = tmp_path / "other"
    write_provenance(other, tokenizer_size=128000, logits_size=128256, hidden_size=4096)  # another teacher's cache
    cfg = load_config(MAIN, [f"distill.cache={other}", "distill.teacher_head=Qwen/Qwen2.5-7B"])
    t, s = (mm.Arch.from_config(plan.find_config(n), n) for n in (cfg.cache.teacher, cfg.distill.student))
    assert plan.cached_tokenizer_size(cfg, t) is None
    (tmp_path / "garbled/train.zarr").mkdir(parents=True)
    (tmp_path / "garbled/train.zarr/zarr.json").write_text("{")
    assert plan.cached_tokenizer_size(load_config(MAIN, [f"distill.cache={tmp_path / 'garbled'}"]), t) is None

    fp32 = tmp_path / "teacher32"
    fp32.mkdir()
    (fp32 / "config.json").write_text(json.dumps({**plan.find_config("Qwen/Qwen2.5-7B"), "torch_dtype": "float32"}))
    cfg32 = load_config(MAIN, [f"distill.cache={other}", f"cache.teacher={fp32}", f"distill.teacher_head={fp32}"])
    t32 = mm.Arch.from_config(plan.find_config(str(fp32)), str(fp32))
    item = {i.key: i for i in plan.stage2(cfg32, s, t32, 2048).items}["teacher_head"]
    assert item.nbytes == 4 * 152064 * 3584 and item.label.endswith("x 3,584, fp32")

    off = load_config(MAIN, [f"distill.cache={other}", "distill.teacher_head=Qwen/Qwen2.5-7B", "distill.w_kl=0"])
    assert "teacher_head" not in {i.key for i in plan.stage2(off, s, t, 2048).items}

    L, k, D = 2048, 64, 3584
    no_ot = [f"distill.cache={other}", "distill.w_ot=0", "distill.w_ot_logits=0"]
    topk, exact = (
        {i.key: i for i in plan.stage2(load_config(MAIN, no_ot + x), s, t, L).items}
        for x in ([], ["distill.teacher_head=Qwen/Qwen2.5-7B"])
    )
    assert exact["batch"].nbytes - topk["batch"].nbytes == L * (4 * D - 2 * (12 * k + 4))
    assert topk["batch"].label.endswith("top-k targets)") and exact["batch"].label.endswith("labels, teacher hidden)")
    jsd = {
        i.key: i
        for i in plan.stage2(
            load_config(MAIN, no_ot + ["distill.teacher_head=Qwen/Qwen2.5-7B", "distill.jsd_beta=0.5"]), s, t, L
        ).items
    }
    assert jsd["loss"].nbytes - exact["loss"].nbytes == 4 * 128 * 151936 and "exact JSD" in jsd["loss"].label
