"""Shared fixtures: the built-in model in a per-session cache, small data files, and one trained run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ["COLUMNS"] = "200"  # rich wraps long messages at the terminal width; keep them on one line

TERMS = {
    "거푸집": "거푸집은 콘크리트를 부어 넣을 때 모양을 잡아 주는 임시 틀입니다.",
    "철근": "철근은 콘크리트 속에 넣어 인장력을 보강하는 강재입니다.",
    "양생": "양생은 타설한 콘크리트가 잘 굳도록 온도와 습도를 유지하는 일입니다.",
    "슬럼프": "슬럼프는 굳지 않은 콘크리트의 반죽질기를 재는 값입니다.",
    "비계": "비계는 높은 곳에서 작업하도록 설치하는 임시 발판 구조물입니다.",
    "동바리": "동바리는 거푸집과 콘크리트의 무게를 받치는 임시 기둥입니다.",
}
INSTRUCTIONS = ["다음 건설 용어를 설명하세요.", "다음 용어의 뜻을 한두 문장으로 설명하세요."]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def term_rows(instructions=INSTRUCTIONS) -> list[dict]:
    return [
        {"instruction": ins, "input": term, "output": text, "terms": [term]}
        for term, text in TERMS.items()
        for ins in instructions
    ]


@pytest.fixture(scope="session", autouse=True)
def toolkit_cache(tmp_path_factory):
    """Build the built-in model once per test session, away from the user's real cache."""
    folder = tmp_path_factory.mktemp("toolkit-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("TOOLKIT_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("data")
    train = write_jsonl(folder / "train.jsonl", term_rows())
    evals = write_jsonl(folder / "eval.jsonl", term_rows(["다음 용어를 한 문장으로 정의하세요."]))
    return {"train": str(train), "eval": str(evals), "folder": folder}


def tiny_recipe(folder: Path, data: dict, **sections) -> Path:
    """A recipe file for the built-in model; `sections` override whole sections or keys in them."""
    recipe = {
        "model": {"name": "builtin:tiny-mllama"},
        "data": {key: data[key] for key in ("train", "eval") if data.get(key)},
        "train": {"max_steps": 12, "batch_size": 4, "learning_rate": 0.005, "logging_steps": 2, "save_steps": 6},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values} if isinstance(values, dict) else values
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """One finished training run on the built-in model, shared by the eval/extract/merge tests, trained through
    the Python API (`toolkit.api.train`, what `toolkit sft` runs in one process)."""
    from toolkit import api

    folder = tmp_path_factory.mktemp("run")
    return api.train(tiny_recipe(folder, tiny_data), folder / "out").path


@pytest.fixture(scope="session")
def real_model(request) -> Path:
    """SmolLM2-135M-Instruct as a Llama-3-format local checkpoint (tests/realmodel.py), converted once into
    pytest's cache folder and reused by later sessions."""
    import realmodel

    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`: same folder by hand
    folder = cache.mkdir("real-model") if cache else request.config.rootpath / ".pytest_cache" / "d" / "real-model"
    folder.mkdir(parents=True, exist_ok=True)
    return realmodel.ensure_converted(folder)
