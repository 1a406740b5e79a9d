"""What a run was started with, and whether `sft --resume` would continue that run or train a different one.

A fresh run writes `started.json` into its directory before training: the resolved recipe, the precision it
resolved to, the process count and strategy, and a fingerprint of the contents of each data file and of the images
its rows read. `--resume` compares the recipe it is given against that record before any model loads:

- a change to what is learned or how (model, quantization, LoRA, data contents, formatter, lengths, seed,
  optimizer, schedule, batch geometry, precision, strategy) is refused, every changed key in one line;
- a `train.max_steps` or `train.epochs` below what the checkpoint has already trained is refused the same way;
- what only changes what is logged, saved or shown (ACCEPTED below), and a step budget at or above what was trained,
  is accepted, and appended to the record's `resumes`, so the run keeps the recipe it started with beside what each
  resume changed;
- another process count is accepted when the recipe's global batch (batch_size x grad_accum) can be split over it,
  which keeps the batch every step trains on; one that cannot keep it is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from toolkit.training import distributed
from toolkit.io import files
from toolkit.errors import ToolkitError

START_FILE = "started.json"

# Keys that decide what is logged, saved, tracked or sampled, never what the adapter learns.
ACCEPTED = frozenset({
    "train.logging_steps", "train.save_steps", "train.save_total_limit", "train.eval_steps", "train.report_to",
    "train.sample_every", "train.sample_rows", "train.token_metrics", "data.glossary",
    "train.memory_budget_gib",  # only plans batch_size: auto, and the planned batch size itself is compared
})
IGNORED = frozenset({"output_dir"})  # where the run lives, not what it is (a moved run keeps its history)
BY_CONTENT = frozenset({"data.train", "data.eval", "data.image_root"})  # compared by the contents they name
STEP_BUDGET = frozenset({"train.max_steps", "train.epochs"})


def content_digest(path: Path) -> str:
    """sha256 of a data file's bytes, or of a folder's files (a saved dataset) with their relative names, so the
    same contents give the same digest wherever they are."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode("utf-8") + b"\0")
            digest.update(file_digest(item).encode("ascii"))
        return digest.hexdigest()
    return file_digest(path)


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fingerprints(prepared) -> dict:
    """The contents a run reads: each data file's digest, and one digest over the images in the order the rows use
    them (a different picture under the same name changes it; the same pictures in another folder do not)."""
    from toolkit.data.reading import file_list

    section = prepared.recipe.data
    found = {key: [content_digest(Path(name)) for name in file_list(value)]
             for key, value in (("data.train", section.train), ("data.eval", section.eval)) if value}
    images, seen = hashlib.sha256(), {}
    count = 0
    for example in prepared.train.examples + prepared.eval.examples:
        for path in example.images:
            if path not in seen:
                seen[path] = file_digest(Path(path))
            images.update(seen[path].encode("ascii"))
            count += 1
    found["images"] = {"count": count, "sha256": images.hexdigest()}
    return found


def changed_since_start(run_dir: Path, keys=("data.train", "data.eval")) -> list[str] | None:
    """Which of the recipe's data files (`keys`) differ now from what the run was started with, by the digests
    `started.json` keeps; None when the run has no readable record (an earlier toolkit started it). The held-out
    split (`data.eval_fraction`) is a function of data.train's contents, the fraction and the seed, so an unchanged
    data.train digest means `eval` holds out exactly the rows training held out."""
    from toolkit.data.reading import file_list

    try:
        started = read_start(run_dir)["started"]
    except ToolkitError:
        return None
    recorded, section = started.get("contents") or {}, started["recipe"].get("data") or {}
    changed = []
    for key in keys:
        value = section.get(key.split(".", 1)[1])
        if not value:
            continue
        try:
            now = [content_digest(Path(name)) for name in file_list(value)]
        except OSError:
            now = None
        if now != recorded.get(key):
            changed.append(key)
    return changed


def start_record(prepared, processes: int, strategy: str) -> dict:
    """What this run is started (or resumed) with, in the form `started.json` keeps."""
    return {"recipe": prepared.recipe.model_dump(mode="json"), "precision": prepared.precision,
            "processes": processes, "strategy": strategy, "contents": fingerprints(prepared)}


def write_start(run_dir: Path, record: dict) -> None:
    files.write_text_atomic(run_dir / START_FILE, json.dumps({"started": record, "resumes": []}, indent=2,
                                                             ensure_ascii=False) + "\n")


def read_start(run_dir: Path) -> dict:
    path = run_dir / START_FILE
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToolkitError(f"--resume: {run_dir} does not record what it was started with (no {START_FILE}: an "
                           "earlier toolkit started it), so continuing it cannot be checked; start a new run with "
                           "--overwrite or another --output-dir") from None
    except (OSError, ValueError):
        kept = None
    if not (isinstance(kept, dict) and isinstance(kept.get("started"), dict) and isinstance(kept.get("resumes"), list)
            and isinstance(kept["started"].get("recipe"), dict)):
        raise ToolkitError(f"--resume: {path} is damaged, so continuing the run cannot be checked; start a new run "
                           "with --overwrite or another --output-dir")
    return kept


