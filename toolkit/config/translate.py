"""Pure translators from recipe sections to the configs TRL and transformers already understand (the LoRA config is
`toolkit.model.lora.to_lora_config`, beside the rest of the LoRA logic).

No I/O and no model here: each function maps values to values, so each is tested directly.
"""

from __future__ import annotations

import dataclasses

from toolkit.config.precision import Accelerator, pad_multiple
from toolkit.training.distributed import per_process_batch, strategy_kwargs


def sft_kwargs(train, precision: str, device: Accelerator, output_dir: str, has_eval: bool,
               processes: int = 1, strategy: str = "ddp", image_loader_workers: int | None = None) -> dict:
    """SFTConfig's arguments for this recipe, as a plain dict (see `to_sft_config`). With several processes the
    recipe's global batch (batch_size x grad_accum) is kept: each process gets its share. Rows reach TRL already
    tokenized, truncated and masked (`toolkit.data.encode`), so TRL neither truncates nor re-tokenizes them.

    `image_loader_workers` is given (a number, `toolkit.data.vision.loader_workers`) when the data has image rows,
    whose batches `toolkit.data.vision.VisionCollator` builds: TRL then takes the rows as they are (its preparation
    would turn `completion_mask` into labels and drop it, and the collator reads it), the Trainer keeps the
    `image_paths` column (it drops the columns the model's forward does not name), and that many DataLoader worker
    processes, kept between epochs, open the images."""
    batch_size, grad_accum = per_process_batch(train.batch_size, train.grad_accum, processes)
    kwargs = dict(
        output_dir=output_dir,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5 reads a value below 1 as a share of the steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        seed=train.seed,
        data_seed=train.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not device.cuda,
        gradient_checkpointing=bool(train.gradient_checkpointing),  # offload is checkpointing too
        max_length=None,
        completion_only_loss=True,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show in the log (toolkit.training.trainer.FiniteGuard stops on it)
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        report_to=train.report_to,  # the Trainer reports; toolkit.training.trackers checked the packages first
        disable_tqdm=True,
        dataset_num_proc=None,
        use_liger_kernel=train.liger_kernel,
        padding_free=train.padding_free,
        pad_to_multiple_of=pad_multiple(precision) if pad_multiple(precision) > 1 else None,
    )
    kwargs.update(strategy_kwargs(strategy, bool(train.gradient_checkpointing)))
    if image_loader_workers is not None:
        kwargs.update(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                      dataloader_num_workers=image_loader_workers,
                      dataloader_persistent_workers=image_loader_workers > 0)
    if train.group_by_length:
        # The rows arrive already grouped by length, every pass included (toolkit.data.batching): read them in order.
        kwargs["train_sampling_strategy"] = "sequential"
        kwargs["num_train_epochs"] = 1
    return kwargs


def to_sft_config(train, precision: str, device: Accelerator, output_dir: str, has_eval: bool,
                  processes: int = 1, strategy: str = "ddp", image_loader_workers: int | None = None, **overrides):
    """The SFTConfig for this recipe (`sft_kwargs`); `overrides` replace single arguments (bench turns checkpoints
    off)."""
    from trl import SFTConfig

    kwargs = {**sft_kwargs(train, precision, device, output_dir, has_eval, processes, strategy, image_loader_workers),
              **overrides}
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    if "train_sampling_strategy" in kwargs and "train_sampling_strategy" not in known:
        kwargs.pop("train_sampling_strategy")  # older transformers: fall back to its own (coarser) length grouping
        kwargs["group_by_length"] = True
    if "activation_checkpointing" in known and "gradient_checkpointing" in kwargs:
        # transformers renamed it; the old name still works but warns on every run
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return SFTConfig(**kwargs)
