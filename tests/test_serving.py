"""toolkit merge writes SERVING.md (and an Ollama Modelfile where Ollama imports the architecture) into the
merged folder before it is put in place."""

from __future__ import annotations

import json

from toolkit.cli import main
from toolkit.export import merging, serving


def test_merge_writes_serving_notes_into_the_folder_before_it_is_put_in_place(tiny_run, tmp_path, monkeypatch):
    staged = {}
    original = merging.put_in_place

    def checking(staging, out, overwrite):
        staged.update({name: (staging / name).is_file() for name in (serving.SERVING_FILE, serving.MODELFILE)})
        return original(staging, out, overwrite)

    monkeypatch.setattr(merging, "put_in_place", checking)
    out = tmp_path / "site-model"
    assert main(["merge", str(tiny_run), "--output", str(out), "--dtype", "bf16"]) == 0
    assert staged == {serving.SERVING_FILE: True, serving.MODELFILE: True}
    text = (out / serving.SERVING_FILE).read_text(encoding="utf-8")
    assert text.startswith("# Serving `site-model`\n\n`site-model` is a full model, not an adapter: `toolkit merge` "
                           f"folded the LoRA adapter of the run `{tiny_run}` into its base weights (architecture "
                           "`MllamaForConditionalGeneration`, dtype `bf16`)")
    assert "| vLLM | 0.10.2 and earlier" in text and "`vllm serve site-model`" in text
    assert "| llama.cpp | no: it has no Mllama architecture" in text
    assert (out / serving.MODELFILE).read_text(encoding="utf-8") == (
        "# Ollama 0.7.0 to 0.24.0 import this architecture (MllamaForConditionalGeneration); 0.30.0 and later cannot "
        "run it.\n# In this folder: ollama create site-model -f Modelfile   (see SERVING.md)\nFROM .\n")
    assert json.loads((out / "merge_report.json").read_text(encoding="utf-8"))["passed"]


def test_text_models_and_unknown_architectures(tmp_path):
    llama = serving.serving_text("m", "LlamaForCausalLM", "fp16", "runs/r")
    assert "model = AutoModelForCausalLM.from_pretrained(\"m\")" in llama
    assert "| llama.cpp | yes, after conversion to GGUF | `python convert_hf_to_gguf.py m --outfile m.gguf`" in llama
    assert serving.modelfile_text("LlamaForCausalLM", "m") == \
        "# In this folder: ollama create m -f Modelfile   (see SERVING.md)\nFROM .\n"
    other = serving.serving_text("m", "Qwen2ForCausalLM", "bf16", "runs/r")
    assert other.endswith("The toolkit has no serving notes for `Qwen2ForCausalLM`; look for it in your engine's list "
                          "of supported architectures.\n")
    assert serving.modelfile_text("Qwen2ForCausalLM", "m") is None
    (tmp_path / "config.json").write_text("not json", encoding="utf-8")
    assert serving.architecture(tmp_path) == "unknown"
    assert serving.write_serving_files(tmp_path, "m", "bf16", "runs/r") == [serving.SERVING_FILE]
    assert not (tmp_path / serving.MODELFILE).exists()


def test_a_model_trained_on_filled_tiles_says_how_engines_differ():
    filled = serving.serving_text("m", "MllamaForConditionalGeneration", "bf16", "runs/r", vision_tiles="filled")
    assert serving.FILLED_TILES_NOTE in filled
    assert serving.FILLED_TILES_NOTE not in serving.serving_text("m", "MllamaForConditionalGeneration", "bf16",
                                                                 "runs/r")
