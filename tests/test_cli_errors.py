"""Every failure is one line naming the file and what to do (a traceback only with --debug), printed as plain
text: paths and data never act as rich markup or terminal escape sequences."""

from __future__ import annotations

import errno
import importlib
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import tiny_recipe

from toolkit import cli
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.io import files


def output(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out.replace("\n", ""), captured.err


@pytest.mark.parametrize("name", ["[bold]x[/bold]", "a[/]b", "[red]", "x[link=http://e.com]y"])
def test_markup_in_a_path_is_printed_as_written(tmp_path, capsys, name):
    path = tmp_path / name / "recipe.yaml"
    assert main(["validate", str(path)]) == 2
    out, err = output(capsys)
    assert out == f"error: recipe not found: {path}" and "Traceback" not in err


def test_escape_sequences_in_a_message_are_shown_not_sent(tmp_path, capsys):
    path = tmp_path / "clear\x1b[2Jscreen\u202eevil" / "recipe.yaml"
    assert main(["validate", str(path)]) == 2
    out, _ = output(capsys)
    assert "\x1b" not in out and "\u202e" not in out
    assert out == f"error: recipe not found: {tmp_path}/clear\\x1b[2Jscreen\\u202eevil/recipe.yaml"


@pytest.mark.parametrize("argv", [["--debug", "validate", "MISSING"], ["validate", "MISSING", "--debug"]])
def test_debug_shows_the_traceback(tmp_path, capsys, argv):
    missing = str(tmp_path / "missing.yaml")
    assert main([missing if a == "MISSING" else a for a in argv]) == 2
    out, err = output(capsys)
    assert out == f"error: recipe not found: {missing}"
    assert "Traceback (most recent call last)" in err and "ToolkitError: recipe not found" in err


def failing_load_recipe(monkeypatch, error: BaseException) -> None:
    def load_recipe(*args, **kwargs):
        raise error

    monkeypatch.setattr(importlib.import_module("toolkit.commands.validate"), "load_recipe", load_recipe)


def test_an_unexpected_error_is_one_line_that_points_at_debug(monkeypatch, capsys):
    failing_load_recipe(monkeypatch, RuntimeError("boom\nsecond line"))
    assert main(["validate", "r.yaml"]) == 1
    out, err = output(capsys)
    assert out == ("error: unexpected RuntimeError in toolkit validate: boom; run it again as toolkit --debug "
                   "validate ... to see where, and report it")
    assert err == ""
    assert main(["--debug", "validate", "r.yaml"]) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err


@pytest.mark.parametrize("code, strerror, advice", [
    (errno.ENOSPC, "No space left on device",
     "the disk is full: free space, then run the command again (an interrupted sft continues with --resume)"),
    (errno.EROFS, "Read-only file system", "that file system is read-only: choose a writable location"),
    (errno.EACCES, "Permission denied", "check the file's permissions or choose another location"),
])
def test_the_system_refusing_a_file_is_one_line_naming_it(monkeypatch, capsys, code, strerror, advice):
    failing_load_recipe(monkeypatch, OSError(code, strerror, "/data/runs/x/optimizer.pt"))
    assert main(["validate", "r.yaml"]) == 2
    out, err = output(capsys)
    assert out == f"error: /data/runs/x/optimizer.pt: {strerror}; {advice}" and err == ""


def test_an_output_directory_that_is_a_file_is_refused(tmp_path, tiny_data, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine", encoding="utf-8")
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"]}, train={"max_steps": 1})
    assert main(["sft", str(recipe), "--output-dir", str(taken)]) == 2
    assert output(capsys)[0].endswith(f"error: run directory {taken} is a file; choose a directory")
    assert taken.read_text(encoding="utf-8") == "mine"


def test_eval_json_that_is_a_directory_fails_before_generating(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--json", str(tmp_path)]) == 2
    assert output(capsys)[0] == (f"error: cannot write the summary to {tmp_path}: it is a directory; give --json a "
                                 f"file name, e.g. {tmp_path / 'eval.json'}")


@pytest.fixture()
def read_only():
    """Make a folder refuse writes: chmod for ordinary users; root ignores file modes, so there a read-only bind
    mount (needs the right to mount); otherwise the test is skipped."""
    mounted = []

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        if not files.writable(folder):
            return folder
        if shutil.which("mount") and subprocess.run(["mount", "--bind", str(folder), str(folder)],
                                                    capture_output=True).returncode == 0:
            mounted.append(folder)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, check=True)
            if not files.writable(folder):
                return folder
        pytest.skip("running as root, which file modes do not stop, without the right to mount a read-only folder")

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)
        folder.chmod(0o755)


def test_resume_on_a_read_only_run_directory_is_one_line(tmp_path, tiny_data, read_only, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    files.write_marker(run_dir, "run", complete=False)
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"]}, train={"max_steps": 1})
    read_only(run_dir)
    assert main(["sft", str(recipe), "--output-dir", str(run_dir), "--resume"]) == 2
    assert output(capsys)[0].endswith(
        f"error: cannot write the run directory {run_dir}: {run_dir} is not a writable directory (read-only disk or "
        "no permission); make it writable or choose another --output-dir")


def test_extract_merge_and_eval_into_a_read_only_folder_are_one_line(tiny_run, tmp_path, read_only, capsys):
    (tmp_path / "ro").mkdir()
    folder = read_only(tmp_path / "ro")
    assert main(["extract", str(tiny_run), "--output", str(folder / "a.safetensors")]) == 2
    assert output(capsys)[0] == f"error: cannot write {folder / 'a.safetensors'}: {folder} is not writable"
    assert main(["merge", str(tiny_run), "--output", str(folder / "merged")]) == 2
    assert output(capsys)[0] == f"error: --output {folder / 'merged'}: {folder} is not writable"
    assert main(["eval", str(tiny_run), "--json", str(folder / "eval.json")]) == 2
    assert output(capsys)[0] == (f"error: cannot write the summary to {folder / 'eval.json'}: folder {folder} is not "
                                 "writable; choose another --json")


NOISE_EXAMPLES = {  # logger -> (a record it logs as a normal run's noise, as (format, args)), one it must keep)
    "bitsandbytes.backends.cpu.ops": (("Failed to load CPU gemm_4bit_forward from kernels-community: %s", ("x",)),
                                      "Failed to load CUDA kernels"),
    "bitsandbytes.autograd._functions": (("MatMul8bitLt: inputs will be cast from torch.float32 to float16", ()),
                                         "MatMul8bitLt: something else"),
    "transformers.trainer_utils": (("mtime may not be reliable on this filesystem, falling back to numerical "
                                    "ordering", ()), "checkpoint folder is missing"),
    "kernels._internals.hf_hub": (("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                                   "because Hugging Face Hub is in offline mode.", ()),
                                  "Repository 'x/y' is not from a trusted publisher"),
    "transformers.tokenization_utils_base": (
        ("Token indices sequence length is longer than the specified maximum sequence length for this model "
         "(2000003 > 131072). Running this sequence through the model will result in indexing errors", ()),
        "Special tokens have been added in the vocabulary"),
    "liger_kernel.backends.registry": (
        ("Backend impl '%s' for op '%s' could not be imported: %s: %s",
         ("liger_kernel.ops.backends._cutedsl.rms_norm", "rms_norm", "ImportError", "No module named 'cutlass'")),
        "Backend impl 'liger_kernel.ops.backends._triton.rms_norm' for op 'rms_norm' could not be imported: x"),
}
NOISY_WARNING_EXAMPLES = [
    ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning),
    ("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.", UserWarning),
    ("Image size (144000000 pixels) exceeds limit of 89478485 pixels, could be decompression bomb DOS attack.",
     RuntimeWarning),
]


def dropped(name: str, message: str, args: tuple = ()) -> bool:
    logger = logging.getLogger(name)
    return not logger.filter(logger.makeRecord(name, logging.WARNING, "f", 1, message, args, None))


def test_known_library_noise_is_hidden_and_nothing_else():
    assert set(NOISE_EXAMPLES) == set(cli.NOISY_LOGGERS)
    cli.hide_known_noise()
    for name, ((message, args), kept) in NOISE_EXAMPLES.items():
        assert dropped(name, message, args), name
        assert not dropped(name, kept), name
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        cli.hide_known_noise()
        for message, category in NOISY_WARNING_EXAMPLES:
            warnings.warn(message, category)
        warnings.warn("some other deprecation", FutureWarning)
        warnings.warn("Setting something else", UserWarning)
    assert [str(w.message) for w in shown] == ["some other deprecation", "Setting something else"]


def test_debug_shows_the_noise_too():
    cli.hide_known_noise()
    cli.hide_known_noise(debug=True)
    try:
        for name, ((message, args), _) in NOISE_EXAMPLES.items():
            assert not dropped(name, message, args), name
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            cli.hide_known_noise()  # a command without --debug ran earlier in this process
            cli.hide_known_noise(debug=True)
            for message, category in NOISY_WARNING_EXAMPLES:
                warnings.warn(message, category)
        assert [str(w.message) for w in shown] == [message for message, _ in NOISY_WARNING_EXAMPLES]
    finally:
        cli.hide_known_noise()


def test_a_full_disk_reported_inside_a_library_error_is_one_line(monkeypatch, capsys):
    failing_load_recipe(monkeypatch, RuntimeError("Error while serializing: I/O error: No space left on device (os "
                                                  "error 28)"))
    assert main(["validate", "r.yaml"]) == 2
    assert output(capsys)[0] == ("error: Error while serializing: I/O error: No space left on device (os error 28); "
                                 "the disk is full: free space, then run the command again")


@pytest.mark.parametrize("option, message", [
    (["--tolerance", "nan"], "argument --tolerance: must be a positive number, got nan"),
    (["--tolerance", "-1"], "argument --tolerance: must be a positive number, got -1"),
    (["--max-shard-size", "abc"], "argument --max-shard-size: give a size such as 500MB or 5GB, got 'abc'"),
])
def test_merge_options_that_cannot_work_are_refused_before_merging(tiny_run, tmp_path, capsys, option, message):
    assert main(["merge", str(tiny_run), "--output", str(tmp_path / "m"), *option]) == 2
    assert f"toolkit merge: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_empty_run_directory_name_is_refused(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"]})
    assert main(["sft", str(recipe), "--output-dir", ""]) == 2
    assert output(capsys)[0] == "error: --output-dir is empty; give the run directory"
    assert main(["validate", str(recipe), "--set", "output_dir="]) == 2
    assert output(capsys)[0] == (f"error: {recipe} has 1 problem(s):  - output_dir: give a directory, or leave "
                                 "output_dir out for runs/<recipe file name>")


