"""Build the embedded default's tokenizer and tiny random-init Qwen2 teacher/student (no hub access needed).

The tiny models are real `Qwen2ForCausalLM`s (GQA attention, RoPE, SwiGLU, RMSNorm) so every code path the
pipeline takes with Qwen2.5-7B / 1.5B (loading, chat template, padded logits, generation) is exercised on
CPU in seconds. Only the sizes differ. Imports only tokenizers / transformers / torch.
"""

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from pipeline.models import ModelLoadError

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]  # ids 0, 1, 2 (Qwen2.5 has them at 151643..151645; order kept)

# Qwen2's pre-tokenizer regex, verbatim (transformers' tokenization_qwen2.PRETOKENIZE_REGEX). `\p{N}` on its
# own matches ONE digit, so numbers are always split into single digits: "2631" -> 2 6 3 1. That is what
# makes arithmetic-style tasks learnable digit by digit, and it is how the real teacher sees numbers.
QWEN_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# Qwen2.5-Instruct's template, minus tool calling: a default system turn is inserted when the conversation
# does not start with one, and add_generation_prompt opens the assistant turn. Kept so that
# `apply_chat_template` behaves on the tiny tokenizer as on the real one.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def build_tokenizer(texts: list[str], out_dir, vocab_size: int, digits: int = 1) -> PreTrainedTokenizerFast:
    """Train a Qwen-style byte-level BPE on `texts`, save it in HF format to `out_dir` and return it.

    `vocab_size` counts the 3 special tokens and the 256 byte symbols; it must be > 259. Training on the
    rendered prompts makes the fixed Alpaca template collapse into a handful of tokens, so sequences stay
    short. Deterministic for the same texts (the tokenizers BPE trainer breaks ties by content).
    digits: how many digits one pre-token may hold (1: Qwen's one digit per token; 2: "2631" -> "26" "31", the
    embedded cross-tokenizer student's, so that its sequences are shorter than the teacher's).
    """
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ModelLoadError(
            f"prepare.tokenizer_vocab={vocab_size} must exceed the 256 byte symbols + {len(SPECIAL_TOKENS)} specials"
        )
    tok = Tokenizer(
        models.BPE(
            unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(QWEN_PRETOKENIZE_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,%d}|" % digits)),  # noqa: UP031
                behavior="isolated",
                invert=False,
            ),
            # use_regex=False: the split above already did GPT-2's job; this only maps bytes to printable chars
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # the full byte alphabet, so any unseen text (other scripts, emoji) still encodes losslessly
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,  # Qwen2.5 pads with <|endoftext|>; padding is always masked out of losses anyway
        unk_token=None,
        bos_token=None,  # Qwen adds no BOS
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return hf


def padded_vocab_size(n_tokens: int, multiple: int) -> int:
    """Round the embedding rows UP to `multiple`, as Qwen2.5 does (151,665 tokens -> 151,936 / 152,064 rows).

    The extra rows are never produced by the tokenizer, so downstream code must slice logits to
    len(tokenizer) before any softmax; the tiny models keep that trap live on CPU.
    """
    return -(-n_tokens // multiple) * multiple


def build_model(
    tokenizer,
    out_dir,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_multiple: int = 64,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 512,
) -> None:
    """Save a random-init Qwen2ForCausalLM (+ the tokenizer) to `out_dir`, loadable with from_pretrained.

    tie_word_embeddings defaults to True like Qwen2.5-0.5B/1.5B: at tiny sizes the embedding matrix is a
    large share of the parameters and tying halves it. Weights are float32 (CPU training).
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ModelLoadError(
            f"model shape hidden_size={hidden_size}, num_heads={num_heads}, "
            f"num_kv_heads={num_kv_heads}: hidden_size must divide by num_heads and num_heads by "
            "num_kv_heads (GQA groups)"
        )
    n_tok = len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = Qwen2Config(
        vocab_size=padded_vocab_size(n_tok, vocab_multiple),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # short sequences: small theta suffices
    )
    # Seed a private generator state so building a model does not depend on (or disturb) global RNG use
    # elsewhere in the process beyond this call.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
