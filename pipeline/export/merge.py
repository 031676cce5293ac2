"""The trained Stage-2 student as one plain 16-bit transformers model: what to merge into what, and the checks.

How each kind of student becomes plain weights (merged in float32, then rounded once to the export dtype):
- full fine-tuning: the student's own weights.
- LoRA on a 16-bit base: peft's merge_and_unload, W + (alpha / r) B A, into that base.
- LoRA on a 4- or 8-bit base (QLoRA): the same merge into a 16-bit copy of the base. Merging into the quantised
  weights would round the update away (bitsandbytes re-quantises after peft adds it), so the 16-bit copy is either
  the original checkpoint ("original": the weights people deploy, which the adapter corrects up to the
  quantisation error it trained against) or the quantised weights dequantised ("dequantized": exactly the model
  that trained, with NF4's rounding kept). `--quantized-base auto` takes the original when it can be loaded.

Nothing used only for training is carried over: P (projection.pt, tok_projection.pt), checkpoints, the optimizer.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from cache.errors import OtkdError
from pipeline.config.base import load_sections
from pipeline.config.distill import DistillParams
from pipeline.models import ModelLoadError, load_causal_lm, load_pretrained

STAGE2 = "python -m stages.distill_student"
ARCHITECTURE = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
"""The config fields that make two checkpoints the same network shape (an adapter fits only its own)."""
PROBE_SHAPE = (2, 32)
"""(B, N) token ids on which the export's logits are compared with the trained student's."""
TOLERANCE_EPS = 8
"""Tolerance of the logits' relative error (see relative_error) in units of the dtype's machine epsilon. Measured on
the tiny students: 1.1-1.6 eps in bf16 and up to 4.5 eps in float32 (merging reorders the float32 sums), 0.5 eps for
the embedded default's student in bf16, while a lost or misscaled LoRA update, or the untrained student, moves the
logits by a relative 0.1-1 (bf16: 8 eps = 0.06). The merge itself is checked in float32 first (MERGE_SHARE)."""
MERGE_SHARE = 0.01
"""Largest relative error of merged vs unmerged logits (float32) as a share of how far the adapter moves them."""
MAX_WEIGHT_DISTANCE = 0.5
"""Largest relative distance ||W16 - dequant(Wq)|| / ||W16|| accepted between an original 16-bit base and the
quantised weights the adapter trained on: NF4's rounding alone gives ~0.1, an unrelated checkpoint ~1.4."""


class ExportError(OtkdError, ValueError):
    """The student folder, its base or an option cannot make an export; the message says what to change."""


@dataclass
class Merged:
    """The merged model (float32, on the CPU) and where its weights came from."""

    model: torch.nn.Module
    base: str  # the checkpoint the weights come from (the student itself for full fine-tuning)
    source: str  # "student", "16-bit base", "original", "dequantized"
    note: str  # one sentence for the log and the model card
    merge_diff: float | None  # relative error of merged vs unmerged adapter in float32, None for full fine-tuning
    adapter_effect: float | None  # relative difference of the unmerged adapter vs its base alone, float32
    weight_distance: float | None  # original vs quantised base (see MAX_WEIGHT_DISTANCE), else None


# -- the student folder ------------------------------------------------------------------------------------------
def read_student(path: str | Path) -> DistillParams:
    """The Stage-2 config saved with the student, after checking that every file the export needs is there."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"no student folder at {path} — run `{STAGE2}` first")
    saved = path / "config.yaml"
    params = load_sections(DistillParams, saved) if saved.is_file() else None
    lora = params.distill.mode == "lora" if params else (path / "adapter_config.json").exists()
    missing = [] if params else ["config.yaml"]
    weights = ["adapter_config.json", "adapter_model.safetensors"] if lora else ["config.json"]
    missing += [f for f in weights if not (path / f).is_file()]
    if not lora:
        missing += missing_weights(path)
    missing += [f for f in ("tokenizer_config.json",) if not (path / f).is_file()]
    if missing:
        raise ExportError(
            f"incomplete student folder {path}: missing {', '.join(missing)} — rerun `{STAGE2}` (it writes "
            "config.yaml last, after the weights)"
        )
    return params


def missing_weights(path: Path) -> list[str]:
    """A plain checkpoint's weight files that are absent: model.safetensors, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [s for s in shards if not (path / s).is_file()]
    return [] if (path / "model.safetensors").is_file() else ["model.safetensors"]


