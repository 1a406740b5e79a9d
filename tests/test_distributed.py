"""Several processes keep the recipe's global batch: two CPU processes (gloo) train the same adapter as one."""

from __future__ import annotations

import json

import pytest
from conftest import term_rows, tiny_recipe, write_jsonl
from PIL import Image
from safetensors.torch import load_file

from toolkit.cli import main
from toolkit.data.batching import shared_modality_batches
from toolkit.errors import ToolkitError
from toolkit.training.distributed import per_process_batch, strategy_kwargs


def test_every_split_keeps_the_global_batch_or_is_refused():
    for batch_size in range(1, 13):
        for grad_accum in range(1, 9):
            for processes in range(1, 9):
                try:
                    micro, accum = per_process_batch(batch_size, grad_accum, processes)
                except ToolkitError:
                    assert batch_size % processes and grad_accum % processes
                    continue
                assert micro * accum * processes == batch_size * grad_accum, (batch_size, grad_accum, processes)


def test_global_batch_is_split_over_processes():
    assert per_process_batch(2, 4, 1) == (2, 4)
    assert per_process_batch(2, 4, 2) == (2, 2)  # fewer accumulation steps first
    assert per_process_batch(24, 1, 2) == (12, 1)  # then smaller micro-batches
    assert per_process_batch(24, 1, 8) == (3, 1)
    with pytest.raises(ToolkitError, match="cannot be split evenly over 5 processes"):
        per_process_batch(24, 1, 5)


def test_strategies_translate_to_trainer_arguments():
    assert strategy_kwargs("ddp", True) == {}
    fsdp = strategy_kwargs("fsdp", True)
    assert fsdp["fsdp"] == "full_shard auto_wrap" and fsdp["gradient_checkpointing"] is False
    assert fsdp["fsdp_config"]["activation_checkpointing"] is True
    assert "MllamaSelfAttentionDecoderLayer" in fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"]
    zero3 = json.loads(open(strategy_kwargs("zero3", False)["deepspeed"], encoding="utf-8").read())
    assert zero3["zero_optimization"]["stage"] == 3


def test_two_processes_train_the_same_adapter_as_one(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"], "eval": None},
                         train={"max_steps": 4, "batch_size": 2, "grad_accum": 2})
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["sft", str(recipe), "--output-dir", str(one)]) == 0
    assert main(["sft", str(recipe), "--output-dir", str(two), "--gpus", "2"]) == 0
    first, second = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] - second[name]).abs().max() < 1e-5, name
    history = json.loads((two / "metrics.json").read_text(encoding="utf-8"))
    assert history["summary"]["steps"] == 4
    single = json.loads((one / "metrics.json").read_text(encoding="utf-8"))
    logged = [[(e["step"], e["loss"], e["grad_norm"]) for e in h["log_history"] if "loss" in e] for h in (single, history)]
    assert [step for step, _, _ in logged[1]] == [1, 2, 4]  # the loss is per token over both processes' rows
    for (_, loss, norm), (_, loss2, norm2) in zip(*logged, strict=True):
        assert loss2 == pytest.approx(loss, rel=1e-5) and norm2 == pytest.approx(norm, rel=1e-4)
    assert (two / "recipe.yaml").exists() and (two / "loss.png").exists()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_commands(recipe, run_dir, *extra) -> list[list[str]]:
    """The two-node launch of the README, both nodes on this host (gloo), started by torchrun itself."""
    import sys

    port = free_port()
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "toolkit", "sft", str(recipe), "--output-dir", str(run_dir), *extra] for rank in (0, 1)]


