"""Teacher SFT: LoRA + merge gives a plain checkpoint that loads without peft; metrics are written."""

import copy
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.teacher import finetune


def test_lora_sft_merges_into_a_plain_checkpoint(tiny, tmp_path):
    cfg = copy.deepcopy(tiny)
    cfg.finetune.out = str(tmp_path / "teacher")
    cfg.finetune.metrics = str(tmp_path / "metrics.json")
    cfg.finetune.mode = "lora"
    cfg.finetune.lora.r = 4
    cfg.finetune.lr = 1e-2
    cfg.finetune.eval_examples = 8
    base = AutoModelForCausalLM.from_pretrained(cfg.finetune.base)
    metrics = finetune.run(cfg)

    out = Path(cfg.finetune.out)
    assert not (out / "adapter_config.json").exists()  # merged: Stage 1 never needs peft
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert type(tuned) is type(base)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    assert not any("embed_tokens" in n for n in changed)  # LoRA touched only the target projections
    saved = json.loads(Path(cfg.finetune.metrics).read_text())
    assert saved == metrics and 0.0 <= saved["teacher_accuracy"] <= 1.0 and saved["n_test"] == 8
    assert (out / "tokenizer.json").exists() and (out / "config.yaml").exists()
