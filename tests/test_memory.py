"""The memory model behind `train.batch_size: auto`: weights by quantization, what a layer keeps per token (held to
what autograd really keeps), and the batch a budget allows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from toolkit.bench.harness import full_size_config
from toolkit.config.recipe import recipe_from_dict
from toolkit.data import encode
from toolkit.errors import ToolkitError
from toolkit.model import loading
from toolkit.training import memory


@pytest.fixture(scope="module")
def full_size():
    config = full_size_config()
    return loading.meta_model(config), config.get_text_config()


def test_weights_by_quantization(full_size):
    meta, _ = full_size
    params = sum(p.numel() for p in meta.parameters())
    bf16 = memory.weight_bytes(meta, memory.Setup())
    assert bf16 == 2 * params
    eight, four = (memory.weight_bytes(meta, memory.Setup(quantization=q)) for q in ("8bit", "4bit"))
    assert 0.25 * bf16 < four < 0.5 * bf16 < eight < 0.6 * bf16
    assert four / 2**30 == pytest.approx(6.72, abs=0.3)  # measured on the GPU: 6.72 GiB (docs/benchmarks.md)
    assert eight / 2**30 == pytest.approx(11.03, abs=0.3)  # measured: 11.03 GiB


def test_the_per_token_count_covers_what_autograd_keeps():
    """On the built-in model (CPU, fp32, no Liger), the count is an upper bound within 1.5x of the measurement."""
    from peft import get_peft_model

    from toolkit.config.recipe import LoraSection
    from toolkit.model import lora

    config = loading.load_config("builtin:tiny-mllama")
    text = config.get_text_config()
    torch.manual_seed(0)
    base = loading.model_class(config).from_config(config)
    model = get_peft_model(base, lora.to_lora_config(LoraSection(dropout=0.0)))
    tokens = 2 * 48
    ids = torch.arange(tokens).reshape(2, 48) % 900
    language_model = model.base_model.model.model.language_model
    kept = memory.saved_tensor_bytes(lambda: language_model(input_ids=ids), exclude=list(model.parameters()))
    counted = memory.text_layers(text) * memory.layer_bytes_per_token(text, memory.Setup(compute_bytes=4))
    assert kept / tokens <= counted <= 1.5 * kept / tokens


def test_checkpointing_keeps_a_fraction_except_under_llm_int8(full_size):
    _, text = full_size
    plain = memory.activation_bytes_per_token(text, memory.Setup())
    checkpointed = memory.activation_bytes_per_token(text, memory.Setup(checkpointing=True))
    assert checkpointed < plain / 5
    int8 = memory.Setup(quantization="8bit", int8_matmul="int8", checkpointing=True)
    assert memory.activation_bytes_per_token(text, int8) > 2 * checkpointed


def test_the_budget_sets_the_batch(full_size):
    meta, text = full_size
    plan = memory.plan_batch(meta, text, memory.Setup(liger=True), 376, budget_gib=62.0, rows=1000)
    assert plan.batch_size == 32 and plan.peak_gib() <= 62.0  # measured at batch 32: 62.0 GiB
    assert memory.plan_batch(meta, text, memory.Setup(liger=True), 376, 40.0, 1000).batch_size < plan.batch_size
    assert memory.plan_batch(meta, text, memory.Setup(liger=True), 376, 10_000.0, 1000).batch_size == 64
    assert memory.plan_batch(meta, text, memory.Setup(liger=True), 376, 10_000.0, 5).batch_size == 5
    with pytest.raises(ToolkitError, match="finds no batch that fits"):
        memory.plan_batch(meta, text, memory.Setup(), 376, budget_gib=20.0, rows=1000)


def tiny_recipe(**train):
    return recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "t.jsonl"}, "train": train})


def test_auto_becomes_a_number_and_a_number_stays():
    """The batch is sized by the longest row (90 tokens, 96 padded), not a typical one: 13 rows of 96 tokens fit
    2.02 GiB on the built-in model, where 20 rows of the median 60 would."""
    config = loading.load_config("builtin:tiny-mllama")
    text = config.get_text_config()
    recipe, plan = memory.resolve_batch_size(tiny_recipe(batch_size="auto", memory_budget_gib=2.02), config,
                                             [30, 90, 60] * 100, "bf16")
    assert recipe.train.batch_size == plan.batch_size == 13
    assert plan.per_row_gib == 96 * memory.activation_bytes_per_token(text, memory.Setup()) / 2**30
    median = memory.resolve_batch_size(tiny_recipe(batch_size="auto", memory_budget_gib=2.02), config, [60], "bf16")
    assert median[1].batch_size == 1  # one row: never more rows than the data has
    assert memory.plan_batch(loading.meta_model(config), text, memory.Setup(), 60, 2.02, 300).batch_size == 20
    fixed = tiny_recipe(batch_size=3)
    assert memory.resolve_batch_size(fixed, config, [30], "bf16") == (fixed, None)


def test_weights_count_follows_skip_modules():
    """Layers `quantization.skip_modules` keeps unquantized are counted at the compute dtype, by the loader's rule
    (a list replaces the default that keeps lm_head)."""
    config = loading.load_config("builtin:tiny-mllama")
    meta = loading.meta_model(config)
    eight = memory.Setup(quantization="8bit")
    vision = [m for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.vision_")]
    extra = sum(m.weight.numel() * (2 - memory.quantized_bytes_per_weight(eight, m.in_features)) for m in vision)
    skipped = memory.Setup(quantization="8bit", skip_modules=("model.vision_model", "lm_head"))
    assert len(vision) == 18 and extra > 0
    assert memory.weight_bytes(meta, skipped) - memory.weight_bytes(meta, eight) == pytest.approx(extra, abs=1)
    assert memory.weight_bytes(meta, memory.Setup(quantization="8bit", skip_modules=("lm_head",))) == \
        memory.weight_bytes(meta, eight)
    recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "t.jsonl"},
                               "quantization": {"mode": "8bit", "skip_modules": ["model.vision_model", "lm_head"]}})
    assert memory.weight_bytes(meta, memory.Setup.from_recipe(recipe, "bf16")) == memory.weight_bytes(meta, skipped)


def test_auto_plans_image_batches_by_their_vision_tokens(full_size):
    """A 4-tile image row costs more than a 1-tile ("filled") one, which costs more than a text row; the batch
    chosen fits the budget and one more row would not. Before, image rows were refused."""
    config = full_size_config()
    meta, text = full_size
    setup = memory.Setup(liger=True)
    batches = {}
    for label, images, slots in [("text", 0, 0), ("1 tile", 1, 1), ("4 tiles", 1, 4)]:
        extra = memory.image_row_bytes(config, setup, 376, images, slots)
        plan = memory.plan_batch(meta, text, setup, 376, 62.0, 1000, image_row_bytes=extra)
        assert plan.peak_gib() <= 62.0 < plan.peak_gib(plan.batch_size + 1)
        batches[label] = plan.batch_size
    assert batches["text"] > batches["1 tile"] > batches["4 tiles"] > 0
    assert memory.vision_tokens(config.vision_config, 4) == 4 * 1601


def test_plan_for_counts_the_most_images_of_any_row_and_the_runs_tiling(monkeypatch):
    config = loading.load_config("builtin:tiny-mllama")
    spec = SimpleNamespace(model_max_tiles=4)
    rows = [SimpleNamespace(images=()), SimpleNamespace(images=("a.png", "b.png"))]
    seen = {}

    def prepared(tiling):
        recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"},
                                   "data": {"train": "t.jsonl", "vision_tiles": tiling},
                                   "train": {"batch_size": "auto", "memory_budget_gib": 3}})
        return SimpleNamespace(recipe=recipe, model_config=config, precision="bf16", lengths=[40, 90],
                               train=encode.Encoding(examples=rows), image_spec=spec,
                               image_tiles={"a.png": 1, "b.png": 2})

    monkeypatch.setattr(memory, "resolve_batch_size",
                        lambda *args: seen.setdefault(args[0].data.vision_tiles, args[-2:]))
    memory.plan_for(prepared("padded"))
    memory.plan_for(prepared("filled"))
    assert seen == {"padded": (2, 4), "filled": (2, 2)}
