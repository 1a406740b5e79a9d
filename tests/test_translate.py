"""Pure translators: recipe -> SFTConfig and BitsAndBytesConfig, precision by device."""

from __future__ import annotations

import pytest

from toolkit.config.precision import Accelerator, resolve_precision
from toolkit.config.quantization import to_bnb_config
from toolkit.config.recipe import QuantizationSection, TrainSection
from toolkit.config.translate import sft_kwargs, to_sft_config
from toolkit.errors import ToolkitError

CPU = Accelerator(cuda=False, bf16=False)
H100 = Accelerator(cuda=True, bf16=True, name="NVIDIA H100")
T4 = Accelerator(cuda=True, bf16=False, name="Tesla T4")


def test_auto_precision_follows_the_device():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", H100) == "bf16"
    assert resolve_precision("auto", T4) == "fp16"


def test_precision_the_device_cannot_do_is_refused():
    with pytest.raises(ToolkitError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ToolkitError, match="not supported by Tesla T4"):
        resolve_precision("bf16", T4)


def test_bitsandbytes_configs():
    assert to_bnb_config(QuantizationSection(mode="none"), "bf16") is None
    eight = to_bnb_config(QuantizationSection(mode="8bit", int8_threshold=4.0), "bf16")
    assert eight.load_in_8bit and eight.llm_int8_threshold == 4.0
    four = to_bnb_config(QuantizationSection(mode="4bit"), "bf16")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert str(four.bnb_4bit_compute_dtype) == "torch.bfloat16"


def test_sft_config_carries_the_recipe_values():
    train = TrainSection(batch_size=4, grad_accum=3, learning_rate=1e-3, max_seq_length=300, epochs=2,
                         warmup_ratio=0.25, lr_scheduler="cosine", seed=7, save_steps=50)
    config = to_sft_config(train, "bf16", CPU, "out", has_eval=True)  # SFTConfig checks the real machine
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 3)
    assert config.learning_rate == 1e-3 and config.num_train_epochs == 2 and config.max_steps == -1
    assert config.warmup_steps == 0.25 and config.lr_scheduler_type == "cosine"
    assert config.seed == 7 and config.data_seed == 7 and config.save_steps == 50
    assert config.bf16 and not config.fp16 and config.pad_to_multiple_of == 8
    assert config.completion_only_loss is True and config.max_length is None  # rows arrive encoded and cut
    assert config.logging_nan_inf_filter is False
    assert config.eval_strategy == "no"  # no eval_steps asked for
    assert config.report_to in ([], "none", ["none"])


def test_warmup_reaches_the_trainers_schedule():
    """0.25 of 8 steps is 2 warmup steps: the learning rate climbs from 0 over the first two steps."""
    train = TrainSection(max_steps=8, warmup_ratio=0.25, lr_scheduler="constant_with_warmup")
    config = to_sft_config(train, "fp32", CPU, "o", has_eval=False)
    assert config.get_warmup_steps(8) == 2


def test_grouped_rows_are_read_in_order_once():
    grouped = to_sft_config(TrainSection(group_by_length=True, epochs=3), "fp32", CPU, "o", has_eval=False)
    assert grouped.train_sampling_strategy == "sequential" and grouped.num_train_epochs == 1 and grouped.use_cpu


TEXT_KEYS = {
    "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "max_grad_norm", "optim", "seed", "data_seed", "bf16", "fp16", "use_cpu", "gradient_checkpointing", "max_length",
    "completion_only_loss", "logging_steps", "logging_first_step", "logging_nan_inf_filter", "save_strategy",
    "save_steps", "save_total_limit", "eval_strategy", "eval_steps", "report_to", "disable_tqdm", "dataset_num_proc",
    "use_liger_kernel", "padding_free", "pad_to_multiple_of",
}


def test_a_text_recipe_sets_exactly_the_text_keys():
    kwargs = sft_kwargs(TrainSection(), "fp32", CPU, "out", has_eval=False)
    assert set(kwargs) == TEXT_KEYS
    assert kwargs["pad_to_multiple_of"] is None and kwargs["max_length"] is None  # fp32: no multiple; rows are cut


def test_an_image_recipe_adds_exactly_the_image_keys():
    """Image rows: TRL takes them as they are (the collator reads completion_mask), the image_paths column is kept,
    and the loader's workers, kept between epochs, build the batches."""
    text = sft_kwargs(TrainSection(), "bf16", CPU, "out", has_eval=False)
    images = sft_kwargs(TrainSection(), "bf16", CPU, "out", has_eval=False, image_loader_workers=3)
    assert {k: v for k, v in images.items() if k not in text} == {
        "remove_unused_columns": False, "dataset_kwargs": {"skip_prepare_dataset": True},
        "dataloader_num_workers": 3, "dataloader_persistent_workers": True}
    assert {k: images[k] for k in text} == text
    none = sft_kwargs(TrainSection(), "bf16", CPU, "out", has_eval=False, image_loader_workers=0)
    assert (none["dataloader_num_workers"], none["dataloader_persistent_workers"]) == (0, False)


def test_image_keys_reach_the_sft_config_and_overrides_still_win():
    config = to_sft_config(TrainSection(), "fp32", CPU, "o", has_eval=False, image_loader_workers=2,
                           save_strategy="no")
    assert config.remove_unused_columns is False and config.dataset_kwargs == {"skip_prepare_dataset": True}
    assert config.dataloader_num_workers == 2 and config.dataloader_persistent_workers is True
    assert config.save_strategy == "no"
    text = to_sft_config(TrainSection(), "fp32", CPU, "o", has_eval=False)
    assert text.remove_unused_columns is True and text.dataset_kwargs is None and text.dataloader_num_workers == 0
