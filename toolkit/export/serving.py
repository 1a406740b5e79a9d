"""How to serve a merged model: `toolkit merge` writes SERVING.md, and an Ollama Modelfile where Ollama can import
the architecture, into the merged folder before it is checked and put in place.

Which engine runs which architecture was read in each engine's own source in August 2026; SERVING.md names where,
so a reader can check it again:
- vLLM: `vllm/model_executor/models/registry.py` lists `MllamaForConditionalGeneration` in
  `_PREVIOUSLY_SUPPORTED_MODELS` with last version "0.10.2" (encoder-decoder models other than Whisper were removed
  with the V0 engine, vLLM PR #24907); support had come with PR #8811 (September 2024). `LlamaForCausalLM` is in its
  text-generation registry.
- SGLang: `docs/supported_models/text_generation/multimodal_language_models.md` lists Llama 3.2 Vision (11B) and
  launches it with `python3 -m sglang.launch_server --model-path ...`; `generative_models.md` lists Llama 2/3.x/4.
- Text Generation Inference: `docs/source/supported_models.md` lists Mllama and Llama; Mllama arrived in v2.3.1
  (commit d18ed5c, "Mllama flash version"); the README says TGI is in maintenance mode and shows the docker command;
  `--model-id` may be a local folder saved by `save_pretrained` (launcher/src/main.rs).
- Ollama: `convert/convert.go` converts `MllamaForConditionalGeneration` from v0.7.0 (convert_mllama.go) through
  v0.24.0; v0.30.0 removed Ollama's own model implementations and runs GGUF models with llama.cpp's llama-server
  (PR #16031), and `integration/reg_release_test.go` disables llama3.2-vision "until llama.cpp supports mllama".
  `docs/import.mdx` lists Llama 2/3/3.1/3.2 among the architectures `ollama create` imports from safetensors;
  `ollama show NAME --template` exists in v0.24.0 (cmd/cmd.go).
- llama.cpp: no mllama architecture (as above); `LlamaForCausalLM` converts with its `convert_hf_to_gguf.py`.
The merged folder keeps the checkpoint's original tensor names (transformers reverses its load-time renaming on
save), which is the layout these converters read.
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.io import files

SERVING_FILE = "SERVING.md"
MODELFILE = "Modelfile"
TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.5"
LOADERS = {"MllamaForConditionalGeneration": "AutoModelForImageTextToText"}  # else AutoModelForCausalLM


def architecture(folder: Path) -> str:
    """The model class the folder's config.json names (what engines dispatch on)."""
    try:
        names = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        names = []
    return names[0] if names and isinstance(names[0], str) else "unknown"


def engine_rows(architecture_name: str, name: str) -> list[tuple[str, str, str]]:
    """(engine, whether it runs this architecture, command) for the architectures the toolkit trains."""
    tgi = f'docker run --gpus all --shm-size 1g -p 8080:80 -v "$PWD/{name}:/data" {TGI_IMAGE} --model-id /data'
    sglang = f"python3 -m sglang.launch_server --model-path {name} --port 30000"
    ollama = f"cd {name} && ollama create {name} -f {MODELFILE}"
    if architecture_name == "MllamaForConditionalGeneration":
        return [
            ("vLLM", "0.10.2 and earlier: support came with vLLM PR #8811 (September 2024) and went with its V0 "
                     "engine; vLLM's model registry lists the architecture as previously supported, last in 0.10.2",
             f"`pip install vllm==0.10.2`, then `vllm serve {name}`"),
            ("SGLang", "yes: Llama 3.2 Vision is in SGLang's list of multimodal models", f"`{sglang}`"),
            ("Text Generation Inference", "2.3.1 and later (TGI itself is in maintenance mode)", f"`{tgi}`"),
            ("Ollama", "0.7.0 to 0.24.0 import and run it; 0.30.0 and later run models through llama.cpp, which "
                       "has no Mllama support",
             f"with an Ollama in that range: `{ollama}`; see the chat template it chose with "
             f"`ollama show {name} --template`"),
            ("llama.cpp", "no: it has no Mllama architecture (Ollama's own tests wait for it: \"re-enable when "
                          "llama.cpp supports mllama\")", "-"),
        ]
    if architecture_name == "LlamaForCausalLM":
        return [
            ("vLLM", "yes (in its model registry)", f"`vllm serve {name}`"),
            ("SGLang", "yes (Llama 2, 3.x and 4 are in its model list)", f"`{sglang}`"),
            ("Text Generation Inference", "yes (TGI itself is in maintenance mode)", f"`{tgi}`"),
            ("Ollama", "yes: its import guide names Llama 3, 3.1 and 3.2",
             f"`{ollama}`; see the chat template it chose with `ollama show {name} --template`"),
            ("llama.cpp", "yes, after conversion to GGUF",
             f"`python convert_hf_to_gguf.py {name} --outfile {name}.gguf`, then `llama-server -m {name}.gguf`"),
        ]
    return []


