"""Building and running the Trainer: the one place a recipe becomes an `SFTTrainer`, for `sft` and `bench` alike.

Training itself (loop, optimizer, checkpoints, loss masking from `completion_mask`) is TRL's and transformers'; this
module loads the model, hands TRL the rows and the LoRA config, checks what PEFT wrapped, and adds the callbacks
that show progress and stop a diverging run.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from toolkit import distributed, lora, modeling
from toolkit.report import progress_bar
from toolkit.translate import to_sft_config


def build_trainer(recipe, *, precision: str, device, tokenizer, train_dataset, output_dir: str, eval_dataset=None,
                  strategy: str = "ddp", callbacks=(), data_collator=None, **config_overrides):
    """The recipe's model with LoRA, inside TRL's SFTTrainer; returns (trainer, the module names PEFT wrapped).

    `config_overrides` replace SFTConfig arguments (bench turns checkpoints off this way).
    """
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    model = modeling.load_model(recipe, precision, device)
    args = to_sft_config(recipe.train, precision, device, output_dir, eval_dataset is not None,
                         distributed.world_size(), strategy, **config_overrides)
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=tokenizer, peft_config=lora.to_lora_config(recipe.lora),
                             callbacks=list(callbacks), data_collator=data_collator)
    except ValueError as err:
        if "not found in the base model" in str(err):
            raise lora.no_match_error(recipe.lora) from None
        raise
    trainer.remove_callback(PrinterCallback)  # the rich bar shows progress; raw log dicts would only add noise
    modules = lora.check_scope(lora.targeted_modules(trainer.model), recipe.lora)
    return trainer, modules


def run_training(trainer, recipe, precision: str, strategy: str = "ddp", resume_from=None):
    """`trainer.train()` with the adapters set up for mixed precision (see `toolkit.lora.training_casts`)."""
    with lora.training_casts(trainer.model, precision, recipe.lora.upcast_inputs, strategy):
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over optimizer steps, showing the latest loss; only the main process draws it."""

    def __init__(self):
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = progress_bar()
            self.task = self.progress.add_task("training", total=state.max_steps, status="", completed=state.global_step)
            self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress and logs:
            parts = [f"{k} {logs[k]:.4f}" for k in ("loss", "eval_loss") if k in logs]
            if parts:
                self.progress.update(self.task, status=" ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()
            self.progress = None


class FiniteGuard(TrainerCallback):
    """Stops training at the first NaN or inf in the logged loss, the gradient norm or the adapter weights.

    A diverged run must never be saved as a finished one. The adapter is checked whenever the Trainer is about to
    log or checkpoint (one device sync then, none on other steps), so no checkpoint holding NaN is written. The
    loss is logged unfiltered (`logging_nan_inf_filter=False`), so a NaN on any step shows in the next log. Under
    fp16 an infinite gradient norm is the loss scaler's normal overflow signal (that step is skipped), not a failure.
    """

    def __init__(self, precision: str):
        self.check_grad_norm = precision != "fp16"
        self.problem: str | None = None

    def stop(self, control, problem: str):
        self.problem = self.problem or problem
        control.should_training_stop = True
        control.should_save = False
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (control.should_save or control.should_log or control.should_training_stop):
            bad = first_non_finite(model)
            if bad:
                return self.stop(control, f"adapter weight {bad} is NaN or inf after step {state.global_step}")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss", "eval_loss") + (("grad_norm",) if self.check_grad_norm else ())
        for key in keys:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return self.stop(control, f"{key} is {value} at step {state.global_step}")
        return control


def first_non_finite(model) -> str | None:
    """The name of the first trainable tensor holding NaN or inf, or None."""
    import torch

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return None
    flags = torch.stack([p.detach().isfinite().all() for _, p in trainable]).cpu()  # one sync for all of them
    return next((name for (name, _), ok in zip(trainable, flags.tolist()) if not ok), None)


