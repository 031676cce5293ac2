"""Loading the Stage 2 student: plain, full fine-tuning, LoRA, or 4-bit NF4 + LoRA (QLoRA); and reloading it.

The teacher is never loaded here: Stage 2 sees the teacher only through its cache.
"""

import json
from pathlib import Path

import yaml
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from pipeline.config.distill import DistillConfig
from pipeline.models import ModelLoadError, load_causal_lm


def load_student(d: DistillConfig):
    """The student ready to train as `d` says: every weight trainable (mode=full) or a peft LoRA model.

    load_in_bits=4 gives bitsandbytes NF4 base weights (`bnb.nn.Linear4bit`, compute dtype `d.dtype`) with
    `prepare_model_for_kbit_training` (norms and embeddings in fp32, input grads for checkpointing).
    """
    if d.mode not in ("full", "lora"):
        raise ModelLoadError(f"distill.mode must be 'full' or 'lora', got {d.mode!r}")
    if d.mode == "full" and d.load_in_bits != 16:
        raise ModelLoadError(
            f"distill.mode=full cannot train {d.load_in_bits}-bit quantised weights; "
            "use distill.mode=lora (QLoRA) or distill.load_in_bits=16"
        )
    model = cpu_4bit_guard(load_causal_lm(d.student, d.dtype, d.load_in_bits))
    if getattr(model, "is_loaded_in_4bit", False) and d.load_in_bits != 4:  # e.g. unsloth/Qwen2.5-1.5B-bnb-4bit
        raise ModelLoadError(
            f"{d.student} is a pre-quantised 4-bit checkpoint: set distill.load_in_bits=4 (and "
            "distill.mode=lora) so that it is prepared for k-bit training"
        )
    model.config.use_cache = False  # the KV cache is useless in training and warns with checkpointing
    # Non-reentrant checkpointing needs no input that requires grad, so it also works with frozen embeddings.
    gc_kwargs = {"use_reentrant": False}
    if d.load_in_bits != 16:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=d.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif d.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if d.mode == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                r=d.lora.r,
                lora_alpha=d.lora.alpha,
                lora_dropout=d.lora.dropout,
                target_modules=list(d.lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    return model


def cpu_4bit_guard(model):
    """Keep bitsandbytes off its packed CPU inference kernel for layers it cannot pack.

    On AVX512-bf16 CPUs, `bnb.nn.Linear4bit` repacks its weight on the first no-grad forward, which asserts
    out_features % 32 == 0 and whole quantisation blocks per row (bitsandbytes 0.50); tiny test models have
    8- and 16-wide projections. Such layers
    take the generic dequantise + matmul path instead (same result). No effect on GPU or real model sizes.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and (m.out_features % 32 or m.in_features % m.weight.quant_state.blocksize):
            m.support_avx512bf16_for_cpu = False
    return model


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def load_trained(path: str | Path, dtype: str = "auto", load_in_bits: int = 16):
    """A model for evaluation: a plain checkpoint, or a Stage 2 LoRA output = its base + the adapter.

    For an adapter folder the base and its quantisation come from the `config.yaml` Stage 2 saved next to it
    (a QLoRA student is evaluated on the same NF4 base it was trained on); `load_in_bits` applies to plain
    checkpoints only. The adapter is not merged: merging into 4-bit weights would round the update away.
    """
    path = Path(path)
    if not is_adapter(path):
        return cpu_4bit_guard(load_causal_lm(str(path), dtype, load_in_bits)).eval()
    saved = yaml.safe_load((path / "config.yaml").read_text())["distill"] if (path / "config.yaml").exists() else {}
    base = saved.get("student") or json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = cpu_4bit_guard(load_causal_lm(base, saved.get("dtype", dtype), saved.get("load_in_bits", 16)))
    return PeftModel.from_pretrained(model, str(path)).eval()
