"""General drift: the shipped general set, KL(tuned || base) on reference answers, changed answers, warnings."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import term_rows, tiny_recipe, write_jsonl
from safetensors.torch import load_file, save_file

from toolkit import api
from toolkit.cli import main
from toolkit.config.recipe import RetentionSection, recipe_from_dict
from toolkit.errors import ToolkitError
from toolkit.evaluation import retention, terms
from toolkit.runs import rundir

QUICKSTART_LORA = {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj", "embed_tokens"]}


def general_subset(recipe, text_rows: int = 24):
    """The shipped set's first text rows and its last four image rows: quick, and both kinds of prompt."""
    general = retention.load_general_set(recipe.data)
    general.rows = general.rows[:text_rows] + general.rows[-4:]
    return general


def test_token_kl_is_exact():
    tuned = torch.log(torch.tensor([[0.5, 0.5], [0.1, 0.9]]))
    base = torch.log(torch.tensor([[0.25, 0.75], [0.1, 0.9]]))
    kl = retention.token_kl(tuned, base)
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), abs=1e-7)
    assert kl[1].item() == 0.0
    assert retention.token_kl(base, tuned)[0].item() == pytest.approx(
        0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5), abs=1e-7)  # KL is not symmetric


def test_answer_positions_are_shifted_by_one():
    assert retention.answer_positions([0, 0, 1, 1, 0, 1]) == [1, 2, 4]
    assert retention.answer_positions([1, 0, 1]) == [1]  # a first token has nothing before it to predict it


def test_the_shipped_set_is_general_bilingual_and_scored():
    rows = [json.loads(line) for line in retention.shipped_set().read_text(encoding="utf-8").splitlines()]
    hangul = [r for r in rows if any("\uac00" <= c <= "\ud7a3" for c in r["instruction"])]
    images = [r for r in rows if "image" in r]
    assert len(rows) == 223 and len(images) == 8 and 100 <= len(hangul) <= 120
    assert len({r["instruction"] for r in rows if "image" not in r}) == len(rows) - len(images)
    for row in rows:  # every key term occurs in its own reference, so a perfect answer scores
        assert row["terms"] and not terms.split_terms(row["output"], row["terms"])[1], row
    recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "x.jsonl"}})
    general = retention.load_general_set(recipe.data)  # images exist and open, every row passes the data checks
    assert len(general.rows) == 223 and general.image_rows == 8 and general.skipped_images == 0
    text_only = retention.load_general_set(recipe.data, reads_images=False)
    assert len(text_only.rows) == 215 and text_only.skipped_images == 8 and text_only.image_rows == 0