def flat(recipe: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 1}} -> {"train.seed": 1}."""
    out = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def trained_so_far(checkpoint: Path) -> tuple[int, float]:
    """Optimizer steps and epochs the checkpoint holds (its trainer_state.json, checked complete already)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state.get("global_step") or 0), float(state.get("epoch") or 0.0)


def compare(started: dict, now: dict, checkpoint: Path) -> tuple[dict, list[str]]:
    """(accepted changes as {key: [old, new]}, refusals as one phrase each)."""
    old, new = flat(started["recipe"]), flat(now["recipe"])
    accepted, refused = {}, []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after or key in IGNORED:
            continue
        if key in ACCEPTED or key in BY_CONTENT or key in STEP_BUDGET:
            accepted[key] = [before, after]  # contents and step budget are judged below
        else:
            refused.append(f"{key} {shown(before)} -> {shown(after)}")
    refused += content_changes(started.get("contents") or {}, now["contents"], old, new)
    refused += budget_problems(new, old, checkpoint)
    for key in ("precision", "strategy"):
        if started.get(key) != now[key]:
            refused.append(f"{'train.precision (as resolved on this machine)' if key == 'precision' else '--strategy'}"
                           f" {shown(started.get(key))} -> {shown(now[key])}")
    if started.get("processes") != now["processes"]:
        train = now["recipe"]["train"]
        try:
            distributed.per_process_batch(train["batch_size"], train["grad_accum"], now["processes"])
        except ToolkitError:
            refused.append(f"--gpus {started.get('processes')} -> {now['processes']}: the global batch "
                           f"{train['batch_size']} x {train['grad_accum']} cannot be split over {now['processes']} "
                           "processes, so each step would train on a different batch")
        else:
            accepted["--gpus"] = [started.get("processes"), now["processes"]]
    return accepted, refused


def content_changes(before: dict, after: dict, old: dict, new: dict) -> list[str]:
    changes = []
    for key in ("data.train", "data.eval"):
        if before.get(key) != after.get(key):
            changes.append(f"{key} contents changed ({described(old.get(key), before.get(key))} -> "
                           f"{described(new.get(key), after.get(key))})")
    if before.get("images") != after.get("images"):
        was, now = before.get("images") or {}, after.get("images") or {}
        changes.append(f"the images the rows read changed ({images(was)} -> {images(now)})")
    return changes


def images(fingerprint: dict) -> str:
    count = fingerprint.get("count", 0)
    return f"{count} image{'' if count == 1 else 's'}, sha256 {str(fingerprint.get('sha256'))[:12]}"


def described(names, digests) -> str:
    if not names:
        return "none"
    listed = names if isinstance(names, list) else [names]
    return ", ".join(f"{name} sha256 {digest[:12]}" for name, digest in zip(listed, digests or []))


def budget_problems(new: dict, old: dict, checkpoint: Path) -> list[str]:
    """A step budget below what the checkpoint trained would end the run before its own last step."""
    steps, epochs = trained_so_far(checkpoint)
    if new["train.max_steps"] is not None:
        if new["train.max_steps"] < steps:
            return [f"train.max_steps {shown(old['train.max_steps'])} -> {new['train.max_steps']} is below the "
                    f"{steps} steps {checkpoint.name} has already trained"]
        return []
    if new["train.epochs"] < epochs - 1e-9:
        return [f"train.epochs {shown(old['train.epochs'])} -> {shown(new['train.epochs'])} is below the "
                f"{epochs:g} epochs {checkpoint.name} has already trained"]
    return []


def check(run_dir: Path, now: dict, checkpoint: Path) -> dict:
    """Refuse a resume that would train a different run, in one line naming every change; return what it changes
    that is harmless, as {key: [old, new]}."""
    accepted, refused = compare(read_start(run_dir)["started"], now, checkpoint)
    if refused:
        raise ToolkitError(f"--resume: {run_dir} was started with other settings, and continuing it with these would "
                           f"make its adapter something other than its record says: {'; '.join(refused)}. Set them "
                           "back as the run started (in the recipe or --set), or start a new run with another "
                           "--output-dir or --overwrite")
    return accepted


def record(run_dir: Path, changes: dict, checkpoint: Path) -> None:
    """Append this resume (where it continued, what it changed) to the run's record."""
    kept = read_start(run_dir)
    kept["resumes"].append({"from": checkpoint.name, "step": trained_so_far(checkpoint)[0], "changes": changes})
    files.write_text_atomic(run_dir / START_FILE, json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def resume_lines(run_dir: Path) -> list[str]:
    """The run card's account of each resume: where it continued and what it changed."""
    try:
        kept = read_start(run_dir)
    except ToolkitError:
        return []
    lines = []
    for entry in kept["resumes"]:
        changes = ", ".join(f"`{key}` {shown(old)} -> {shown(new)}" for key, (old, new) in entry["changes"].items())
        lines.append(f"Resumed from {entry['from']} (step {entry['step']})"
                     + (f", changing {changes}." if changes else " with the same settings."))
    if lines:
        lines.append(f"The recipe the run started with, and each resume, are in `{START_FILE}`.")
    return lines