# -- logits on a fixed batch ------------------------------------------------------------------------------------
def exact_4bit(model):
    """`model` with every bitsandbytes 4-bit layer on its generic path (dequantise, then matmul in the compute
    dtype), the function Stage 2 trained. On AVX512-bf16 CPUs an eval-mode no-grad forward otherwise repacks the
    weights for a kernel that computes in bf16 (measured: 0.01 logit difference on the tiny student in float32)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def probe_ids(n_tokens: int, seed: int = 0) -> torch.Tensor:
    """(B, N) token ids drawn from the tokenizer's ids with a fixed seed: the same batch for every model."""
    return torch.randint(0, n_tokens, PROBE_SHAPE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, V) float32 logits on the CPU."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over a whole (B, N, V) batch of logits: unlike the largest difference, it does not
    hang on the one logit whose rounding errors happened to add up."""
    return ((x - ref).norm() / ref.norm()).item()


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error a model whose weights were rounded to `dtype` may show against the reference."""
    return TOLERANCE_EPS * torch.finfo(dtype).eps


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative error and max |difference| of two (B, N, V) logits, the largest reference logit, top-1 agreement."""
    return {
        "relative_error": relative_error(x, ref),
        "max_abs_diff": (x - ref).abs().max().item(),
        "max_abs_logit": ref.abs().max().item(),
        "top1_agreement": (x.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


# -- the base an adapter is merged into -------------------------------------------------------------------------
def architecture_mismatch(base: str, trained_on: str, student: Path) -> None:
    """Refuse a base whose config differs in shape from the one the adapter trained on (when that one's config is
    readable: a hub name without network is checked by the adapter's tensors alone, see adapter_mismatch)."""
    if base == trained_on:
        return
    try:
        want = load_pretrained(AutoConfig, trained_on)
    except ModelLoadError:
        return
    have = load_pretrained(AutoConfig, base)
    diff = [
        f"{k} {getattr(have, k, None)} vs {getattr(want, k, None)}"
        for k in ARCHITECTURE
        if getattr(have, k, None) != getattr(want, k, None)
    ]
    if diff:
        raise ExportError(
            f"base checkpoint {base} does not match the adapter in {student} (trained on {trained_on}): "
            + ", ".join(diff)
        )


def adapter_mismatch(model, student: Path, base: str) -> None:
    """Refuse a base whose modules are not exactly the ones the adapter holds, with its shapes: every adapted
    module present with the same (in, out) features, and no module the adapter targets left without its update
    (a base with more layers would otherwise load and silently keep some layers untrained)."""
    targets = json.loads((student / "adapter_config.json").read_text())["target_modules"]
    adapted = {}  # module name -> (in_features, out_features)
    with safe_open(str(student / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # base_model.model.<module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
            module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):  # Stage 2 adapts linear layers only (no embeddings, no DoRA)
                continue
            shape = f.get_slice(key).get_shape()
            io = adapted.setdefault(module, [None, None])
            io[0 if part == "A.weight" else 1] = shape[1] if part == "A.weight" else shape[0]
    modules = dict(model.named_modules())

    def targeted(name: str) -> bool:
        if isinstance(targets, str):  # peft: a string is a regex over the full module name
            return re.fullmatch(targets, name) is not None
        return name.rsplit(".", 1)[-1] in targets

    problems = []
    for name, (n_in, n_out) in sorted(adapted.items()):
        m = modules.get(name)
        if m is None:
            problems.append(f"{name} is not in the base")
        elif (getattr(m, "in_features", None), getattr(m, "out_features", None)) != (n_in, n_out):
            problems.append(f"{name} is {m.in_features} -> {m.out_features} there, {n_in} -> {n_out} in the adapter")
    extra = sorted(n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and targeted(n) and n not in adapted)
    if extra:
        problems.append(f"{len(extra)} targeted modules without an update (e.g. {extra[0]})")
    if problems:
        raise ExportError(
            f"base checkpoint {base} does not match the adapter in {student}: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )


def is_quantized(path: str) -> bool:
    """A pre-quantised checkpoint (e.g. unsloth/Qwen2.5-1.5B-bnb-4bit) carries its quantization_config."""
    return getattr(load_pretrained(AutoConfig, path), "quantization_config", None) is not None


def choose_quantized_base(student: str, base: str | None, how: str) -> tuple[str, str]:
    """("original" or "dequantized", why) for an adapter trained on quantised weights; `how` = auto, original or
    dequantized (--quantized-base)."""
    if how == "dequantized":
        if base:
            raise ExportError(f"--base {base} is not used with --quantized-base dequantized: drop one of them")
        return "dequantized", "--quantized-base dequantized"
    candidate = base or student
    try:
        quantized = is_quantized(candidate)
    except ModelLoadError as e:
        if how == "original" or base:  # a base named on the command line must load
            raise
        return "dequantized", f"the 16-bit checkpoint could not be loaded ({e})"
    if quantized:
        if how == "original" or base:
            raise ExportError(
                f"{candidate} is itself a quantised checkpoint: give its 16-bit original with --base (e.g. "
                "Qwen/Qwen2.5-1.5B for unsloth/Qwen2.5-1.5B-bnb-4bit), or --quantized-base dequantized"
            )
        return "dequantized", f"{candidate} is pre-quantised and no --base names its 16-bit original"
    return "original", ""


def weight_distance(quantized, model) -> float:
    """max over the quantised linear layers of `quantized` (the base as Stage 2 loaded it, before any forward:
    bitsandbytes may repack a CPU weight on its first one) of ||W16 - dequant(Wq)|| / ||W16||, W16 the same layer
    of the 16-bit `model`."""
    from peft.utils.integrations import dequantize_bnb_weight

    plain = dict(model.named_modules())
    worst = 0.0
    for name, m in quantized.named_modules():
        if type(getattr(m, "weight", None)).__name__ not in ("Params4bit", "Int8Params"):
            continue
        w16 = plain[name].weight.float()
        wq = dequantize_bnb_weight(m.weight, state=getattr(m, "state", None)).float().to(w16.device)
        worst = max(worst, ((w16 - wq).norm() / w16.norm()).item())
    return worst


def load_plain(path: str):
    """A checkpoint's weights in float32 on the CPU: the precision the merge is done in."""
    return load_pretrained(AutoModelForCausalLM, path, dtype=torch.float32).eval()


def dequantized(student: str, dtype: str, bits: int):
    """The base exactly as Stage 2 loaded it (quantised with `bits`), its weights dequantised to float32."""
    model = load_causal_lm(student, dtype, bits)
    return model.dequantize(dtype=torch.float32).float().cpu().eval()


def merge(path: Path, params: DistillParams, ids, base: str | None, quantized_base: str) -> Merged:
    """The student of `path` as one float32 model; `ids` is the probe batch on which the merge is checked."""
    from peft import PeftModel

    d = params.distill
    if d.mode == "full":
        if base:
            raise ExportError(f"{path} was trained with distill.mode=full: it has no base to merge, drop --base")
        note = "full fine-tuning: the student's own weights"
        return Merged(load_plain(str(path)), str(path), "student", note, None, None, None)
    distance = None
    if d.load_in_bits == 16:
        source, base_path = "16-bit base", base or d.student
        note = f"LoRA merged into its 16-bit base {base_path}"
    else:
        source, why = choose_quantized_base(d.student, base, quantized_base)
        base_path = (base or d.student) if source == "original" else d.student
        if source == "original":
            note = f"QLoRA adapter merged into the original 16-bit weights of {base_path}"
        else:
            note = f"QLoRA adapter merged into the {d.load_in_bits}-bit weights of {base_path} dequantised ({why})"
    architecture_mismatch(base_path, d.student, path)
    model = load_plain(base_path) if source != "dequantized" else dequantized(d.student, d.dtype, d.load_in_bits)
    adapter_mismatch(model, path, base_path)
    if source == "original":
        distance = weight_distance(load_causal_lm(d.student, d.dtype, d.load_in_bits), model)
        if distance > MAX_WEIGHT_DISTANCE:
            raise ExportError(
                f"base checkpoint {base_path} does not match the adapter in {path}: its weights are "
                f"{distance:.2f} (relative) from the {d.load_in_bits}-bit ones it trained on {d.student} (quantisation "
                f"alone gives ~0.1; limit {MAX_WEIGHT_DISTANCE})"
            )
    model = PeftModel.from_pretrained(model, str(path)).eval()
    unmerged = logits(model, ids)  # (B, N, V)
    with model.disable_adapter():
        effect = relative_error(logits(model, ids), unmerged)  # how far the adapter moves the logits
    model = model.merge_and_unload()
    diff = relative_error(logits(model, ids), unmerged)
    # merging reorders float32 sums (x (W + s B A) instead of x W + s (x A) B): rounding, far below what the adapter
    # does; a merge that lost or misscaled the update differs by a share of `effect`
    if diff > max(tolerance(torch.float32), MERGE_SHARE * effect):
        raise RuntimeError(f"merge_and_unload moved the logits by {diff:g} (relative; the adapter by {effect:g})")
    return Merged(model, base_path, source, note, diff, effect, distance)