def test_a_file_that_appears_while_being_written_is_never_replaced(tmp_path):
    target = tmp_path / "adapter.safetensors"
    with pytest.raises(ToolkitError) as err:
        with files.staged_file(target, replace=False) as staged:
            staged.write_bytes(b"ours")
            target.write_bytes(b"another process's")
    assert str(err.value) == f"{target} appeared while this command wrote it (another process?); it was left as it is"
    assert target.read_bytes() == b"another process's" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_results_are_as_readable_as_a_plainly_written_file(tmp_path):
    previous = os.umask(0o022)
    try:
        files.write_text_atomic(tmp_path / "metrics.json", "{}")
        with files.staged_file(tmp_path / "adapter.pt") as staged:
            staged.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"metrics.json": 0o644,
                                                                              "adapter.pt": 0o644}


def test_eval_json_never_replaces_a_users_file(tiny_run, tmp_path, capsys):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}', encoding="utf-8")
    assert main(["eval", str(tiny_run), "--json", str(mine)]) == 2
    assert output(capsys)[0] == (f"error: --json {mine} exists and is not an eval summary; eval only replaces its "
                                 "own. Choose another file")
    assert mine.read_text(encoding="utf-8") == '{"my": "notes"}'


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_answer_length_is_bounded(command, capsys):
    extra = ["question"] if command == "generate" else []
    assert main([command, "runs/x", *extra, "--max-new-tokens", "100000"]) == 2
    assert "at most 8192 new tokens per answer, got 100000" in capsys.readouterr().err


