"""The vision tower runs as transformers' Mllama computes it, with less work (toolkit.model.vision_tower).

A small 4-tile Mllama (the built-in model has 1 tile) with every gate open, so tile embeddings and images change
the logits. fp32 on CPU: the split attention, the filled tiles and the native path agree to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama import modeling_mllama
from transformers.models.mllama.image_processing_pil_mllama import (
    MllamaImageProcessorPil,
)

from toolkit.data import vision
from toolkit.model import vision_tower

TILE = 28
IMAGE_ID = 99
SPEC = vision.ImageSpec(tile_size=TILE, model_max_tiles=4, max_tiles=4, patches_per_tile=5)


def four_tile_model():
    vision_config = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                         intermediate_size=64, image_size=TILE, patch_size=14, max_num_tiles=4,
                         intermediate_layers_indices=[0], vision_output_dim=64)
    text_config = dict(vocab_size=IMAGE_ID, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1], pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    config = MllamaConfig(vision_config=vision_config, text_config=text_config, image_token_index=IMAGE_ID)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate") or "gate_attn" in name or "gate_ffwd" in name:
                param.fill_(0.7)
    return model


def inputs(images, tiling="padded", ids=(1, IMAGE_ID, 5, 6, 7, 8)):
    processor = MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4)
    features, num_tiles = vision.image_features([[image] for image in images], processor, SPEC, tiling)
    ids = torch.tensor([list(ids)] * len(images))
    mask = vision.cross_attention_mask(ids, num_tiles, IMAGE_ID, features["pixel_values"].shape[2])
    return {"input_ids": ids, "cross_attention_mask": mask, **features}


def run(model, batch, attention="sdpa", tiling="padded"):
    model.model.vision_model.config._attn_implementation = attention
    if tiling == "filled":
        vision_tower.accept_fewer_tiles(model.model.vision_model)
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    noise = lambda w, h: Image.fromarray((torch.rand(h, w, 3) * 255).to(torch.uint8).numpy())  # noqa: E731
    return {"one tile": noise(20, 20), "two tiles": noise(50, 24), "four tiles": noise(50, 50)}


def test_split_attention_gives_the_native_logits_for_every_tile_count(images):
    vision_tower.register_attention()
    model = four_tile_model()
    batch = inputs(list(images.values()))
    native = run(model, batch, "sdpa")
    split = run(model, batch, vision_tower.ATTENTION["padded"])
    eager = run(model, batch, "eager")
    assert torch.allclose(native, eager, atol=1e-6)
    assert (split - native).abs().max() < 1e-6
    other_image = run(model, inputs([images["two tiles"]]), "sdpa")
    assert (other_image - native[:1]).abs().max() > 1e-3  # the image changes the logits: the check can fail


def test_the_split_attention_plans_once_per_forward_and_afresh_for_the_next_batch(images, monkeypatch):
    """Planned in every encoder layer on the GPU, the split cost more than the attention (a row-wise unique and
    a dozen syncs per layer); the plan is made once per forward, and never reused for another batch's mask."""
    vision_tower.register_attention()
    model = four_tile_model()
    plans, unique = [], torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: plans.append(1) or unique(*a, **k))
    assert model.config.vision_config.num_hidden_layers + model.config.vision_config.num_global_layers == 3
    first = inputs(list(images.values()))
    run(model, first, vision_tower.ATTENTION["padded"])
    assert len(plans) == 1
    second = inputs([images["four tiles"], images["one tile"]])
    split = run(model, second, vision_tower.ATTENTION["padded"])
    assert len(plans) == 2
    assert (split - run(model, second, "sdpa")).abs().max() < 1e-6


IMAGE_FIRST = (IMAGE_ID, 5, 6, 7, 8)  # every token reads the image


def test_a_one_tile_image_gives_the_same_logits_in_one_slot_or_four_when_filled(images):
    vision_tower.register_attention()
    model = four_tile_model()
    one, filled_attention = images["one tile"], vision_tower.ATTENTION["filled"]
    assert inputs([one], "filled")["pixel_values"].shape[2] == 1
    filled = run(model, inputs([one], "filled", IMAGE_FIRST), filled_attention, "filled")
    in_four_slots = run(model, inputs([one], "padded", IMAGE_FIRST), filled_attention, "filled")
    beside_a_bigger_image = run(model, inputs([one, images["four tiles"]], "filled", IMAGE_FIRST),
                                filled_attention, "filled")
    assert (filled - in_four_slots).abs().max() < 1e-6
    assert (filled - beside_a_bigger_image[:1]).abs().max() < 1e-6


