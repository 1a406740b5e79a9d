"""Measure data preparation at scale: N rows of the quickstart's shape through `toolkit validate`, then
`toolkit sft --set train.max_steps=1` (which finds the data in the cache), beside `datasets.map(batched=True)` on the
same rows in the same run.

    python scripts/data_scale.py 10000 100000 1000000 [--num-proc N] [--workdir DIR] [--json out.json]

Rows are drawn from the shipped `data/construction_terms.jsonl` with a row number added to the input, so every row
is distinct and about as long as the shipped ones. Each command runs in its own process; wall time and peak
resident memory (the largest of the command's processes, and the sum over its processes sampled every 0.1 s) are
measured from outside. The datasets way renders the chat template as a string per row and tokenizes it with
`map(batched=True, num_proc=N)`, as the original example prepares its data; its time covers loading and encoding.
This is a measurement, not a test: run it on a quiet machine, and read `uptime` beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "data" / "construction_terms.jsonl"


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rows = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            row = dict(rng.choice(rows))
            row["input"] = f"{row.get('input', '')} ({i})".strip()
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and its children, from /proc (KiB)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                stack += [int(c) for c in children.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def measured(command: list[str], env: dict) -> dict:
    """Wall seconds, exit code, CPU seconds of the command and all its processes, peak RSS of its largest process
    (from wait4) and the peak summed over its processes (sampled)."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        peak_tree = 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, tree_rss_kib(process.pid))
            time.sleep(0.1)
        wall = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    return {"wall_s": round(wall, 1), "exit": process.returncode, "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "peak_tree_rss_gb": round(peak_tree / 2**20, 2),
            "notes": [line.strip(" │") for line in text.splitlines() if any(
                mark in line for mark in ("rows/s", "from the cache", "error"))][-2:]}


DATASETS_WAY = r"""
import sys, time
started = time.monotonic()
from datasets import load_dataset
from toolkit.model import loading
path, num_proc = sys.argv[1], int(sys.argv[2])
tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
def render(batch):
    texts = []
    for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
        user = f"{ins.strip()}\n\n{inp.strip()}" if inp and inp.strip() else ins.strip()
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": out.strip()}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, date_string="26 Jul 2024"))
    return tokenizer(texts, add_special_tokens=False)
loading = time.monotonic()
rows = load_dataset("json", data_files=path, split="train", keep_in_memory=False)
mapping = time.monotonic()
encoded = rows.map(render, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=rows.column_names)
done = time.monotonic()
print(f"datasets: {len(encoded)} rows; load_dataset {mapping - loading:.1f} s, map {done - mapping:.1f} s, "
      f"load+map {(done - loading):.1f} s = {len(encoded) / (done - loading):.0f} rows/s")
"""


def recipe_for(folder: Path, train: Path, num_proc: int | None) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
    recipe["data"] = {"train": str(train), "eval": str(ROOT / "data" / "construction_terms_eval.jsonl"),
                      "glossary": str(ROOT / "data" / "construction_glossary.txt"), "formatter": "alpaca"}
    if num_proc:
        recipe["data"]["num_proc"] = num_proc
    recipe["output_dir"] = str(folder / "run")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="+", type=int)
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: the usable CPUs)")
    parser.add_argument("--workdir", default=None, help="where the data, cache and runs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--skip-datasets", action="store_true")
    args = parser.parse_args()
    num_proc = args.num_proc or len(os.sched_getaffinity(0))
    results = []
    with tempfile.TemporaryDirectory(prefix="data-scale-", dir=args.workdir) as scratch:
        folder = Path(scratch)
        env = {**os.environ, "TOOLKIT_CACHE": str(folder / "cache"), "PYTHONPATH": str(ROOT),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "COLUMNS": "200"}
        # the built-in model is built once, outside the timings, in this run's cache
        subprocess.run([sys.executable, "-m", "toolkit", "validate", str(ROOT / "recipes" / "quickstart.yaml")],
                       env=env, cwd=ROOT, check=True, capture_output=True)
        for n in args.sizes:
            train = folder / f"rows-{n}.jsonl"
            write_rows(train, n)
            recipe = recipe_for(folder, train, args.num_proc)
            load = os.getloadavg()[0]
            row = {"rows": n, "num_proc": num_proc, "load_before": round(load, 2)}
            toolkit = [sys.executable, "-m", "toolkit"]
            row["validate"] = measured(toolkit + ["validate", str(recipe)], env)
            row["sft_max_steps_1"] = measured(toolkit + ["sft", str(recipe), "--set", "train.max_steps=1",
                                                         "--overwrite"], env)
            if not args.skip_datasets:
                row["datasets_map"] = measured([sys.executable, "-c", DATASETS_WAY, str(train), str(num_proc)],
                                               {**env, "HF_DATASETS_CACHE": str(folder / "hf-cache")})
            row["load_after"] = round(os.getloadavg()[0], 2)
            results.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
            train.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