def test_a_recipe_path_that_is_a_folder_says_so(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    assert output(capsys)[0] == f"error: recipe {tmp_path} is a directory; give the recipe's YAML file"


def test_a_model_folder_that_is_a_file_says_so(tmp_path, tiny_data, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    recipe = tiny_recipe(tmp_path, tiny_data, model={"name": str(weights)})
    assert main(["validate", str(recipe)]) == 2
    assert output(capsys)[0] == (f"error: model.name {weights} is a file, not a model folder; give the folder that "
                                 "holds its config.json (or a hub id)")


def test_a_merge_output_name_too_long_names_the_users_path(tiny_run, tmp_path, capsys):
    out = tmp_path / ("m" * 240)
    assert main(["merge", str(tiny_run), "--output", str(out)]) == 2
    assert output(capsys)[0] == (
        f"error: --output {out}: the name is too long; the merge builds the model beside it in a folder named after "
        "it, and this file system allows 255 bytes per name, so choose a name of at most 237 bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_once_the_merged_model_is_moving_into_place_finishes_with_0(tiny_run, tmp_path, monkeypatch, capsys):
    import signal

    from toolkit.export import merging

    original = merging.put_in_place

    def interrupted(staging, out, overwrite):
        original(staging, out, overwrite)
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C just as the model lands

    monkeypatch.setattr(merging, "put_in_place", interrupted)
    out = tmp_path / "merged"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores it)
    try:
        assert main(["merge", str(tiny_run), "--output", str(out), "--dtype", "fp32"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again afterwards
    finally:
        signal.signal(signal.SIGINT, previous)
    assert files.is_complete(out, "merged") and "Merged model in" in output(capsys)[0]


def test_once_a_command_has_returned_ctrl_c_cannot_change_its_exit_code(monkeypatch):
    """Python ends a process whose shutdown a Ctrl-C interrupts by SIGINT (exit -2); after the command returned its
    code stands."""
    import signal

    monkeypatch.setattr(cli, "main", lambda: 0)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as done:
            cli.entry()
        assert done.value.code == 0 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("err, line", [
    (ValueError("first\nsecond"), "first"),
    (ValueError("\n  \n  second line  \nthird"), "second line"),
    (KeyError(), "KeyError"),
    (RuntimeError("\n"), "RuntimeError"),
    (OSError("x" * 500), "x" * 200),
])
def test_the_first_line_of_any_exception(err, line):
    from toolkit.errors import first_line

    assert first_line(err) == line


def test_a_library_error_without_a_message_stays_one_line(monkeypatch):
    """PEFT or a chat template raising with an empty message still gives the toolkit's own one-line error."""
    import peft
    from transformers import AutoTokenizer

    from toolkit.config.recipe import LoraSection
    from toolkit.data import encode
    from toolkit.model import builtin, lora

    def refuse(*args, **kwargs):
        raise ValueError("")

    monkeypatch.setattr(peft, "get_peft_model", refuse)
    with pytest.raises(ToolkitError, match=r"^lora: PEFT refused the targets: ValueError$"):
        lora.resolve_targets(None, LoraSection())
    tokenizer = AutoTokenizer.from_pretrained(str(builtin.ensure_builtin("builtin:tiny-mllama")))
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *args, **kwargs: (_ for _ in ()).throw(ValueError()))
    with pytest.raises(ToolkitError, match=r"^the chat template refused this conversation: ValueError$"):
        encode.render_skeleton([{"role": "user", "content": "x"}], tokenizer, "26 Jul 2024", False)