def run_nodes(commands, timeout: float = 300) -> list:
    """(exit code, output) of each node. Each writes to a file of its own rather than a pipe that nobody reads while
    the test waits for the other node (a full pipe blocks its node). Nodes still running after `timeout` seconds
    are killed and the test fails with what each printed, so a hang says where it hung."""
    import contextlib
    import subprocess
    import tempfile

    with contextlib.ExitStack() as files:
        outputs = [files.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8")) for _ in commands]
        nodes = [subprocess.Popen(c, stdout=out, stderr=subprocess.STDOUT, text=True)
                 for c, out in zip(commands, outputs)]
        hung = False
        try:
            codes = [node.wait(timeout=timeout) for node in nodes]
        except subprocess.TimeoutExpired:
            hung = True
        finally:
            for node in nodes:
                if node.poll() is None:  # a node left hanging is not left running after the test
                    node.kill()
                    node.wait()
        for out in outputs:
            out.seek(0)
        printed = [out.read() for out in outputs]
    if hung:
        pytest.fail(f"a node was still running after {timeout:g} s; what each printed:\n" +
                    "\n".join(f"--- node {rank} (exit {node.returncode}) ---\n{text[-4000:]}"
                              for rank, (node, text) in enumerate(zip(nodes, printed))))
    return list(zip(codes, printed))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, tiny_data) -> dict:
    """One process, four steps with a checkpoint every two."""
    folder = tmp_path_factory.mktemp("nodes")
    recipe = tiny_recipe(folder, {"train": tiny_data["train"], "eval": None},
                         train={"max_steps": 4, "batch_size": 2, "grad_accum": 2, "save_steps": 2})
    assert main(["sft", str(recipe), "--output-dir", str(folder / "one")]) == 0
    return {"recipe": recipe, "one": folder / "one", "folder": folder}


def interrupted_copy(run_dir, target):
    """The run as a crash after checkpoint-2 leaves it: marked incomplete, no later checkpoint."""
    import shutil

    from toolkit.io import files

    shutil.copytree(run_dir, target)
    shutil.rmtree(target / "checkpoint-4")
    files.write_marker(target, "run", complete=False)
    return target


def assert_same_adapter(first_dir, second_dir):
    first = load_file(str(first_dir / "adapter_model.safetensors"))
    second = load_file(str(second_dir / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] - second[name]).abs().max() < 1e-5, name


@pytest.fixture(scope="module")
def two_nodes(four_steps):
    """The same run as two nodes of one process each, both on this host."""
    two = four_steps["folder"] / "two"
    results = run_nodes(node_commands(four_steps["recipe"], two))
    assert [code for code, _ in results] == [0, 0], results
    return two


def test_two_nodes_started_by_torchrun_train_the_same_adapter_as_one_process(four_steps, two_nodes):
    two = two_nodes
    assert_same_adapter(four_steps["one"], two)
    assert json.loads((two / "metrics.json").read_text(encoding="utf-8"))["summary"]["steps"] == 4
    assert json.loads((two / ".toolkit.json").read_text(encoding="utf-8"))["complete"] is True
    # The global rank 0 claims the run directory for the job: a second launch into the finished run is refused.
    before = (two / "adapter_model.safetensors").read_bytes()
    again = run_nodes(node_commands(four_steps["recipe"], two))
    assert all(code != 0 for code, _ in again), again  # torchrun exits 1 whatever its processes' codes were
    assert f"run directory {two} is not empty; pass --overwrite to replace it or --resume" in again[0][1]
    assert (two / "adapter_model.safetensors").read_bytes() == before


def test_a_node_whose_peer_never_joins_ends_in_time_and_the_run_resumes_on_one_machine(four_steps, two_nodes,
                                                                                       tmp_path, capfd):
    import time

    from toolkit.io import files

    run_dir = interrupted_copy(two_nodes, tmp_path / "run")  # checkpoint-2 written by the two-node job
    port = free_port()
    started = time.monotonic()
    code = main(["sft", str(four_steps["recipe"]), "--output-dir", str(run_dir), "--resume", "--nodes", "2",
                 "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(port),
                 "--join-timeout", "2"])
    elapsed = time.monotonic() - started
    out, err = capfd.readouterr()
    assert code == 2
    assert elapsed < 90  # the join timeout, plus starting Python and torchrun twice on a loaded machine
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: node 0: the 2 nodes did not all meet at 127.0.0.1:{port} within --join-timeout 2 s "
                      "(Timed out after 3 seconds waiting for clients. 1/2 clients joined.); nothing was trained "
                      f"and {run_dir} is unchanged: incomplete, and resumable with --resume. Start the same command "
                      "on every node (same --master-addr and --master-port), or raise --join-timeout"], out
    assert err == ""  # torchrun's traceback and c10d's socket logs are held back
    assert not files.is_complete(run_dir, "run") and [p.name for p in runs_checkpoints(run_dir)] == ["checkpoint-2"]
    # Resumed with another node count (one machine, one process), it ends in the uninterrupted one-process adapter.
    assert main(["sft", str(four_steps["recipe"]), "--output-dir", str(run_dir), "--resume"]) == 0
    assert files.is_complete(run_dir, "run")
    assert_same_adapter(four_steps["one"], run_dir)


