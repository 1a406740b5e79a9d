"""train.sample_every: answers during training that are exactly toolkit eval's, logged without changing what is
trained, and refused before training when there is nothing to answer or score."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TERMS, tiny_recipe, write_jsonl
from safetensors.torch import load_file

from toolkit import api
from toolkit.cli import main
from toolkit.commands.eval import build_parser
from toolkit.errors import ToolkitError
from toolkit.training import distributed, samples

# Dropout on, so anything that drew random numbers while sampling would change the adapter; TRL's token metrics on,
# so a sample entry that took them from the loss entries would show.
SETTINGS = dict(train={"max_steps": 4, "logging_steps": 1, "token_metrics": True}, lora={"dropout": 0.1})
MAX_NEW_TOKENS = 24  # short answers keep the test fast; eval is run with the same cap


def history(run_dir) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["log_history"]


def untimed(entries: list[dict]) -> list[dict]:
    """Log entries without their clock readings (train_runtime, ..._per_second), which differ run to run."""
    return [{k: v for k, v in e.items() if not k.endswith(("_runtime", "_per_second"))} for e in entries]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_data):
    """The same recipe trained without and with sample_every=2, and the answers the sampler made at each step."""
    folder = tmp_path_factory.mktemp("sampling")
    patch = pytest.MonkeyPatch()
    patch.setattr(samples, "MAX_NEW_TOKENS", MAX_NEW_TOKENS)
    patch.setattr(samples, "BATCH_SIZE", 3)  # 4 sampled rows in two batches, as eval below makes one of 4
    answers = {}
    original = samples.SampleCallback.answer

    def recording(self, step):
        answers[step] = original(self, step)
        return answers[step]

    patch.setattr(samples.SampleCallback, "answer", recording)
    runs = {}
    for name, extra in (("plain", {}), ("sampled", {"sample_every": 2})):
        recipe = tiny_recipe(folder, tiny_data, **{**SETTINGS, "train": {**SETTINGS["train"], **extra}})
        runs[name] = api.train(recipe, folder / name).path
    patch.undo()
    return runs["plain"], runs["sampled"], answers


def test_sampling_changes_nothing_that_is_trained_or_saved(two_runs):
    plain, sampled, answers = two_runs
    a, b = load_file(plain / "adapter_model.safetensors"), load_file(sampled / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [entry for entry in history(sampled) if samples.LOG_KEY not in entry]
    assert untimed(logged) == untimed(history(plain))  # every loss entry and TRL metric, as without sampling
    assert (sampled / "tokenizer_config.json").read_text() == (plain / "tokenizer_config.json").read_text()
    assert sorted(answers) == [2, 4]


def test_the_logged_accuracy_and_answers_are_what_eval_gives_for_the_finished_run(two_runs, tmp_path):
    _, sampled, answers = two_runs
    entries = [entry for entry in history(sampled) if samples.LOG_KEY in entry]
    assert [entry["step"] for entry in entries] == [2, 4]
    out = tmp_path / "eval.json"
    args = ["--limit", "4", "--batch-size", "4", "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", str(out)]
    assert main(["eval", str(sampled), *args]) == 0
    predictions = [json.loads(line)["prediction"]
                   for line in (sampled / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert answers[4] == predictions and any(predictions)  # the last sample is the finished run's eval, word for word
    assert entries[-1][samples.LOG_KEY] == json.loads(out.read_text(encoding="utf-8"))["term_accuracy"]


def test_answers_come_from_eval_mode_without_grad_and_leave_every_state_as_it_was(monkeypatch):
    from contextlib import nullcontext

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    model.train()
    model[2].eval()  # a module the Trainer keeps in eval mode stays so
    tokenizer = SimpleNamespace()
    seen = {}

    def generate(model_, tokenizer_, prompts, *args, **kwargs):
        seen.update(training=[m.training for m in model_.modules()], grad=torch.is_grad_enabled())
        torch.rand(3)  # as a sampling decoder or an active dropout would
        return ["answer"] * len(prompts)

    monkeypatch.setattr(samples.generation, "generate_answers", generate)
    callback = SimpleNamespace(trainer=SimpleNamespace(model=model, accelerator=SimpleNamespace(autocast=nullcontext)),
                               tokenizer=tokenizer, prompts=["p"], images=None)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    assert samples.SampleCallback.answer(callback, 2) == ["answer"]
    assert seen == {"training": [False, False, False, False], "grad": False}
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert torch.equal(torch.rand(1), expected_next)  # the random number generator is where it was


def test_sampling_defaults_are_evals():
    defaults = build_parser().parse_args(["run"])
    assert (samples.BATCH_SIZE, samples.MAX_NEW_TOKENS) == (defaults.batch_size, defaults.max_new_tokens)


def test_one_example_line_per_sample(capsys):
    shown = SimpleNamespace(key_terms=[["거푸집", "임시 틀"]])
    samples.SampleCallback.show(shown, 6, 0.5, "거푸집\x1b[31m 은\n임시\u202e 틀")
    samples.SampleCallback.show(SimpleNamespace(key_terms=[None]), 8, None, "")
    assert capsys.readouterr().out == ("step 6 sample_term_accuracy 0.500 | 거푸집, 임시 틀 -> 거푸집\\x1b[31m 은 "
                                       "임시\\u202e 틀\nstep 8 sample_term_accuracy n/a | - -> \n")


def test_bf16_training_samples_under_the_trainers_autocast(tmp_path, tiny_data, capsys, monkeypatch):
    """bf16 adapters train with PEFT's input casting off; generating outside autocast would mix dtypes."""
    monkeypatch.setattr(samples, "MAX_NEW_TOKENS", 4)
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 2, "sample_every": 2, "sample_rows": 1,
                                                     "precision": "bf16"})
    api.train(recipe, tmp_path / "run")
    assert "step 2 sample_term_accuracy " in capsys.readouterr().out
    assert [entry["step"] for entry in history(tmp_path / "run") if samples.LOG_KEY in entry] == [2]


def test_sample_every_needs_eval_rows_before_training(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"]}, train={"sample_every": 5})
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 2
    assert ("error: train.sample_every needs eval rows to answer, and this recipe has none; set data.eval or "
            "data.eval_fraction, or remove train.sample_every\n") in capsys.readouterr().out
    assert not run_dir.exists()


def test_sample_every_needs_key_terms_before_training(tmp_path, tiny_data, capsys):
    rows = [{"instruction": "다음 건설 용어를 설명하세요.", "input": t, "output": o} for t, o in TERMS.items()]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"], "eval": str(plain)},
                         train={"sample_every": 5, "sample_rows": 2})
    assert main(["validate", str(recipe)]) == 2
    assert ("error: train.sample_every: the first 2 eval rows have no 'terms' and data.glossary is not set, so there "
            "is no term accuracy to log; add terms to the rows or name a glossary\n") in capsys.readouterr().out


def test_sharded_training_refuses_sampling(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    prepared = SimpleNamespace(recipe=SimpleNamespace(train=SimpleNamespace(sample_every=10)))
    with pytest.raises(ToolkitError) as err:
        samples.attach(None, prepared, "fsdp")
    assert str(err.value) == ("train.sample_every works with --strategy ddp, not fsdp: sharded training needs every "
                              "process in each forward pass, and only the main process samples")
