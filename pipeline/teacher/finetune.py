"""Teacher SFT on the task (the pipeline's first step): LoRA then merge_and_unload, or full fine-tuning.

The result is a plain checkpoint (no adapter) so Stage 1 loads it exactly like Qwen/Qwen2.5-7B.
"""

import json
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from pipeline.config.base import save_config
from pipeline.config.finetune import FinetuneParams
from pipeline.data.records import load_splits, pad_collate
from pipeline.evaluation.generate import checker, task_accuracy
from pipeline.models import ModelLoadError, check_max_length, load_causal_lm, load_tokenizer
from pipeline.versions import versions


def training_args(
    out: Path, seed: int, epochs: float, lr: float, batch_size: int, warmup_ratio: float, **kwargs
) -> TrainingArguments:
    """Trainer arguments of the teacher SFT: cosine schedule, no hub, no external loggers, no checkpoints."""
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=float(warmup_ratio),
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **kwargs,
    )


def run(cfg: FinetuneParams) -> dict:
    f = cfg.finetune
    out = Path(f.out)
    check_max_length(f.base, cfg.data.max_length, f.base)  # from its config: before data or weights load
    tokenizer = load_tokenizer(f.base)
    splits = load_splits(cfg.data, tokenizer)
    model = load_causal_lm(f.base, "auto")
    if f.mode == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                r=f.lora.r,
                lora_alpha=f.lora.alpha,
                lora_dropout=f.lora.dropout,
                target_modules=f.lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    elif f.mode != "full":
        raise ModelLoadError(f"finetune.mode must be 'lora' or 'full', got {f.mode!r}")
    train = splits["train"].select_columns(["input_ids", "labels"])
    args = training_args(out / "trainer", cfg.seed, f.epochs, f.lr, f.batch_size, f.warmup_ratio)
    trainer = Trainer(
        model=model, args=args, train_dataset=train, data_collator=partial(pad_collate, pad_id=tokenizer.pad_token_id)
    )
    trainer.train()
    if f.mode == "lora":
        model = model.merge_and_unload()  # a plain checkpoint: Stage 1 never needs peft
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    test = splits["test"].to_list()
    if f.eval_examples:
        test = test[: f.eval_examples]
    acc = task_accuracy(
        model, tokenizer, test, cfg.data.template, check=checker(cfg.data.metric), desc="teacher accuracy"
    )
    metrics = {
        "teacher_accuracy": acc,
        "n_test": len(test),
        "train_loss": trainer.state.log_history[-1].get("train_loss"),
        "versions": versions(),
    }
    Path(f.metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(f.metrics).write_text(json.dumps(metrics, indent=2))
    save_config(cfg, out / "config.yaml")
    print(f"teacher: held-out accuracy {acc:.1%} on {len(test)} test examples; saved to {out}")
    return metrics
