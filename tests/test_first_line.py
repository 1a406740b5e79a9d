"""What a user sees first: every command, run as the user runs it (its own process, hub offline), prints the
toolkit's own line first, and none of the dependency noise the toolkit hides (a kernels-hub publisher-trust line,
PEFT's save_embedding_layers warning, transformers' long-sequence warning, PIL's DecompressionBombWarning, raw
Python warnings with a site-packages path). `--debug` still shows them."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from conftest import term_rows, write_jsonl
from PIL import Image

NOISE = ["Skipping publisher trust check", "save_embedding_layers", "Token indices sequence length",
         "DecompressionBomb", "could be decompression bomb", "site-packages", "Warning:"]


def toolkit(args: list[str], cwd: Path) -> tuple[int, list[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("TOOLKIT_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    return done.returncode, [line for line in done.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def noisy_inputs(tmp_path_factory, tiny_data) -> dict:
    """A recipe whose data has a row far past the tokenizer's limit (300,002 tokens against 131,072), an image over PIL's bomb threshold, and LoRA on
    the embeddings (PEFT's save_embedding_layers case)."""
    folder = tmp_path_factory.mktemp("noise")
    Image.new("1", (9500, 9500)).save(folder / "huge.png")  # 90.25 megapixels, past PIL's 89.48 warning threshold
    rows = term_rows() + [{"instruction": "다음 건설 용어를 설명하세요.", "input": "가" * 300_000, "output": "틀"}]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "images.jsonl", [{"instruction": "이 도면 기호는?", "output": "문", "image": "huge.png"}])
    base = {"model": {"name": "builtin:tiny-mllama"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "embed_tokens"]},
            "train": {"max_steps": 1, "batch_size": 2, "max_seq_length": 64, "save_steps": 100, "logging_steps": 1}}
    text = {**base, "data": {"train": str(folder / "train.jsonl"), "eval": tiny_data["eval"]}}
    images = {**base, "data": {"train": [str(folder / "train.jsonl"), str(folder / "images.jsonl")]}}
    (folder / "text.yaml").write_text(yaml.safe_dump(text, allow_unicode=True), encoding="utf-8")
    (folder / "images.yaml").write_text(yaml.safe_dump(images, allow_unicode=True), encoding="utf-8")
    # LoRA targets are remembered per lora section: another rank makes validate --debug check them on a meta model
    # again, which loads bitsandbytes and its kernels-hub line, whatever the other commands cached
    debug = {**images, "lora": {**base["lora"], "r": 5}}
    (folder / "debug.yaml").write_text(yaml.safe_dump(debug, allow_unicode=True), encoding="utf-8")
    return {"folder": folder, "text": folder / "text.yaml", "images": folder / "images.yaml",
            "debug": folder / "debug.yaml", "train": folder / "train.jsonl"}


def commands(inputs: dict, run_dir: Path) -> dict[str, tuple[list[str], str]]:
    """command -> (its arguments, the toolkit's own first line as it begins)."""
    folder = inputs["folder"]
    return {
        "validate": (["validate", str(inputs["images"])], "Plan"),
        "sft": (["sft", str(inputs["text"]), "--output-dir", str(folder / "run")], "memory: est. peak"),
        "eval": (["eval", str(run_dir), "--limit", "1", "--max-new-tokens", "2", "--json", str(folder / "e.json")],
                 "tuned "),
        "extract": (["extract", str(run_dir), "--output", str(folder / "a.safetensors")], "Adapter extracted"),
        "merge": (["merge", str(run_dir), "--output", str(folder / "merged")], "Merged model"),
        "generate": (["generate", str(run_dir), "거푸집", "--max-new-tokens", "2"],
                     f"{run_dir} (base + adapter), greedy, at most 2 new tokens"),
        "bench": (["bench", str(inputs["text"]), "--steps", "1", "--warmup", "0", "--isolation", "none", "--json",
                   str(folder / "bench.json")], "recipe: as the recipe says"),
        "new-recipe": (["new-recipe", "site", "--train", str(inputs["train"])],
                       "Wrote recipes/site.yaml; checking it as toolkit validate does"),
    }


@pytest.fixture(scope="module")
def outputs(noisy_inputs, tiny_run) -> dict:
    """Every command's exit code and output lines, and `validate --debug`'s, two processes at a time."""
    planned = commands(noisy_inputs, tiny_run)
    argvs = {name: args for name, (args, _) in planned.items()}
    argvs["validate --debug"] = ["--debug", "validate", str(noisy_inputs["debug"])]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda args: toolkit(args, noisy_inputs["folder"]), argvs.values())
        return {"planned": planned, **dict(zip(argvs, done))}


DATA_BAR = "preparing data "  # the toolkit's own progress bar for reading data files (toolkit.data.datastore)


def dropwhile(predicate, lines: list[str]) -> list[str]:
    return list(itertools.dropwhile(predicate, lines))


def test_every_command_prints_the_toolkits_own_line_first_and_no_dependency_noise(outputs, noisy_inputs):
    planned = outputs["planned"]
    for name, (_, expected) in planned.items():
        code, lines = outputs[name]
        lines = dropwhile(lambda line: line.startswith(DATA_BAR), lines)  # drawn first when reading takes > 1 s
        assert lines and lines[0].strip().startswith(expected), (name, lines[:5])
        assert [line for line in lines if any(noise in line for noise in NOISE)] == [], name
        # new-recipe writes the construction recipe's GPU settings, so on a machine without one it says to fix them
        assert code == (2 if name == "new-recipe" and not torch.cuda.is_available() else 0), (name, lines[-3:])
    summary = json.loads((noisy_inputs["folder"] / "run" / "metrics.json").read_text(encoding="utf-8"))["summary"]
    assert summary["train_rows_dropped"] == 1  # the long row the hidden warning was about is counted (no answer left)


def test_debug_still_shows_the_dependency_noise(outputs):
    """The kernels-hub line is the noise validate still meets: rows are encoded through the tokenizer's batch path,
    which never calls the method that warns about long rows, and images are opened below PIL's warning."""
    code, lines = outputs["validate --debug"]
    assert code == 0
    assert "Skipping publisher trust check" in "\n".join(lines)
