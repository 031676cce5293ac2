"""Loading models and tokenizers: one code path for a local tiny checkpoint and for Qwen/Qwen2.5-7B on a GPU."""

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from cache.errors import OtkdError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelLoadError(OtkdError, ValueError):
    """The model path or its settings (shape, dtype, quantisation, training mode) cannot work; the message says
    what to change."""


def device() -> torch.device:
    """This process's device: under torchrun / accelerate each process of a node has its own GPU (LOCAL_RANK)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def compute_dtype(name: str) -> torch.dtype:
    """ "auto" = bf16 where the hardware supports it (CUDA), fp32 on the CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r} (use auto, bf16, fp16 or fp32)")
    return DTYPES[name]


HUB_PROBE_TIMEOUT = 5.0
"""Seconds the one reachability probe of the hub may take (HF_HUB_ETAG_TIMEOUT, when set, takes precedence)."""


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@functools.cache
def _hub_unreachable() -> str | None:
    """Why the model hub cannot be contacted (None if it answers), asked once per process.

    huggingface_hub retries a file it has no local copy of with backoff for about 25 s (transformers asks for
    several files), so a hub name on a machine without network would take most of a minute to fail.
    """
    from huggingface_hub import constants, get_session

    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_PROBE_TIMEOUT)
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any HTTP answer, even an error status, will do
    except Exception as e:  # noqa: BLE001 - whatever stops one request stops the downloads too
        return f"{constants.ENDPOINT}: {_first_line(e)}"
    return None


def load_pretrained(loader, path: str, **kwargs):
    """loader.from_pretrained(path), with a one-line error instead of a hub traceback when `path` is wrong.

    A name that is not a local path is a hub name: with HF_HUB_OFFLINE=1, or when the hub does not answer,
    only the local hub cache is used (at once, instead of after a minute of retries).
    """
    from huggingface_hub import is_offline_mode
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    local = Path(path).exists()
    if not local:
        try:
            validate_repo_id(path)
        except HFValidationError:
            raise ModelLoadError(f"model path {path} does not exist (and is not a hub name either)") from None
    offline = not local and is_offline_mode()
    unreachable = None if local or offline or kwargs.get("local_files_only") else _hub_unreachable()
    if unreachable:
        kwargs["local_files_only"] = True
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        if local:
            raise
        if offline:
            why = (
                "nor in the local hub cache (HF_HUB_OFFLINE is set: the hub is not asked); give a local folder, "
                "or unset HF_HUB_OFFLINE to download it"
            )
        elif unreachable:
            why = (
                f"nor in the local hub cache, and the hub is unreachable ({unreachable}); give a local folder, "
                "or check the network (HF_ENDPOINT, proxy, HF_HUB_ETAG_TIMEOUT)"
            )
        else:
            why = f"and could not be loaded as a hub name ({_first_line(e)})"
        raise ModelLoadError(f"model path {path} does not exist locally {why}") from None


def load_tokenizer(path: str):
    """AutoTokenizer, unless the class it picks does not split text as the folder's tokenizer.json says.

    transformers 5 loads every folder whose config.json says model_type "qwen2" with Qwen2Tokenizer, which rebuilds
    Qwen's own pre-tokenizer (one digit per token) over the saved one: an extended or retrained tokenizer (here the
    embedded cross-tokenizer student's, digits in pairs) would silently tokenize like Qwen's. tokenizer.json is
    then loaded as it is (TokenizersBackend).
    """
    tok = load_pretrained(AutoTokenizer, path)
    saved = Path(path) / "tokenizer.json"
    if saved.is_file() and hasattr(tok, "backend_tokenizer"):
        want = json.loads(saved.read_text(encoding="utf-8"))
        have = json.loads(tok.backend_tokenizer.to_str())
        if any(want.get(k) != have.get(k) for k in ("normalizer", "pre_tokenizer")):
            from transformers import TokenizersBackend

            tok = TokenizersBackend.from_pretrained(path)
    if tok.pad_token is None:  # Llama-style tokenizers ship without one; padding is always masked anyway
        tok.pad_token = tok.eos_token
    return tok


def check_vocab(logits_size: int, tokenizer_size: int, model: str) -> None:
    """Logits padded beyond the tokenizer are fine (both stages use only the first len(tokenizer) columns, e.g.
    151,665 of Qwen2.5's 151,936 / 152,064), fewer columns than tokens cannot represent every token."""
    if logits_size < tokenizer_size:
        raise ModelLoadError(
            f"{model} has {logits_size} logit columns but its tokenizer has {tokenizer_size} tokens: "
            "the model does not belong to this tokenizer"
        )


def check_max_length(config_or_path, max_length: int, model: str, where: str = "") -> None:
    """Refuse sequences longer than the model's positions (`max_position_embeddings` of its config, read before
    any weight loads): a RoPE model would silently degrade beyond them, one with learned positions fail.
    `where` says where max_length comes from when it is not the current data.max_length (e.g. a cache)."""
    config = config_or_path
    if isinstance(config, (str, Path)):
        config = load_pretrained(AutoConfig, str(config))
    if hasattr(config, "get_text_config"):  # multimodal configs keep the language model's in a sub-config
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and max_length > limit:
        fix = f"recreate {where} with data.max_length <= {limit}" if where else f"set data.max_length <= {limit}"
        raise ModelLoadError(
            f"data.max_length={max_length}{' of ' + where if where else ''} is longer than {model} "
            f"supports (max_position_embeddings={limit}): {fix}"
        )


def quantization(load_in_bits: int, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes NF4 (4) or LLM.int8 (8); 16 means no quantisation."""
    if load_in_bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    if load_in_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if load_in_bits == 16:
        return None
    raise ModelLoadError(f"load_in_bits must be 4, 8 or 16, got {load_in_bits}")


def load_causal_lm(path: str, dtype: str = "auto", load_in_bits: int = 16, device_map: str = ""):
    """AutoModelForCausalLM.from_pretrained on the right device, optionally quantised with bitsandbytes.

    A pre-quantised checkpoint (e.g. unsloth/Qwen2.5-1.5B-bnb-4bit) loads with its own quantization_config
    whatever load_in_bits says (an explicit quantization_config=None would make transformers read its packed
    weights as plain ones). Quantised weights are placed on the device while loading.
    """
    dt = compute_dtype(dtype)
    q = quantization(load_in_bits, dt)
    dev = device()
    placed = q is not None or getattr(load_pretrained(AutoConfig, path), "quantization_config", None) is not None
    kwargs = {"quantization_config": q} if q is not None else {}
    if device_map == "auto":
        return load_pretrained(AutoModelForCausalLM, path, dtype=dt, device_map="auto", **kwargs)
    model = load_pretrained(AutoModelForCausalLM, path, dtype=dt, device_map={"": dev} if placed else None, **kwargs)
    return model if placed else model.to(dev)


def model_hash(path: str) -> str:
    """Identity of a checkpoint for provenance: its config plus the names and sizes of its weight files.

    Hashing 15 GB of weights would cost minutes; names + sizes + config catch a swapped or re-trained model
    in practice (a fine-tuned checkpoint rewrites the files) at no cost.
    """
    cfg = load_pretrained(AutoConfig, path).to_dict()
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)
    files = sorted((f.name, f.stat().st_size) for f in Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    blob = json.dumps({"config": cfg, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