def runs_checkpoints(run_dir):
    from toolkit.runs import rundir

    return rundir.checkpoints(run_dir)


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2"], "--nodes 2 needs --node-rank (0 to 1) and --master-addr (node 0's address) on every node"),
    (["--nodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2 is not one of the 2 nodes (0 to 1)"),
    (["--node-rank", "1"], "--node-rank and --master-addr need --nodes N (the number of machines, 2 or more)"),
])
def test_an_incomplete_node_setting_is_refused_before_anything_loads(tmp_path, argv, message, capsys):
    assert main(["sft", str(tmp_path / "missing.yaml"), *argv]) == 2
    assert capsys.readouterr().out.strip() == f"error: {message}"


def test_a_global_batch_that_does_not_split_over_the_nodes_is_refused_before_waiting(four_steps, tmp_path, capsys):
    code = main(["sft", str(four_steps["recipe"]), "--output-dir", str(tmp_path / "run"), "--nodes", "3",
                 "--node-rank", "0", "--master-addr", "127.0.0.1", "--join-timeout", "600"])
    assert code == 2
    assert capsys.readouterr().out.splitlines()[-1] == (
        "error: the global batch train.batch_size x train.grad_accum = 2 x 2 cannot be split evenly over 3 "
        "processes; make one of them divisible by 3")


COLORS = {"빨강": "red", "초록": "green", "파랑": "blue", "노랑": "yellow", "검정": "black"}


def mixed_data(folder, image_rows: int = 5):
    """Drawn colour squares with rows naming the colour, then the 12 text rows of the term data."""
    (folder / "pics").mkdir()
    rows = []
    for name, color in list(COLORS.items())[:image_rows]:
        Image.new("RGB", (40, 40), color).save(folder / "pics" / f"{color}.png")
        rows.append({"image": f"pics/{color}.png", "instruction": "이 그림은 무슨 색입니까?",
                     "output": f"{name}입니다.", "terms": [name]})
    return write_jsonl(folder / "mixed.jsonl", rows + term_rows())


def test_two_processes_take_image_and_text_steps_together(tmp_path):
    """5 image rows and 12 text rows, a global batch of 2 (one row per process): 8 steps, each an image step on
    both processes or a text step on both; the last image round holds 3 rows (2 on the first process)."""
    recipe = tiny_recipe(tmp_path, {"train": str(mixed_data(tmp_path))},
                         train={"max_steps": None, "epochs": 1, "batch_size": 2, "grad_accum": 1, "save_steps": 100})
    assert main(["sft", str(recipe), "--output-dir", str(tmp_path / "run"), "--gpus", "2"]) == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))["summary"]
    images = [True] * 5 + [False] * 12
    planned = shared_modality_batches(images, micro_batch=1, processes=2, epochs=1, seed=42)
    expected = ["".join("i" if any(images[i] for i in b) else "t" for b in planned[rank::2]) for rank in (0, 1)]
    print("micro-batch modalities per process:", summary["micro_batch_modalities"])
    assert summary["micro_batch_modalities"] == expected == ["ttttttii"] * 2
    assert summary["steps"] == 8 and summary["processes"] == 2 and summary["train_rows"] == 17


def test_too_few_image_rows_for_the_processes_stop_before_the_run(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, {"train": str(mixed_data(tmp_path, image_rows=1))}, train={"batch_size": 2})
    assert main(["sft", str(recipe), "--output-dir", str(tmp_path / "run"), "--gpus", "2"]) == 2
    assert "--gpus 2: 1 rows with images cannot give each of 2 processes an image in the same step; every process " \
           "needs an image in an image step" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_sharded_evaluation_of_mixed_rows_is_refused_before_the_run(tmp_path, capsys):
    mixed = str(mixed_data(tmp_path))
    recipe = tiny_recipe(tmp_path, {"train": mixed, "eval": mixed}, train={"batch_size": 2, "eval_steps": 2})
    assert main(["sft", str(recipe), "--output-dir", str(tmp_path / "run"), "--gpus", "2", "--strategy", "fsdp"]) == 2
    assert "--strategy fsdp evaluates rows with and without images in the same step on different processes, which " \
           "hangs a sharded model; set train.eval_steps=null" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()
