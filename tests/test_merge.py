"""`toolkit merge`: a plain model folder whose logits are base + adapter's, not the base's."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_recipe

from toolkit import api
from toolkit.cli import main
from toolkit.errors import ToolkitError

ROW = {"instruction": "다음 건설 용어를 설명하세요.", "input": "양생"}


def prompt_logits(model, tokenizer, recipe) -> torch.Tensor:
    from toolkit.data.encode import prompt_ids
    from toolkit.data.reading import Row

    ids = torch.tensor([prompt_ids(Row("merge-test", 1, ROW), recipe.data, tokenizer)])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def merged_fp32(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    assert main(["merge", str(tiny_run), "--output", str(out), "--dtype", "fp32"]) == 0
    return out


def test_merged_folder_loads_without_peft_and_matches_base_plus_adapter(tiny_run, merged_fp32):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from toolkit.runs.rundir import load_trained

    peft_model, tokenizer, recipe = load_trained(tiny_run, quantize=False)
    with_adapter = prompt_logits(peft_model, tokenizer, recipe)
    with peft_model.disable_adapter():
        base = prompt_logits(peft_model, tokenizer, recipe)
    merged = AutoModelForImageTextToText.from_pretrained(merged_fp32).eval()
    assert not hasattr(merged, "peft_config")
    logits = prompt_logits(merged, AutoTokenizer.from_pretrained(merged_fp32), recipe)
    assert (logits - with_adapter).abs().max().item() < 1e-3
    assert (logits - base).abs().max().item() > 0.1  # the adapter is visible, so the check above can fail


def test_merged_folder_is_complete_and_adapter_free(merged_fp32):
    from transformers import AutoProcessor, GenerationConfig

    names = {p.name for p in merged_fp32.iterdir()}
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.startswith("adapter_") or n.endswith(".bin") for n in names)
    assert "peft" not in (merged_fp32 / "config.json").read_text(encoding="utf-8").lower()
    assert AutoProcessor.from_pretrained(merged_fp32).tokenizer.chat_template
    assert GenerationConfig.from_pretrained(merged_fp32).eos_token_id
    report = json.loads((merged_fp32 / "merge_report.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["max_abs_delta"] <= report["tolerance"] < report["adapter_effect"]
    from toolkit.io.files import usual_mode

    assert merged_fp32.stat().st_mode & 0o777 == usual_mode(directory=True)  # not the staging folder's 0o700
    assert [p.name for p in merged_fp32.iterdir() if p.stat().st_mode & 0o777 != usual_mode()] == []


def test_bf16_merge_passes_its_default_tolerance(tiny_run, tmp_path):
    out = tmp_path / "bf16"
    assert main(["merge", str(tiny_run), "--output", str(out), "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["dtype"] == "bfloat16"


def test_check_fails_when_the_tolerance_is_too_tight(tiny_run, tmp_path, capsys):
    args = ["--output", str(tmp_path / "m"), "--dtype", "bf16", "--tolerance", "1e-9"]
    assert main(["merge", str(tiny_run), *args]) == 1
    assert "do not use it" in capsys.readouterr().out


def test_a_merged_model_off_by_one_percent_fails(tiny_run, tmp_path, monkeypatch, capsys):
    """Logits 1% larger than base + adapter's (every one, the largest included) fail fp32's default tolerance, and
    nothing is written to --output."""
    from toolkit.export import merging

    load_saved = merging.load_saved

    def one_percent_off(out, dtype, device):
        model = load_saved(out, dtype, device)
        with torch.no_grad():
            model.lm_head.weight.mul_(1.01)
        return model

    monkeypatch.setattr(merging, "load_saved", one_percent_off)
    assert main(["merge", str(tiny_run), "--output", str(tmp_path / "m"), "--dtype", "fp32"]) == 1
    out = capsys.readouterr().out.replace("\n", "")
    assert "not within tolerance" in out and "do not use it" in out
    assert list(tmp_path.iterdir()) == []


def test_8bit_adapter_merges_into_full_precision_base(tiny_data, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 3})
    run_dir = api.train(recipe, tmp_path / "run8", overrides=["quantization.mode=8bit"]).path
    capsys.readouterr()
    out = tmp_path / "merged8"
    assert main(["merge", str(run_dir), "--output", str(out), "--dtype", "fp32"]) == 0
    assert "trained against a quantized (8bit) base" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config and config["dtype"] == "float32"


def test_non_empty_output_needs_overwrite(tiny_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    assert main(["merge", str(tiny_run), "--output", str(out)]) == 2
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_output_may_not_be_the_run(tiny_run):
    assert main(["merge", str(tiny_run), "--output", str(tiny_run), "--overwrite"]) == 2
    assert (tiny_run / "adapter_model.safetensors").is_file()


def test_adapter_traces_are_found(tmp_path):
    from toolkit.export.merging import adapter_traces

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"quantization_config": {}}}), encoding="utf-8")
    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    assert len(adapter_traces(tmp_path)) == 2
    (tmp_path / "adapter_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}), encoding="utf-8")
    assert adapter_traces(tmp_path) == []


def test_a_merged_model_never_replaces_what_another_process_wrote_meanwhile(tmp_path):
    """Two merges into one new --output: the one that finishes second finds the folder filled and leaves it."""
    from toolkit.errors import ToolkitError
    from toolkit.export.merging import put_in_place
    from toolkit.io import files

    staging, out = tmp_path / ".merged.merging-1", tmp_path / "merged"
    staging.mkdir()
    files.write_marker(staging, "merged", complete=True)
    out.mkdir()
    files.write_marker(out, "merged", complete=True)
    (out / "model.safetensors").write_bytes(b"the other merge's")
    with pytest.raises(ToolkitError) as err:
        put_in_place(staging, out, overwrite=False)
    assert str(err.value) == (f"--output {out} was filled while this merge ran (another process?); nothing was "
                              "replaced. Pass --overwrite to replace it or choose another directory")
    assert (out / "model.safetensors").read_bytes() == b"the other merge's"


def test_merges_check_prompts_are_whole_conversations(tmp_path):
    """The check runs the run's own rows as eval prompts them: system turn and earlier turns included."""
    from toolkit.config.recipe import recipe_from_dict
    from toolkit.data import encode, reading
    from toolkit.export.merging import verify_prompts
    from toolkit.model import loading

    turns = [{"role": "system", "content": "행 시스템"}, {"role": "user", "content": "첫 질문"},
             {"role": "assistant", "content": "첫 답"}, {"role": "user", "content": "둘째 질문"},
             {"role": "assistant", "content": "둘째 답"}]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": turns}, ensure_ascii=False) + "\n", encoding="utf-8")
    recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"},
                               "data": {"train": str(rows), "formatter": "messages"}})
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    prompts = verify_prompts(recipe, tokenizer, with_image=False, scratch=tmp_path)
    example = encode.encode_rows(reading.parse_rows(rows, recipe.data)[0], recipe.data, tokenizer, 512).examples[0]
    assert len(prompts) == 1
    text = tokenizer.decode(prompts[0].input_ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert "행 시스템<|eot_id|>" in text and "첫 질문<|eot_id|>" in text and "첫 답<|eot_id|>" in text
    assert text.endswith("둘째 질문<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompts[0].input_ids == example.input_ids[: len(prompts[0].input_ids)]


def test_merge_from_python_makes_the_commands_folder(tiny_run, merged_fp32, tmp_path):
    from safetensors.torch import load_file

    from toolkit.export import merging

    out = tmp_path / "api"
    report = api.merge(api.Run.open(tiny_run), out, dtype="fp32")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in merged_fp32.iterdir())
    assert json.loads((out / merging.REPORT_FILE).read_text(encoding="utf-8")) == report
    command = json.loads((merged_fp32 / merging.REPORT_FILE).read_text(encoding="utf-8"))
    assert report == command and report["passed"] is True and report["dtype"] == "fp32"
    ours, theirs = load_file(out / "model.safetensors"), load_file(merged_fp32 / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert (out / "config.json").read_bytes() == (merged_fp32 / "config.json").read_bytes()


def test_merge_from_python_refuses_a_folder_it_did_not_make_with_the_commands_line(tiny_run, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine", encoding="utf-8")
    for overwrite, flags in ((False, []), (True, ["--overwrite"])):
        with pytest.raises(ToolkitError) as refused:
            api.merge(tiny_run, theirs, overwrite=overwrite)
        capsys.readouterr()
        assert main(["merge", str(tiny_run), "--output", str(theirs), *flags]) == 2
        assert " ".join(capsys.readouterr().out.split()) == " ".join(f"error: {refused.value}".split())
        assert sorted(p.name for p in theirs.iterdir()) == ["keep.txt"]
    assert str(refused.value) == (f"--output {theirs} is not made by toolkit (no .toolkit.json); --overwrite only "
                                  "replaces a merged directory the toolkit made. Remove it yourself or choose another "
                                  "directory")
    assert (theirs / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_a_merge_from_python_that_fails_its_check_raises_and_writes_nothing(tiny_run, tmp_path):
    from toolkit.export import merging

    with pytest.raises(merging.CheckFailed) as failed:
        api.merge(tiny_run, tmp_path / "m", dtype="bf16", tolerance=1e-9)
    assert str(failed.value).startswith("the merged model differs from base + adapter by ")
    assert str(failed.value).endswith(f"not within tolerance 1e-09; do not use it. Nothing was written to "
                                      f"{tmp_path / 'm'} (--dtype fp32 rounds less; --tolerance if this is expected)")
    assert failed.value.report["passed"] is False and failed.value.traces == []
    assert list(tmp_path.iterdir()) == []
    for bad, message in (({"dtype": "fp8"}, "--dtype fp8: choose one of bf16, fp16, fp32"),
                         ({"tolerance": float("nan")}, "--tolerance: must be a positive number, got nan"),
                         ({"max_shard_size": "abc"}, "--max-shard-size: give a size such as 500MB or 5GB, got 'abc'")):
        with pytest.raises(ToolkitError, match=f"^{re.escape(message)}$"):
            api.merge(tiny_run, tmp_path / "m", **bad)
    assert list(tmp_path.iterdir()) == []
