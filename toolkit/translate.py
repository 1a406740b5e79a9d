"""Pure translators from recipe sections to the configs TRL and transformers already understand (the LoRA config is
`toolkit.lora.to_lora_config`, beside the rest of the LoRA logic).

No I/O and no model here: each function maps values to values, so each is tested directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from toolkit.distributed import per_process_batch, strategy_kwargs
from toolkit.errors import ToolkitError

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Accelerator:
    """What the training device can do; the only input precision choices depend on."""

    cuda: bool
    bf16: bool
    name: str = "cpu"


def resolve_precision(requested: str, device: Accelerator) -> str:
    """auto: bf16 where the GPU supports it, else fp16 on a GPU, fp32 on CPU. Refuses what the device cannot do."""
    if requested == "auto":
        if not device.cuda:
            return "fp32"
        return "bf16" if device.bf16 else "fp16"
    if requested == "fp16" and not device.cuda:
        raise ToolkitError("train.precision=fp16 needs a CUDA GPU and none is visible; use auto, fp32 or bf16 on CPU")
    if requested == "bf16" and device.cuda and not device.bf16:
        raise ToolkitError(f"train.precision=bf16 is not supported by {device.name}; use auto or fp16")
    return requested


def base_dtype(model_dtype: str, precision: str) -> str:
    """The torch dtype name the frozen base weights load in."""
    return DTYPE_NAMES[precision if model_dtype == "auto" else model_dtype]


def to_bnb_config(quantization, precision: str):
    """BitsAndBytesConfig for 8-bit/4-bit, None for no quantization."""
    if quantization.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = list(quantization.skip_modules) if quantization.skip_modules else None
    if quantization.mode == "8bit":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=quantization.int8_threshold, llm_int8_skip_modules=skip
        )
    compute = precision if quantization.compute_dtype == "auto" else quantization.compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=DTYPE_NAMES[compute],
        bnb_4bit_quant_storage=DTYPE_NAMES[compute],
        llm_int8_skip_modules=skip,
    )


def sft_kwargs(train, precision: str, device: Accelerator, output_dir: str, has_eval: bool,
               processes: int = 1, strategy: str = "ddp") -> dict:
    """SFTConfig's arguments for this recipe, as a plain dict (see `to_sft_config`). With several processes the
    recipe's global batch (batch_size x grad_accum) is kept: each process gets its share. Rows reach TRL already
    tokenized, truncated and masked (`toolkit.encode`), so TRL neither truncates nor re-tokenizes them."""
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
        logging_nan_inf_filter=False,  # a NaN loss must show in the log (toolkit.trainer.FiniteGuard stops on it)
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        report_to=train.report_to,  # the Trainer reports; toolkit.trackers checked the packages first
        disable_tqdm=True,
        dataset_num_proc=None,
        use_liger_kernel=train.liger_kernel,
        pad_to_multiple_of=8 if precision in ("bf16", "fp16") else None,
    )
    kwargs.update(strategy_kwargs(strategy, bool(train.gradient_checkpointing)))
    if train.group_by_length:
        # The rows arrive already grouped by length, every pass included (toolkit.batching): read them in order.
        kwargs["train_sampling_strategy"] = "sequential"
        kwargs["num_train_epochs"] = 1
    return kwargs


def to_sft_config(train, precision: str, device: Accelerator, output_dir: str, has_eval: bool,
                  processes: int = 1, strategy: str = "ddp", **overrides):
    """The SFTConfig for this recipe; `overrides` replace single arguments (bench turns checkpoints off)."""
    from trl import SFTConfig

    kwargs = {**sft_kwargs(train, precision, device, output_dir, has_eval, processes, strategy), **overrides}
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    if "train_sampling_strategy" in kwargs and "train_sampling_strategy" not in known:
        kwargs.pop("train_sampling_strategy")  # older transformers: fall back to its own (coarser) length grouping
        kwargs["group_by_length"] = True
    if "activation_checkpointing" in known and "gradient_checkpointing" in kwargs:
        # transformers renamed it; the old name still works but warns on every run
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return SFTConfig(**kwargs)
