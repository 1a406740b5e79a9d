"""Building and running the Trainer: the one place a recipe becomes an `SFTTrainer`, for `sft` and `bench` alike.

Training itself (loop, optimizer, checkpoints, loss masking from `completion_mask`) is TRL's and transformers'; this
module loads the model, hands TRL the rows and the LoRA config, checks what PEFT wrapped, and adds the callbacks
that show progress and stop a diverging run.
"""

from __future__ import annotations

import functools
import math

from transformers import TrainerCallback

from toolkit.config.translate import to_sft_config
from toolkit.errors import ToolkitError
from toolkit.model import fastlora, loading, lora, vision_tower
from toolkit.training import activations, compiling, distributed
from toolkit.ui.report import progress_bar


def build_trainer(recipe, *, precision: str, device, tokenizer, train_dataset, output_dir: str, eval_dataset=None,
                  strategy: str = "ddp", callbacks=(), data_collator=None, **config_overrides):
    """The recipe's model with LoRA, inside TRL's SFTTrainer; returns (trainer, the module names PEFT wrapped).

    `config_overrides` replace SFTConfig arguments (bench turns checkpoints off this way).
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    set_seed(recipe.train.seed)  # LoRA's A matrices are drawn when TRL wraps the model: same start on every run
    model = loading.load_model(recipe, precision, device, training=True)
    args = to_sft_config(recipe.train, precision, device, output_dir, eval_dataset is not None,
                         distributed.world_size(), strategy, **config_overrides)
    try:
        trainer = sft_trainer_class()(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                      processing_class=tokenizer, peft_config=lora.to_lora_config(recipe.lora),
                                      callbacks=list(callbacks), data_collator=data_collator)
    except ValueError as err:
        if "not found in the base model" in str(err):
            raise lora.no_match_error(recipe.lora) from None
        raise
    vision_tower.keep_frozen_tower_out_of_autograd(trainer.model)  # TRL hooked it for checkpointing
    trainer.token_metrics = recipe.train.token_metrics
    trainer.remove_callback(PrinterCallback)  # the rich bar shows progress; raw log dicts would only add noise
    modules = lora.check_scope(lora.targeted_modules(trainer.model), recipe.lora)
    return trainer, modules


def run_training(trainer, recipe, precision: str, strategy: str = "ddp", resume_from=None):
    """`trainer.train()` with the adapters set up for mixed precision (see `toolkit.model.lora.training_casts`) and, as
    the recipe says, LoRA and 8-bit layers run by `toolkit.model.fastlora` (where `fastlora.paths_on` allows) and
    checkpointed layers offloaded or chosen by `toolkit.training.activations`."""
    activations.check_strategy(recipe.train, strategy)
    if problem := fastlora.fp8_problem(recipe, strategy):
        raise ToolkitError(problem)
    checkpointing = activations.callback_for(recipe.train)
    compiled = compiling.compile_layers(trainer.model) if recipe.train.compile else []
    fused = fastlora.paths_on(recipe, strategy)
    fp8_layers = activations.text_decoder_layers(trainer.model) if fused["fp8"] != "none" else None
    with lora.training_casts(trainer.model, precision, recipe.lora.upcast_inputs, strategy), \
            fastlora.fused_layers(trainer.model, **fused, fp8_layers=fp8_layers) as counts:
        trainer.fused_counts = counts
        trainer.checkpointing = checkpointing
        if checkpointing is not None:
            trainer.add_callback(checkpointing)
        try:
            return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            if checkpointing is not None:
                trainer.remove_callback(checkpointing)
            compiling.uncompile(compiled)


def lean_loss(trainer, model, inputs, num_items_in_batch=None):
    """The training loss TRL's `SFTTrainer.compute_loss` computes (mean negative log-likelihood of the completion
    tokens, through TRL's fused LM head), without its entropy and token-accuracy metrics.

    TRL turns both metrics, and its running token count, into Python values on every micro-batch (three `.item()`
    calls and two tensors tested in an `if`): five device syncs, each a wait for the GPU to finish the forward pass
    before the CPU can queue the backward pass (12.5 syncs per step against 7.5 without, in docs/benchmarks.md's
    profile). The loss is TRL's arithmetic, line for line, including its scaling by processes over the
    tensor-parallel size; the token count TRL logs as `num_tokens` is kept, as a tensor that `pending_tokens` adds
    up and the trainer reads when it logs (one sync per log, not per micro-batch). Only the cases
    `lean_loss_applies` accepts come here; a recipe that wants the metrics sets `train.token_metrics: true` and gets
    TRL's own `compute_loss`.
    """
    import torch

    inputs["use_cache"] = False
    outputs = model(**inputs, fused_lm_head=True)
    tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = -outputs.log_probs.sum() / torch.as_tensor(tokens).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        # as TRL: DDP averages gradients over processes, and tensor-parallel ranks share one batch
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
    return loss


def batch_tokens(trainer, inputs):
    """This micro-batch's tokens as TRL counts them for `num_tokens` (every process's, once per tensor-parallel
    group; the attention mask's ones, or the packed length without one), left on the device: no sync."""
    import torch

    if "attention_mask" in inputs:
        local = inputs["attention_mask"].sum()
    elif "position_ids" in inputs:
        local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
    else:
        raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
    return trainer.accelerator.gather_for_metrics(local).sum() // trainer._tp_size


