"""Does replay shrink what tuning costs a real model? Measure it on the converted SmolLM2 (tests/realmodel.py).

    python scripts/replay_experiment.py answers --out data/smollm2_replay_answers.jsonl [--cut-answers drop]
    python scripts/replay_experiment.py run NAME --seed 1 [--share 0.25] [--replay-data FILE] [--json results.jsonl]
    python scripts/replay_experiment.py table results.jsonl

`answers` asks the base model the English questions of the toolkit's shipped replay set
(`toolkit/assets/replay/general.jsonl`), each prompt encoded exactly as training encodes a replay row of the learning
recipe, and writes its greedy answers as a replay file (alpaca rows: the question, the base's answer). An answer that
did not end within `--max-new-tokens` (96) is kept up to the last line the model finished, or with `--cut-answers
drop` left out: training on a cut answer also teaches the model to stop there, a change of its own. These are never
the retention questions (`tests/real_general.jsonl`): those are the held-out measure.

`run` trains the learning setting of `tests/test_real_model.py` (LEARN: LoRA r=16 on every linear layer, lr 2e-3,
batch 8, 4 epochs of the 90 skyloom rows) with the given seed and replay, then runs `toolkit eval --compare-base
--retention --retention-data tests/real_general.jsonl`, as the real-model tests do, and appends one JSON line:
held-out domain term accuracy, general term accuracy, KL(tuned || base) per reference token, and the CPU and wall
seconds of sft and eval (each in its own process; CPU from wait4, so every thread is counted). Run it with
OMP_NUM_THREADS=1 for CPU times comparable to docs/real-model.md.

The model is the checkpoint the tests convert into `.pytest_cache/d/real-model/`; `--model` names another copy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import realmodel  # noqa: E402  (tests/realmodel.py: where the converted checkpoint lives)
from test_real_model import GENERAL, real_recipe  # noqa: E402  (the learning setting the tests train)

def default_model() -> Path:
    return ROOT / ".pytest_cache" / "d" / "real-model" / realmodel.BUILD_VERSION


def base_answers(model_path: Path, out: Path, max_new_tokens: int, cut_answers: str) -> dict:
    """The base model's answers to the shipped replay set's English questions, written as a replay file."""
    rows, counts = realmodel.own_replay_answers(model_path, max_new_tokens, cut_answers)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return counts


def measured(command: list[str]) -> dict:
    """Exit code, wall seconds and CPU seconds (user + system, all threads) of one command."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(time.monotonic() - start, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def run(name: str, model_path: Path, seed: int, share: float, replay_data: str | None, workdir: Path) -> dict:
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=False)
    replay_section = {"share": share, **({"data": str(Path(replay_data).resolve())} if replay_data else {})}
    data_section = {"replay": replay_section} if share > 0 else {}
    recipe = real_recipe(folder, model_path, train={"seed": seed}, data=data_section)
    toolkit = [sys.executable, "-m", "toolkit"]
    run_dir, eval_json = folder / "run", folder / "eval.json"
    sft = measured([*toolkit, "sft", str(recipe), "--output-dir", str(run_dir)])
    if sft["rc"] != 0:
        raise SystemExit(f"sft failed for {name} (exit {sft['rc']})")
    evaluation = measured([*toolkit, "eval", str(run_dir), "--compare-base", "--batch-size", "32",
                           "--max-new-tokens", "32", "--retention", "--retention-data", str(GENERAL),
                           "--json", str(eval_json)])
    if evaluation["rc"] != 0:
        raise SystemExit(f"eval failed for {name} (exit {evaluation['rc']})")
    result = json.loads(eval_json.read_text(encoding="utf-8"))
    general = result["retention"]
    losses = [e["loss"] for e in json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["log_history"]
              if "loss" in e]
    return {"name": name, "seed": seed, "share": share, "replay_data": replay_data,
            "domain_base": result["base"]["term_accuracy"], "domain": result["term_accuracy"],
            "general_base": general["base"]["term_accuracy"], "general": general["tuned"]["term_accuracy"],
            "kl_per_token": round(general["kl_per_token"], 4), "changed_share": general["changed_share"],
            "first_loss": losses[0], "last_loss": losses[-1], "sft": sft, "eval": evaluation,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "run_dir": str(run_dir)}


def table(path: Path) -> str:
    lines = ["| run | seed | share | domain term acc | general term acc | general KL/token | sft CPU / wall | "
             "eval CPU / wall |", "|---|---|---|---|---|---|---|---|"]
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        lines.append(f"| {r['name']} | {r['seed']} | {r['share']:g} | {r['domain_base']:.3f} -> {r['domain']:.3f} | "
                     f"{r['general_base']:.3f} -> {r['general']:.3f} | {r['kl_per_token']:.2f} | "
                     f"{r['sft']['cpu_s']:.0f} s / {r['sft']['wall_s']:.0f} s | "
                     f"{r['eval']['cpu_s']:.0f} s / {r['eval']['wall_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="the converted checkpoint (default: the tests')")
    verbs = parser.add_subparsers(dest="verb", required=True)
    answers = verbs.add_parser("answers", help="write the base model's own answers as a replay file")
    answers.add_argument("--out", type=Path, required=True)
    answers.add_argument("--max-new-tokens", type=int, default=96)
    answers.add_argument("--cut-answers", choices=["lines", "drop"], default="lines",
                         help="answers that did not end: kept up to their last whole line (default), or left out")
    one = verbs.add_parser("run", help="train and evaluate one setting")
    one.add_argument("name")
    one.add_argument("--seed", type=int, default=1)
    one.add_argument("--share", type=float, default=0.0)
    one.add_argument("--replay-data", default=None)
    one.add_argument("--workdir", type=Path, default=Path("/tmp/replay-experiment"))
    one.add_argument("--json", type=Path, default=Path("replay-results.jsonl"))
    shown = verbs.add_parser("table", help="the results as a markdown table")
    shown.add_argument("results", type=Path)
    args = parser.parse_args()
    model_path = args.model or default_model()
    if args.verb == "answers":
        print(json.dumps(base_answers(model_path, args.out, args.max_new_tokens, args.cut_answers), indent=1))
    elif args.verb == "run":
        result = run(args.name, model_path, args.seed, args.share, args.replay_data, args.workdir)
        with args.json.open("a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")
        print(json.dumps(result, indent=1))
    else:
        print(table(args.results))


if __name__ == "__main__":
    main()