def test_a_token_before_the_image_reads_every_tile_slot_of_its_batch(images):
    """transformers' cross-attention lets a token with no image before it attend to every vision token of the
    row's slots (it zeroes only that token's MLP branch; Meta's reference code zeroes the attention output too).
    So with "filled" tiles such a token (the user header before the image) depends on the batch's largest tile
    count; the tokens from the image on differ only through it."""
    vision_tower.register_attention()
    model = four_tile_model()
    one, filled_attention = images["one tile"], vision_tower.ATTENTION["filled"]
    filled = run(model, inputs([one], "filled"), filled_attention, "filled")
    in_four_slots = run(model, inputs([one], "padded"), filled_attention, "filled")
    assert (filled[0, 0] - in_four_slots[0, 0]).abs().max() > 1e-3
    assert (filled[0, 1:] - in_four_slots[0, 1:]).abs().max() < 1e-6  # one cross-attention layer, the last


def test_filled_differs_from_padded_only_by_the_padded_tiles_real_tokens_read(images, monkeypatch):
    """Padded and filled differ because transformers' mask (like Meta's reference code) lets a real token read the
    padded tiles; masking those tiles in the native code gives the filled logits."""
    vision_tower.register_attention()
    model = four_tile_model()
    one = images["one tile"]
    filled = run(model, inputs([one], "filled", IMAGE_FIRST), vision_tower.ATTENTION["filled"], "filled")
    padded = run(model, inputs([one], ids=IMAGE_FIRST), "sdpa")
    assert (filled - padded).abs().max() > 1e-5  # 2,000 times the rounding seen between equal paths
    native_mask = modeling_mllama._prepare_aspect_ratio_attention_mask

    def hiding_padded_tiles(aspect_ratio_mask, num_patches, target_length, dtype):
        mask = native_mask(aspect_ratio_mask, num_patches, target_length, dtype)
        padded_tile = (aspect_ratio_mask == 0).repeat_interleave(target_length, dim=1)
        return mask.masked_fill(padded_tile[:, None, None, :], torch.finfo(dtype).min)

    monkeypatch.setattr(modeling_mllama, "_prepare_aspect_ratio_attention_mask", hiding_padded_tiles)
    assert (run(model, inputs([one], ids=IMAGE_FIRST), "eager") - filled).abs().max() < 1e-6


def built_for_images(tmp_path, scope: str):
    """The trainer `sft` builds for an image data set, with gradient checkpointing, and one image batch."""
    from conftest import write_jsonl
    from datasets import Dataset

    from toolkit.config.precision import Accelerator
    from toolkit.config.recipe import recipe_from_dict
    from toolkit.data import encode, reading
    from toolkit.model import loading
    from toolkit.training import trainer

    Image.new("RGB", (40, 40), (200, 40, 40)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "instruction": "무엇입니까?", "output": "상자 그림입니다."}] * 2
    train = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = recipe_from_dict({
        "model": {"name": "builtin:tiny-mllama"}, "data": {"train": str(train)},
        "train": {"batch_size": 2, "max_steps": 1, "gradient_checkpointing": True},
        "lora": {"dropout": 0.0, "scope": scope, **({"targets": ["q_proj", "v_proj"]} if scope == "all" else {})},
    })
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    encoded = encode.encode_rows([reading.Row(str(train), i + 1, r) for i, r in enumerate(rows)], recipe.data,
                               tokenizer, 256)
    collator = vision.training_collator(recipe, loading.load_config("builtin:tiny-mllama"), tokenizer, "fp32")
    dataset = encode.to_dataset(encoded.examples)
    built, _ = trainer.build_trainer(recipe, precision="fp32", device=Accelerator(cuda=False, bf16=False),
                                     tokenizer=tokenizer, train_dataset=dataset, output_dir=str(tmp_path / "out"),
                                     data_collator=collator, save_strategy="no",
                                     image_loader_workers=vision.loader_workers(recipe, collator.images))
    return built, collator([dataset[0], dataset[1]])


@pytest.mark.parametrize("scope", ["language", "all"])
def test_checkpointing_keeps_a_frozen_vision_tower_out_of_autograd(tmp_path, scope):
    """TRL's `enable_input_require_grads` hooks the patch embedding; with nothing in the tower to train the tower's
    output must not require grad (no activations kept, no backward), and the cross-attention adapters still learn."""
    built, batch = built_for_images(tmp_path, scope)
    model = built.model
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    seen = []
    tower = vision_tower.vision_model(model)
    handle = tower.register_forward_hook(lambda _m, _i, out: seen.append(out.last_hidden_state.requires_grad))
    model(**batch).loss.backward()
    handle.remove()
    assert seen == [scope == "all"]
    cross_b = [p.grad for n, p in model.named_parameters() if "cross_attn" in n and "lora_B" in n]
    assert cross_b and all(g is not None and g.abs().sum() > 0 for g in cross_b)
    tower_grads = [p.grad for n, p in tower.named_parameters() if p.requires_grad and "lora_B" in n]  # A: 0 at B=0
    assert bool(tower_grads) == (scope == "all")
    assert all(g is not None and g.abs().sum() > 0 for g in tower_grads)
