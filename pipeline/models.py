"""Loading models and tokenizers: one code path for a local tiny checkpoint and for Qwen/Qwen2.5-7B on a GPU."""
import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from cache.errors import OtkdError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelLoadError(OtkdError, ValueError):
    """The model path or its settings (shape, dtype, quantisation, training mode) cannot work; the message says
    what to change."""


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(name: str) -> torch.dtype:
    """"auto" = bf16 where the hardware supports it (CUDA), fp32 on the CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r} (use auto, bf16, fp16 or fp32)")
    return DTYPES[name]


def _from_pretrained(loader, path: str, **kwargs):
    """loader.from_pretrained(path), with a one-line error instead of a hub traceback when `path` is wrong."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        if Path(path).exists():
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model path {path} does not exist locally and could not be loaded as a hub name "
                             f"({first})") from None


def load_tokenizer(path: str):
    tok = _from_pretrained(AutoTokenizer, path)
    if tok.pad_token is None:  # Llama-style tokenizers ship without one; padding is always masked anyway
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(logits_size: int, tokenizer_size: int, model: str) -> None:
    """Logits padded beyond the tokenizer are fine (both stages use only the first len(tokenizer) columns, e.g.
    151,665 of Qwen2.5's 151,936 / 152,064), fewer columns than tokens cannot represent every token."""
    if logits_size < tokenizer_size:
        raise ModelLoadError(f"{model} has {logits_size} logit columns but its tokenizer has {tokenizer_size} tokens: "
                             "the model does not belong to this tokenizer")


def quantization(load_in_bits: int, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes NF4 (4) or LLM.int8 (8); 16 means no quantisation."""
    if load_in_bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if load_in_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if load_in_bits == 16:
        return None
    raise ModelLoadError(f"load_in_bits must be 4, 8 or 16, got {load_in_bits}")


def load_causal_lm(path: str, dtype: str = "auto", load_in_bits: int = 16):
    """AutoModelForCausalLM.from_pretrained on the right device, optionally quantised with bitsandbytes.

    A pre-quantised checkpoint (e.g. unsloth/Qwen2.5-1.5B-bnb-4bit) loads with its own quantization_config
    whatever load_in_bits says (an explicit quantization_config=None would make transformers read its packed
    weights as plain ones). Quantised weights are placed on the device while loading.
    """
    dt = compute_dtype(dtype)
    q = quantization(load_in_bits, dt)
    dev = device()
    placed = q is not None or getattr(_from_pretrained(AutoConfig, path), "quantization_config", None) is not None
    kwargs = {"quantization_config": q} if q is not None else {}
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=dt, device_map={"": dev} if placed else None, **kwargs)
    return model if placed else model.to(dev)


def model_hash(path: str) -> str:
    """Identity of a checkpoint for provenance: its config plus the names and sizes of its weight files.

    Hashing 15 GB of weights would cost minutes; names + sizes + config catch a swapped or re-trained model
    in practice (a fine-tuned checkpoint rewrites the files) at no cost.
    """
    cfg = _from_pretrained(AutoConfig, path).to_dict()
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)
    files = sorted((f.name, f.stat().st_size) for f in Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    blob = json.dumps({"config": cfg, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
