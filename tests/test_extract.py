"""`toolkit extract`: the written file holds exactly PEFT's adapter state_dict, in both formats."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.export.extraction import choose_format, mismatches, read_state_dict


@pytest.fixture(scope="module")
def peft_state(tiny_run) -> dict:
    from peft import get_peft_model_state_dict

    from toolkit.runs.rundir import load_trained

    model, _, _ = load_trained(tiny_run)
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip_matches_peft_state_dict(tiny_run, peft_state, tmp_path, fmt, capsys):
    output = tmp_path / f"adapter.{fmt}"
    assert main(["extract", str(tiny_run), "--output", str(output), "--format", fmt]) == 0
    written = read_state_dict(output, fmt)
    assert len(written) > 0
    assert list(sorted(written)) == sorted(peft_state)
    for key, tensor in peft_state.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    config = json.loads((tmp_path / "adapter.adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA"
    out = capsys.readouterr().out
    assert "Adapter extracted" in out and "identical" in out


def test_default_output_is_beside_the_run_never_inside(tiny_run, tmp_path):
    run_dir = tmp_path / "run"  # a copy: the shared run stays as training left it
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["extract", str(run_dir)]) == 0
    assert (tmp_path / "run-adapter_state_dict.safetensors").is_file()
    assert (tmp_path / "run-adapter_state_dict.adapter_config.json").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_existing_output_needs_overwrite_and_must_be_extracts_own(tiny_run, tmp_path, capsys):
    output = tmp_path / "adapter.safetensors"
    assert main(["extract", str(tiny_run), "--output", str(output)]) == 0
    inode = output.stat().st_ino
    assert main(["extract", str(tiny_run), "--output", str(output)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().out
    assert output.stat().st_ino == inode
    assert main(["extract", str(tiny_run), "--output", str(output), "--overwrite"]) == 0
    assert output.stat().st_ino != inode and read_state_dict(output, "safetensors")
    mine = tmp_path / "mine.pt"
    torch.save({"weights": torch.zeros(2)}, mine)  # a user's own file that happens to share the name
    assert main(["extract", str(tiny_run), "--output", str(mine), "--overwrite"]) == 2
    assert "was not written by toolkit extract" in capsys.readouterr().out
    assert torch.load(mine, weights_only=True)["weights"].shape == (2,)


def test_mismatches_name_every_difference():
    expected = {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2), "d": torch.zeros(2)}
    found = {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float16), "c": torch.ones(2), "e": torch.zeros(2)}
    problems = mismatches(expected, found)
    assert any("b: dtype" in p for p in problems)
    assert any("c: values differ" in p for p in problems)
    assert any("d: missing" in p for p in problems)
    assert any("e: in the file" in p for p in problems)
    assert mismatches(expected, dict(expected)) == []


def test_format_follows_the_output_suffix():
    assert choose_format("x/adapter.pt", None) == "pt"
    assert choose_format("x/adapter.safetensors", None) == "safetensors"
    assert choose_format(None, None) == "safetensors"
    assert choose_format("x/adapter.weights", "pt") == "pt"
    with pytest.raises(ToolkitError, match="--format safetensors does not match the name x/adapter.bin"):
        choose_format("x/adapter.bin", "safetensors")
    with pytest.raises(ToolkitError, match=r"--format pt does not match the name x/a.safetensors \(.safetensors is"):
        choose_format("x/a.safetensors", "pt")


def test_not_a_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["extract", str(tmp_path)]) == 2
    assert capsys.readouterr().out.replace("\n", "") == (f"error: {tmp_path} is not a finished run directory (no "
                                                         "recipe.yaml or adapter_config.json)")


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "new.safetensors"])
def test_nothing_is_written_into_the_run(tiny_run, name, capsys):
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()}
    assert main(["extract", str(tiny_run), "--output", str(tiny_run / name), "--overwrite"]) == 2
    assert "inside the run directory" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()} == before


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_extract_from_python_writes_what_the_command_writes(tiny_run, tmp_path, fmt, capsys):
    from toolkit import api
    from toolkit.export.extraction import Extracted

    done = api.extract(api.Run.open(tiny_run), tmp_path / f"api.{fmt}")
    assert main(["extract", str(tiny_run), "--output", str(tmp_path / f"cli.{fmt}")]) == 0
    from_api, from_cli = read_state_dict(tmp_path / f"api.{fmt}", fmt), read_state_dict(tmp_path / f"cli.{fmt}", fmt)
    assert sorted(from_api) == sorted(from_cli) and len(from_cli) == 32
    assert all(torch.equal(from_api[key], from_cli[key]) for key in from_cli)
    assert done == Extracted(tmp_path / f"api.{fmt}", fmt, tmp_path / "api.adapter_config.json", len(from_cli),
                             sum(t.numel() for t in from_cli.values()))
    assert done.adapter_config.read_bytes() == (tmp_path / "cli.adapter_config.json").read_bytes()
    assert "tensors identical" in capsys.readouterr().out


def test_extract_from_python_refuses_with_the_commands_line(tiny_run, tmp_path, capsys):
    from toolkit import api

    mine = tmp_path / "mine.pt"
    torch.save({"weights": torch.zeros(2)}, mine)
    for overwrite, flags in ((False, []), (True, ["--overwrite"])):
        with pytest.raises(ToolkitError) as refused:
            api.extract(tiny_run, mine, overwrite=overwrite)
        capsys.readouterr()
        assert main(["extract", str(tiny_run), "--output", str(mine), *flags]) == 2
        assert one_line(capsys.readouterr().out) == one_line(f"error: {refused.value}")
        assert torch.load(mine, weights_only=True)["weights"].shape == (2,)
    assert str(refused.value) == (f"{mine} exists and was not written by toolkit extract; --overwrite only replaces "
                                  "extract's own files. Remove it yourself or choose another --output")