def test_retention_settings_are_checked():
    base = {"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "x.jsonl"}}
    assert recipe_from_dict(base).retention == RetentionSection(data=None, max_kl=0.25, max_accuracy_drop=0.05)
    with pytest.raises(ToolkitError, match="retention.max_kl: Input should be greater than or equal to 0"):
        recipe_from_dict({**base, "retention": {"max_kl": -1}})
    with pytest.raises(ToolkitError, match="retention.max_accuracy_drop: Input should be less than or equal to 1"):
        recipe_from_dict({**base, "retention": {"max_accuracy_drop": 2}})
    with pytest.raises(ToolkitError, match="retention.data: name a data file"):
        recipe_from_dict({**base, "retention": {"data": " "}})


def test_warnings_name_the_threshold_crossed():
    drift = retention.Retention("x", 4, 0, base={"term_accuracy": 0.5, "term_recall": 0.5, "exact_match": 0.0},
                                tuned={"term_accuracy": 0.25, "term_recall": 0.5, "exact_match": 0.0},
                                kl_per_token=0.3, answer_tokens=40, changed_share=0.5)
    assert retention.warnings(drift, RetentionSection(max_kl=0.3, max_accuracy_drop=0.25)) == []
    assert retention.warnings(drift, RetentionSection(max_kl=0.29, max_accuracy_drop=0.2)) == [
        "general drift: KL(tuned || base) is 0.300 nats per answer token, above retention.max_kl=0.29",
        "general drift: term accuracy fell by 0.250 (0.500 -> 0.250), more than retention.max_accuracy_drop=0.2",
    ]


@pytest.fixture(scope="module")
def loaded_run(tiny_run):
    model, tokenizer, recipe = rundir.load_trained(tiny_run)
    return model, tokenizer, recipe, rundir.image_inputs(recipe, tokenizer)


def test_the_base_against_itself_drifts_exactly_zero(loaded_run):
    model, tokenizer, recipe, images = loaded_run
    general = general_subset(recipe)
    same = retention.measure(model, tokenizer, general, base=retention.no_adapter, images=images)
    assert same.kl_per_token == 0.0 and same.changed_share == 0.0 and same.base == same.tuned
    assert all(r["kl_per_token"] == 0.0 and r["prediction"] == r["base_prediction"] for r in same.records)
    tuned = retention.measure(model, tokenizer, general, images=images)  # the adapter on against it off
    assert tuned.kl_per_token > 0.01 and tuned.changed_share > 0
    # the KL covers exactly the tokens training would learn: each reference answer and its end of turn
    encoded = retention.teacher_forced(general.rows, general.section, tokenizer)
    assert tuned.answer_tokens == same.answer_tokens == sum(e.learned for e in encoded)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert all(e.input_ids[[i for i, m in enumerate(e.completion_mask) if m][-1]] == eot for e in encoded)
    assert [len(e.images) for e in encoded] == [0] * 24 + [1] * 4


def test_a_rows_kl_in_a_padded_batch_is_its_own_forward_pass(loaded_run):
    """KL(tuned || base) of the first row, computed here from two plain forward passes of that row alone, equals
    what measure reports for it from a right-padded batch of three rows. (Text rows only: beside an image row,
    Mllama's cross-attention of a text row attends to blank tiles, which moves its logits by about 0.1%.)"""
    model, tokenizer, recipe, images = loaded_run
    general = general_subset(recipe, text_rows=3)
    general.rows = general.rows[:3]
    example = retention.teacher_forced(general.rows[:1], general.section, tokenizer)[0]
    ids = torch.tensor([example.input_ids])
    with torch.inference_mode():
        tuned = model(input_ids=ids).logits[0].float().log_softmax(-1)
        with model.disable_adapter():
            base = model(input_ids=ids).logits[0].float().log_softmax(-1)
    predicting = [t - 1 for t, learned in enumerate(example.completion_mask) if learned]
    expected = (tuned[predicting].exp() * (tuned[predicting] - base[predicting])).sum(-1).mean().item()
    measured = retention.measure(model, tokenizer, general, images=images, batch_size=3, max_new_tokens=2)
    assert measured.records[0]["kl_per_token"] == pytest.approx(expected, rel=1e-4)
    assert len(predicting) == example.learned and expected > 0


def run_of(folder, train_file, learning_rate):
    recipe = tiny_recipe(folder, {"train": train_file}, lora=QUICKSTART_LORA,
                         train={"max_steps": 12, "learning_rate": learning_rate, "lr_scheduler": "constant",
                                "save_steps": 100})
    return api.train(recipe, folder / "run").path


def test_a_run_trained_to_forget_drifts_more(tmp_path, tiny_data):
    """The quickstart's settings (LoRA with embeddings, lr 1e-3) against 10x the learning rate on one row."""
    narrow = write_jsonl(tmp_path / "narrow.jsonl", term_rows()[:1])
    (tmp_path / "quick").mkdir(), (tmp_path / "forget").mkdir()
    drift = {}
    for name, train_file, rate in (("quick", tiny_data["train"], 1e-3), ("forget", str(narrow), 1e-2)):
        model, tokenizer, recipe = rundir.load_trained(run_of(tmp_path / name, train_file, rate))
        drift[name] = retention.measure(model, tokenizer, general_subset(recipe), max_new_tokens=4,
                                        images=rundir.image_inputs(recipe, tokenizer))
    assert drift["forget"].kl_per_token > 1.2 * drift["quick"].kl_per_token, (drift["forget"].kl_per_token,
                                                                             drift["quick"].kl_per_token)


def zeroed_copy(run_dir, folder):
    """A copy of a run whose adapter changes nothing: every LoRA weight set to zero."""
    copy = folder / "zeroed"
    shutil.copytree(run_dir, copy)
    weights = load_file(str(copy / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(copy / "adapter_model.safetensors"))
    return copy


def test_eval_retention_of_an_adapter_that_changes_nothing(tiny_run, tmp_path, capsys):
    run = zeroed_copy(tiny_run, tmp_path)
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"instruction": "What is the capital of France?", "output": "The capital of France is Paris.",
         "terms": ["Paris"]},
        {"instruction": "일주일은 며칠입니까?", "output": "일주일은 7일입니다.", "terms": ["7일"]},
        {"instruction": "What is 7 times 8?", "output": "7 times 8 is 56.", "terms": ["56"]},
    ])
    capsys.readouterr()
    assert main(["eval", str(run), "--limit", "2", "--max-new-tokens", "16", "--retention-data", str(general)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    kept = summary["retention"]
    assert kept["kl_per_token"] == 0.0 and kept["changed_share"] == 0.0 and kept["warnings"] == []
    assert kept["n_examples"] == 3 and kept["data"] == str(general) and kept["base"] == kept["tuned"]
    assert kept["delta"] == {"term_accuracy": 0.0, "term_recall": 0.0, "exact_match": 0.0}
    assert (kept["max_kl"], kept["max_accuracy_drop"]) == (0.25, 0.05)
    assert summary["base"] == {k: summary[k] for k in summary["base"]}  # --retention implies --compare-base
    records = [json.loads(line) for line in (run / "retention_predictions.jsonl").read_text("utf-8").splitlines()]
    assert [r["question"] for r in records] == ["What is the capital of France?", "일주일은 며칠입니까?",
                                                "What is 7 times 8?"]
    assert all(r["changed"] is False and r["kl_per_token"] == 0.0 for r in records)
    assert "Domain gain and general drift" in out and "general answers changed" in out and "warning:" not in out


def test_drift_above_the_recipe_threshold_is_a_warning_not_a_failure(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    saved = (run / "recipe.yaml").read_text(encoding="utf-8")
    (run / "recipe.yaml").write_text(saved.replace("max_kl: 0.25", "max_kl: 0.0"), encoding="utf-8")
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"instruction": "What is the capital of France?", "output": "The capital of France is Paris.",
         "terms": ["Paris"]}])
    assert main(["eval", str(run), "--limit", "1", "--max-new-tokens", "8", "--retention-data", str(general)]) == 0
    out = capsys.readouterr().out
    kept = json.loads((run / "eval.json").read_text(encoding="utf-8"))["retention"]
    assert kept["kl_per_token"] > 0 and kept["max_kl"] == 0.0
    line = f"general drift: KL(tuned || base) is {kept['kl_per_token']:.3f} nats per answer token, above " \
           "retention.max_kl=0"
    assert kept["warnings"] == [line] and f"warning: {line}" in out


def test_retention_data_problems_stop_before_the_model_loads(tiny_run, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(rundir, "load_trained", no_model)
    assert main(["eval", str(tiny_run), "--retention-data", " "]) == 2
    assert "--retention-data is empty; name a general data file" in capsys.readouterr().out
    missing = tmp_path / "nope.jsonl"
    assert main(["eval", str(tiny_run), "--retention-data", str(missing)]) == 2
    assert f"--retention-data: file not found: {missing}" in capsys.readouterr().out
    unscored = write_jsonl(tmp_path / "unscored.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    assert main(["eval", str(tiny_run), "--retention-data", str(unscored)]) == 2
    assert "no row has 'terms'; a general set needs key terms" in capsys.readouterr().out
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"instruction": "Hi?", "output": "Hello.", "terms": ["Hello"]},
                                                      {"instruction": "Hi?"}])
    assert main(["eval", str(tiny_run), "--retention-data", str(broken)]) == 2
    assert f"{broken}:2" in capsys.readouterr().out
    assert not (tiny_run / "retention_predictions.jsonl").exists()