@functools.cache
def sft_trainer_class():
    """TRL's SFTTrainer with the per-step token metrics made optional (`train.token_metrics`), a way to log an extra
    metric (`log_extra`) and profiler labels on the parts of a step (`toolkit.bench.profiling` reads them)."""
    from torch.profiler import record_function
    from trl import SFTTrainer

    class ToolkitSFTTrainer(SFTTrainer):
        token_metrics = True
        loss_record = None  # a list: every training micro-batch's loss is appended, as a tensor (no device sync)
        shared_batches = None  # micro-batches of row indices dealt to the processes in turn (see get_train_dataloader)
        pending_tokens = None  # lean_loss's token count (a tensor) not yet added to TRL's `_total_train_tokens`

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.micro_batch_modalities = []  # "i" (image inputs) or "t" (text only), per micro-batch trained here

        def get_train_dataloader(self):
            """The Trainer's loader, or with `shared_batches` a loader of exactly those batches: accelerate deals
            batch k to process k % N (a batch sampler without a fixed batch size), and as the list holds whole rounds
            of N batches no process gets a filler batch."""
            if self.shared_batches is None:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            if self.args.remove_unused_columns:  # image rows keep their columns (toolkit.config.translate.sft_kwargs)
                raise RuntimeError("shared batches need the dataset's columns kept (remove_unused_columns=False)")
            loader = DataLoader(self.train_dataset, batch_sampler=self.shared_batches, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

        def lean_loss_applies(self, return_outputs: bool) -> bool:
            """Whether `lean_loss` computes this loss: training without token metrics or outputs, the plain NLL loss,
            and a sequence that is not sharded over processes. Sequence parallelism (DeepSpeed Ulysses) needs the
            model's own loss reduced across ranks and context parallelism its own path in TRL, so both get TRL's
            `compute_loss`, as does everything else lean_loss does not do."""
            parallel = self.accelerator.parallelism_config
            sharded = parallel is not None and (parallel.sp_enabled or parallel.cp_enabled)
            return not (self.token_metrics or return_outputs or not self.model.training or sharded
                        or self.args.loss_type != "nll" or self.aux_loss_enabled
                        or self.compute_loss_func is not None or self.label_smoother is not None)

        def count_pending_tokens(self) -> None:
            """Add lean_loss's token count to TRL's running total, where TRL's own compute_loss and log read it."""
            if self.pending_tokens is not None:
                self._total_train_tokens += int(self.pending_tokens.item())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
                self.pending_tokens = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with record_function("toolkit: forward + loss"):
                if self.lean_loss_applies(return_outputs):
                    result = lean_loss(self, model, inputs, num_items_in_batch)
                    tokens = batch_tokens(self, inputs)
                    self.pending_tokens = tokens if self.pending_tokens is None else self.pending_tokens + tokens
                else:
                    self.count_pending_tokens()
                    result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.loss_record is not None and self.model.training:
                self.loss_record.append((result[0] if return_outputs else result).detach().float())
            return result

        def log(self, logs, start_time=None):
            self.count_pending_tokens()
            super().log(logs, start_time)

        def log_extra(self, metrics: dict[str, float]) -> None:
            """Log metrics of their own (not the step's loss entry) to the log history and the trackers.

            This is transformers' `Trainer.log`: TRL's override would add its running metrics (entropy, token
            accuracy, num_tokens) to this entry and clear them, taking them from the next loss entry. Logging
            clears `control.should_log`, which says whether the loss is logged after this step, so it is put back.
            """
            from transformers import Trainer

            should_log = self.control.should_log
            Trainer.log(self, dict(metrics))
            self.control.should_log = should_log

        def training_step(self, model, inputs, *args, **kwargs):
            self.micro_batch_modalities.append("i" if "pixel_values" in inputs else "t")
            with record_function("toolkit: forward + loss + backward"):
                return super().training_step(model, inputs, *args, **kwargs)

    return ToolkitSFTTrainer


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