FILLED_TILES_NOTE = (
    "The adapter was trained with `data.vision_tiles: filled`: the vision tower ran only the tiles each image fills, "
    "with the padded tiles hidden from its attention. transformers and the engines below run every image as the "
    "model's 4 tiles, where real patches also read the padded tiles, so an image's features there differ slightly "
    "from the ones the adapter was trained and checked on (`toolkit eval` and `toolkit generate` use the run's "
    "tiling). Text prompts are not affected.")


def serving_text(name: str, architecture_name: str, dtype: str, run: str, vision_tiles: str = "padded") -> str:
    """SERVING.md: what the folder is, how to load it, and which engines serve it (with their versions)."""
    loader = LOADERS.get(architecture_name, "AutoModelForCausalLM")
    lines = [
        f"# Serving `{name}`",
        "",
        f"`{name}` is a full model, not an adapter: `toolkit merge` folded the LoRA adapter of the run `{run}` into "
        f"its base weights (architecture `{architecture_name}`, dtype `{dtype}`) and checked the result against base "
        "+ adapter (merge_report.json). The tokenizer, chat template and (for vision models) image processor are in "
        "this folder, so it loads with transformers alone:",
        "",
        "```python",
        f"from transformers import {loader}",
        f'model = {loader}.from_pretrained("{name}")',
        "```",
        "",
        "Ask it in the format it was trained on: its chat template (`chat_template.jinja`), which the engines below "
        "apply to chat requests.",
        "",
        *([FILLED_TILES_NOTE, ""] if vision_tiles == "filled" else []),
        "## Engines",
        "",
    ]
    rows = engine_rows(architecture_name, name)
    if not rows:
        lines.append(f"The toolkit has no serving notes for `{architecture_name}`; look for it in your engine's list "
                     "of supported architectures.")
        return "\n".join(lines) + "\n"
    lines += [
        f"Which engines run `{architecture_name}`, as read in each engine's own source and documentation in August "
        "2026 (vLLM: `vllm/model_executor/models/registry.py`; SGLang and TGI: their supported-model docs; Ollama: "
        "`convert/convert.go` by release tag and `integration/reg_release_test.go`):",
        "",
        "| engine | runs it | serve this folder (from its parent folder) |",
        "|---|---|---|",
    ]
    lines += [f"| {engine} | {support} | {command} |" for engine, support, command in rows]
    return "\n".join(lines) + "\n"


def modelfile_text(architecture_name: str, name: str) -> str | None:
    """An Ollama Modelfile importing this folder, for architectures Ollama's importer converts; None otherwise."""
    if architecture_name == "MllamaForConditionalGeneration":
        versions = ("# Ollama 0.7.0 to 0.24.0 import this architecture (MllamaForConditionalGeneration); 0.30.0 and "
                    "later cannot run it.\n")
    elif architecture_name == "LlamaForCausalLM":
        versions = ""
    else:
        return None
    return f"{versions}# In this folder: ollama create {name} -f {MODELFILE}   (see {SERVING_FILE})\nFROM .\n"


def write_serving_files(folder: Path, name: str, dtype: str, run: str, vision_tiles: str = "padded") -> list[str]:
    """Write SERVING.md (and a Modelfile where Ollama can import the model) into `folder`; returns the file names.

    `name` is the folder name the model will have once it is in place (`folder` may be a staging folder)."""
    architecture_name = architecture(folder)
    files.write_text_atomic(folder / SERVING_FILE, serving_text(name, architecture_name, dtype, run, vision_tiles))
    written = [SERVING_FILE]
    modelfile = modelfile_text(architecture_name, name)
    if modelfile is not None:
        files.write_text_atomic(folder / MODELFILE, modelfile)
        written.append(MODELFILE)
    return written
