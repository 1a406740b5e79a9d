"""`toolkit generate`: a greedy answer streamed to stdout, with and without the adapter."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from toolkit.cli import main
from toolkit.commands.generate import prompt_ids, user_text

PROMPT = "다음 건설 용어를 설명하세요.\\n\\n거푸집"  # as a shell passes it: a literal backslash-n


def greedy_answer(run_dir, base: bool, max_new_tokens: int) -> str:
    """The same answer computed without the streamer, to check what the command printed."""
    from toolkit.runs.rundir import load_trained

    model, tokenizer, recipe = load_trained(run_dir)
    encoded = prompt_ids(user_text(PROMPT), recipe, tokenizer)
    with model.disable_adapter() if base else nullcontext(), torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def test_streams_the_base_models_greedy_answer(tiny_run, capsys):
    """The random base answers with words and never ends its turn (the tuned answer is checked token by token in
    test_generate_stops_at_end_of_turn)."""
    assert main(["generate", str(tiny_run), PROMPT, "--max-new-tokens", "12", "--base"]) == 0
    out = capsys.readouterr().out
    expected = greedy_answer(tiny_run, True, 12)
    assert expected.strip(), "the tiny base model should say something"
    assert expected.strip() in out
    assert "12 tokens in" in out and "(stopped at --max-new-tokens)" in out


def test_adapter_changes_the_answer(tiny_run):
    assert greedy_answer(tiny_run, False, 12) != greedy_answer(tiny_run, True, 12)


def test_literal_backslash_n_becomes_a_line_break(tiny_run):
    from transformers import AutoTokenizer

    from toolkit.runs.rundir import open_run

    assert user_text(PROMPT) == "다음 건설 용어를 설명하세요.\n\n거푸집"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_run))
    encoded = prompt_ids(user_text(PROMPT), open_run(tiny_run), tokenizer)
    rendered = tokenizer.decode(encoded["input_ids"][0])
    assert "설명하세요.\n\n거푸집<|eot_id|>" in rendered
    assert rendered.count("<|begin_of_text|>") == 1


def test_image_is_refused_by_a_text_model(tiny_run, tmp_path, monkeypatch, capsys):
    """A readable image given to a model that cannot read images is refused as such (not as a missing file)."""
    from PIL import Image

    from toolkit.data import vision

    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    monkeypatch.setattr(vision, "image_inputs_for", lambda *args, **kwargs: None)  # what a text-only model's run answers
    assert main(["generate", str(tiny_run), "이 사진을 설명하세요.", "--image", str(tmp_path / "a.png")]) == 2
    assert capsys.readouterr().out.replace("\n", "") == \
        "error: --image: builtin:tiny-mllama is not a vision model; it cannot read images"


def test_a_missing_image_is_refused_before_the_model_loads(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no-run"), "이 사진을 설명하세요.", "--image", str(tmp_path / "a.png")]) == 2
    assert capsys.readouterr().out.replace("\n", "") == f"error: --image: image not found: {tmp_path / 'a.png'}"


def test_empty_prompt_is_refused(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no-run"), "  "]) == 2
    assert capsys.readouterr().out.replace("\n", "") == "error: PROMPT is empty; give the question to answer"


def force_answer(monkeypatch, tokens: list[int], then: int) -> None:
    """Every model `toolkit` loads answers `tokens` greedily, then `then` forever: a model that is not stopped at
    the end of its turn keeps writing `then`."""
    from toolkit.runs import rundir

    original = rundir.load_trained

    def load_trained(*args, **kwargs):
        model, tokenizer, recipe = original(*args, **kwargs)
        step = {"n": 0}

        def hook(module, args, kwargs, output):
            if kwargs["input_ids"].shape[1] > 1:  # a prompt, not one generated token: a new answer starts
                step["n"] = 0
            forced = tokens[step["n"]] if step["n"] < len(tokens) else then
            step["n"] += 1
            output.logits[:, -1, :] = -1e4
            output.logits[:, -1, forced] = 1e4
            return output

        model.get_base_model().register_forward_hook(hook, with_kwargs=True)
        return model, tokenizer, recipe

    monkeypatch.setattr(rundir, "load_trained", load_trained)


@pytest.fixture(scope="module")
def words(tiny_run) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_run))
    ids = {word: tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("철근", "양생", "비계")}
    return {"ids": ids, "eot": tokenizer.convert_tokens_to_ids("<|eot_id|>"),
            "answer": tokenizer.decode([ids["철근"], ids["양생"]]).strip()}


def test_generate_stops_at_end_of_turn(tiny_run, words, monkeypatch, capsys):
    ids = words["ids"]
    force_answer(monkeypatch, [ids["철근"], ids["양생"], words["eot"]], then=ids["비계"])
    assert main(["generate", str(tiny_run), PROMPT, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert f"{words['answer']}\n" in out and "3 tokens in" in out


def test_eval_answers_stop_at_end_of_turn(tiny_run, words, monkeypatch, tmp_path):
    ids = words["ids"]
    force_answer(monkeypatch, [ids["철근"], ids["양생"], words["eot"]], then=ids["비계"])
    assert main(["eval", str(tiny_run), "--limit", "3", "--batch-size", "2", "--max-new-tokens", "8", "--json",
                 str(tmp_path / "eval.json")]) == 0
    predictions = (tiny_run / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["prediction"] for line in predictions] == [words["answer"]] * 3


def test_an_answer_cannot_steer_the_terminal(tiny_run, words, monkeypatch, capsys):
    from transformers import AutoTokenizer

    escape = AutoTokenizer.from_pretrained(str(tiny_run))("\x1b[2J\u202e", add_special_tokens=False)["input_ids"]
    force_answer(monkeypatch, [*escape, words["eot"]], then=words["ids"]["비계"])
    assert main(["generate", str(tiny_run), PROMPT, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "\\x1b[2J\\u202e\n" in out and "\x1b" not in out and "\u202e" not in out


def test_generates_prompt_has_the_recipes_system_turn():
    """generate's question is rendered as a training row asking it: the recipe's system turn included."""
    from toolkit.config.recipe import DataSection
    from toolkit.data import encode, reading
    from toolkit.model import loading

    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    section = DataSection(train="t.jsonl", system_prompt="당신은 건설 전문가입니다.")
    question = user_text(PROMPT)
    asked = encode.question_prompt(question, section, tokenizer)
    row = reading.Row("t.jsonl", 1, {"instruction": question, "output": "답"})
    assert asked.input_ids == encode.prompt(row, section, tokenizer).input_ids
    assert "당신은 건설 전문가입니다.<|eot_id|>" in tokenizer.decode(asked.input_ids)


class EchoModel:
    """Stands in for a model's greedy generate: each row's answer is its prompt's own last two tokens, so an answer
    given to the wrong row shows."""

    device = "cpu"
    generation_config = None

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, input_ids[:, -2:]], dim=1)


def test_every_answer_goes_to_its_own_row():
    """7 prompts of different lengths in batches of 3 (the last batch short): each answer lands on its own row."""
    from types import SimpleNamespace

    from toolkit.evaluation import generation
    from toolkit.model import loading

    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    words = ["거푸집", "철근", "양생", "슬럼프", "비계", "동바리", "콘크리트"]
    prompts = [SimpleNamespace(input_ids=tokenizer(" ".join(words[: i % 4 + 1]) + f" {word} {i}",
                                                   add_special_tokens=False).input_ids, images=())
               for i, word in enumerate(words)]
    expected = [tokenizer.decode(p.input_ids[-2:], skip_special_tokens=True).strip() for p in prompts]
    assert len(set(expected)) == 7
    assert generation.generate_answers(EchoModel(), tokenizer, prompts, 3, 2, label="t") == expected


class RecordingModel(EchoModel):
    """Answers nothing new and keeps every batch it was given."""

    def __init__(self):
        self.batches = []

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self.batches.append((input_ids.tolist(), attention_mask.tolist()))
        return input_ids


def test_generation_pads_on_the_left_and_leaves_the_tokenizer_as_it_was():
    """A right-padding tokenizer (as training and the saved run have it) still gives generation left-padded prompts,
    and is right-padding after: the side is given to each pad call, never set on the tokenizer."""
    from types import SimpleNamespace

    from toolkit.evaluation import generation
    from toolkit.model import loading

    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    tokenizer.padding_side = "right"
    pad = tokenizer.pad_token_id
    prompts = [SimpleNamespace(input_ids=ids, images=()) for ids in ([11], [21, 22, 23], [31, 32])]
    model = RecordingModel()
    assert generation.generate_answers(model, tokenizer, prompts, 3, 2, label="t") == ["", "", ""]
    assert model.batches == [([[21, 22, 23], [pad, 31, 32], [pad, pad, 11]], [[1, 1, 1], [0, 1, 1], [0, 0, 1]])]
    assert tokenizer.padding_side == "right"
    assert pad not in (11, 21, 22, 23, 31, 32)
