"""The accuracy curve of a student during Stage 2: greedy answers to fixed prompts at every evaluation."""

from transformers import TrainerCallback

from pipeline.evaluation.generate import task_accuracy


class AccuracyCurve(TrainerCallback):
    """Greedy task accuracy on fixed prompts at every evaluation during training (distill.eval_steps): `points`, a
    list of (step, accuracy). When a student makes a sudden transition is an outcome of its losses, not noise."""

    def __init__(self, records: list[dict], tokenizer, template: str, check, max_new_tokens: int = 16):
        self.records, self.tokenizer, self.template, self.check = records, tokenizer, template, check
        self.max_new_tokens, self.points = max_new_tokens, []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        student = getattr(model, "student", model)  # Stage 2 trains a DistillModel around the student
        was_training = student.training
        student.eval()
        acc = task_accuracy(
            student,
            self.tokenizer,
            self.records,
            self.template,
            self.check,
            max_new_tokens=self.max_new_tokens,
            desc=f"accuracy at step {state.global_step}",
        )
        student.train(was_training)
        self.points.append((state.global_step, acc))
