"""The built-in model `builtin:tiny-mllama`: a real Mllama architecture, tiny and random, built offline.

It lets every command (and every test) run with no download. It is generated deterministically on first use into a
cache directory (`$TOOLKIT_CACHE`, default `~/.cache/toolkit`) and then loaded like any local checkpoint, so the
code path is the one a hub model takes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("tiny-mllama",)
BUILD_VERSION = "v7"  # bump when the recipe below changes, so old caches are not reused

# Llama 3's special tokens in Llama 3's order; the reserved ones fill the block to 256, and `<|image|>` comes last,
# one past the text vocabulary, exactly where Llama 3.2 Vision puts it.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
SPECIAL_BLOCK = 256
IMAGE_TOKEN = "<|image|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_VOCAB_SIZE = 4000

# The chat template's own words (and its blank line), added to the BPE training text; see `bpe_training_text`.
TEMPLATE_WORDS = ["system", "user", "assistant", "Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024",
                  "\n\n"]

# CLIP's normalisation, which Llama 3.2 Vision's image processor uses.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
TILE_SIZE = 56  # 4 x 4 patches of 14 pixels: enough for a drawn symbol to look different from another
# The LM head is a scaled copy of the input embedding (tied in all but name, as in Llama 3.2 1B/3B; Mllama does not
# tie them). With the usual independent 0.02 init, a 128-wide frozen head caps every logit near 2.5 and maps hidden
# states to tokens at random; tied and scaled, the logits can reach ~20 and an adapter only has to route embeddings.
LM_HEAD_SCALE = 8.0
# The residual branches' output projections start at 3x the init std. With a tied head, a random model whose residual
# stream is mostly the current token's embedding just repeats its last prompt token (often whitespace, so it "says
# nothing"); stronger random branches make the untrained model answer with (random) words, as a base should.
BRANCH_OUTPUT_SUFFIXES = ("o_proj.weight", "down_proj.weight")
BRANCH_OUTPUT_SCALE = 3.0
# Mllama initialises the gates of its cross-attention layers at 0 (tanh(0) = 0): such a layer adds nothing, so an
# image cannot change an answer and the adapters in it get no gradient. A pretrained checkpoint has them open;
# the built-in model opens them too, so image rows behave as on the real model. Text rows skip these layers.
CROSS_ATTENTION_GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate")
CROSS_ATTENTION_GATE_VALUE = 1.0
# Llama 3.2 Vision's text shape, shrunk: 4 layers, the third a (text-only: skipped) cross-attention layer.
TEXT_SHAPE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    cross_attention_layers=[2],
    rope_theta=500000.0,
)


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit")).expanduser()


def all_special_tokens() -> list[str]:
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, SPECIAL_BLOCK - len(NAMED_SPECIAL_TOKENS) + 2)]
    return NAMED_SPECIAL_TOKENS + reserved + [IMAGE_TOKEN]


def chat_template() -> str:
    return resources.files("toolkit").joinpath("assets/llama3_vision_chat_template.jinja").read_text("utf-8")


def tokenizer_corpus() -> list[str]:
    text = resources.files("toolkit").joinpath("assets/tokenizer_corpus.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


def bpe_training_text() -> list[str]:
    """The corpus, plus the chat template's own words once per corpus line (as often as conversations use them).

    So `assistant`, `Cutting Knowledge Date` and the blank line become one or a few tokens each, as in Llama 3's own
    vocabulary, instead of a dozen single letters: rows are ~40% shorter (106 -> 63 tokens on the construction
    data), which makes every training step cheaper and puts the input term a few tokens from the answer.
    """
    corpus = tokenizer_corpus()
    return corpus + TEMPLATE_WORDS * len(corpus)


def _asset_fingerprint() -> str:
    """Changes whenever the corpus or template changes, so a stale cache is rebuilt instead of silently reused."""
    digest = hashlib.sha256((chat_template() + "\n".join(bpe_training_text())).encode("utf-8")).hexdigest()
    return digest[:10]


def builtin_dir(name: str) -> Path:
    short = name.removeprefix(BUILTIN_PREFIX)
    return cache_root() / "builtin" / f"{short}-{BUILD_VERSION}-{_asset_fingerprint()}"


def ensure_builtin(name: str) -> Path:
    """Return the directory holding the built-in model, building it first if it is not cached yet."""
    from toolkit.errors import ToolkitError

    short = name.removeprefix(BUILTIN_PREFIX)
    if short not in BUILTIN_NAMES:
        choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
        raise ToolkitError(f"unknown built-in model '{name}'; built-in models: {choices}")
    target = builtin_dir(name)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_tiny_mllama(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def train_tokenizer():
    """A Llama-3-style byte-level BPE (same split regex, same special tokens), trained on the shipped corpus."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(bpe_training_text(), trainer=trainer)
    bpe.add_special_tokens(all_special_tokens())
    bos = NAMED_SPECIAL_TOKENS[0]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token=PAD_TOKEN,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template()
    return tokenizer


def tiny_mllama_config(tokenizer):
    """A few-hundred-thousand-parameter Mllama: 4 text layers (one cross-attention), a 2+1-layer vision tower."""
    from transformers import MllamaConfig

    token_id = tokenizer.convert_tokens_to_ids
    vision_hidden = 32
    intermediate_layers = [0]
    vision = dict(
        hidden_size=vision_hidden,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        intermediate_size=64,
        image_size=TILE_SIZE,
        patch_size=14,
        max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]],
        intermediate_layers_indices=intermediate_layers,
        vision_output_dim=vision_hidden * (1 + len(intermediate_layers)),
    )
    text = dict(
        vocab_size=token_id(IMAGE_TOKEN),  # the image token sits just past the text vocabulary, as in Llama 3.2
        **TEXT_SHAPE,
        max_position_embeddings=2048,
        bos_token_id=token_id("<|begin_of_text|>"),
        eos_token_id=[token_id("<|end_of_text|>"), token_id("<|eom_id|>"), token_id("<|eot_id|>")],
        pad_token_id=token_id(PAD_TOKEN),
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=token_id(IMAGE_TOKEN))


def image_processor():
    try:
        from transformers.models.mllama.image_processing_pil_mllama import (
            MllamaImageProcessorPil as cls,
        )
    except ImportError:  # older transformers name the PIL processor plainly
        from transformers import MllamaImageProcessor as cls
    return cls(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        max_image_tiles=1,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


def init_text_weights(model, config) -> None:
    import torch

    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        model.lm_head.weight.copy_(embedding[: config.text_config.vocab_size] * LM_HEAD_SCALE)
        for name, param in model.named_parameters():
            if "language_model" in name and "cross_attn" not in name and name.endswith(BRANCH_OUTPUT_SUFFIXES):
                param.mul_(BRANCH_OUTPUT_SCALE)
            if name.endswith(CROSS_ATTENTION_GATES):
                param.fill_(CROSS_ATTENTION_GATE_VALUE)


def make_tiny_mllama():
    """The tokenizer and the random model, in memory."""
    import torch
    from transformers import MllamaForConditionalGeneration

    tokenizer = train_tokenizer()
    config = tiny_mllama_config(tokenizer)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config)
    init_text_weights(model, config)
    return model, tokenizer


def build_tiny_mllama(target: Path) -> None:
    from transformers import GenerationConfig, MllamaProcessor

    model, tokenizer = make_tiny_mllama()
    config = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(target)
    processor = MllamaProcessor(image_processor=image_processor(), tokenizer=tokenizer, chat_template=chat_template())
    processor.save_pretrained(target)
    tokenizer.save_pretrained(target)
