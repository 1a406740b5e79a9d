"""One writer per run directory: two `toolkit sft` processes started at once on one directory, and the lock that
decides between them (held, released, left behind by a killed process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe

from toolkit.errors import ToolkitError
from toolkit.io import files
from toolkit.runs import rundir

HOLD_LOCK = ("import sys; from pathlib import Path; from toolkit.io.files import acquire_lock; "
             "acquire_lock(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()")


def busy_message(folder: Path, pid: int) -> str:
    return (f"{folder} is being written by another toolkit process (pid {pid} on {socket.gethostname()}); wait for "
            "it to finish or choose another directory")


@pytest.fixture()
def holder(tmp_path):
    """Another process holding tmp_path/'run''s lock until it is killed."""
    folder = tmp_path / "run"
    folder.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    yield folder, process
    process.kill()
    process.wait()


def test_a_held_lock_refuses_a_second_process_and_is_taken_over_once_its_holder_is_killed(holder):
    folder, process = holder
    with pytest.raises(ToolkitError) as err:
        files.acquire_lock(folder)
    assert str(err.value) == busy_message(folder, process.pid)
    process.send_signal(signal.SIGKILL)  # a crash: the holder never removes its lock file
    process.wait()
    assert json.loads((folder / files.LOCK).read_text(encoding="utf-8"))["pid"] == process.pid
    files.acquire_lock(folder)
    try:
        assert json.loads((folder / files.LOCK).read_text(encoding="utf-8"))["pid"] == os.getpid()
    finally:
        files.release_lock(folder)
    assert not (folder / files.LOCK).exists()


def test_a_lock_whose_holder_has_not_named_itself_yet_is_still_held(holder):
    """Between creating the lock file and writing its pid into it, a holder's lock file is empty: not stale."""
    folder, process = holder
    (folder / files.LOCK).write_text("", encoding="utf-8")
    with pytest.raises(ToolkitError) as err:
        files.acquire_lock(folder)
    assert str(err.value) == (f"{folder} is being written by another toolkit process (starting up); wait for it to "
                              "finish or choose another directory")


@pytest.mark.parametrize("content", ['{"pid": 999999999, "host": "HOST"}', "", "not json"])
def test_a_lock_file_nobody_holds_is_taken_over(tmp_path, content):
    """Left by a process that is gone (its pid, or a file cut short by a crash): nothing holds it any more."""
    (tmp_path / files.LOCK).write_text(content.replace("HOST", socket.gethostname()), encoding="utf-8")
    files.acquire_lock(tmp_path)
    assert json.loads((tmp_path / files.LOCK).read_text(encoding="utf-8"))["pid"] == os.getpid()
    files.release_lock(tmp_path)
    assert not (tmp_path / files.LOCK).exists()


def test_sft_refuses_a_run_directory_another_process_writes(holder, tiny_data, tmp_path, capsys):
    from toolkit.cli import main

    folder, process = holder
    files.write_marker(folder, "run", complete=False)
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"]})
    assert main(["sft", str(recipe), "--output-dir", str(folder), "--resume"]) == 2
    assert f"error: {busy_message(folder, process.pid)}" in capsys.readouterr().out.replace("\n", "")
    assert sorted(p.name for p in folder.iterdir()) == [files.MARKER, files.LOCK]


def test_two_sft_processes_on_one_directory_one_trains_the_other_is_refused(tmp_path, tiny_data):
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"]}, train={"max_steps": 3, "save_steps": 100})
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "toolkit", "sft", str(recipe), "--output-dir", str(run_dir)]
    env = {**os.environ, "COLUMNS": "400"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    codes = [p.returncode for p in processes]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert f"error: {busy_message(run_dir, processes[winner].pid)}" in outputs[loser]
    assert "Traceback" not in outputs[loser]
    assert files.is_complete(run_dir, "run") and not (run_dir / files.LOCK).exists()
    summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["summary"]
    assert summary["steps"] == 3 and rundir.adapter_file_problem(run_dir / rundir.ADAPTER_FILE) is None
    assert rundir.open_run(run_dir).train.max_steps == 3


def test_a_run_being_trained_is_refused_by_readers_as_such(holder, capsys):
    from toolkit.cli import main

    folder, process = holder
    files.write_marker(folder, "run", complete=False)
    assert main(["eval", str(folder)]) == 2
    assert capsys.readouterr().out.replace("\n", "") == (
        f"error: {folder} is being trained right now (pid {process.pid} on {socket.gethostname()}); wait for it to "
        "finish")


def test_a_lock_file_that_is_a_symbolic_link_is_never_written_through(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep", encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / files.LOCK).symlink_to(precious)
    with pytest.raises(ToolkitError) as err:
        files.acquire_lock(run_dir)
    assert str(err.value) == f"{run_dir / files.LOCK} is a symbolic link, not the toolkit's lock file; remove it"
    assert precious.read_text(encoding="utf-8") == "keep"
