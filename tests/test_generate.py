"""`toolkit generate`: a greedy answer streamed to stdout, with and without the adapter."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from toolkit.cli import main
from toolkit.commands.generate import prompt_ids, user_text

PROMPT = "다음 건설 용어를 설명하세요.\\n\\n거푸집"  # as a shell passes it: a literal backslash-n


def greedy_answer(run_dir, base: bool, max_new_tokens: int) -> str:
    """The same answer computed without the streamer, to check what the command printed."""
    from toolkit.runs import load_trained

    model, tokenizer, recipe = load_trained(run_dir)
    encoded = prompt_ids(user_text(PROMPT), recipe, tokenizer)
    with model.disable_adapter() if base else nullcontext(), torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("base", [False, True])
def test_streams_the_greedy_answer(tiny_run, capsys, base):
    flags = ["--base"] if base else []
    assert main(["generate", str(tiny_run), PROMPT, "--max-new-tokens", "12", *flags]) == 0
    out = capsys.readouterr().out
    expected = greedy_answer(tiny_run, base, 12)
    assert expected.strip(), "the tiny model should say something"
    assert expected.strip() in out
    assert "tokens in" in out


def test_adapter_changes_the_answer(tiny_run):
    assert greedy_answer(tiny_run, False, 12) != greedy_answer(tiny_run, True, 12)


def test_literal_backslash_n_becomes_a_line_break(tiny_run):
    from transformers import AutoTokenizer

    from toolkit.runs import open_run

    assert user_text(PROMPT) == "다음 건설 용어를 설명하세요.\n\n거푸집"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_run))
    encoded = prompt_ids(user_text(PROMPT), open_run(tiny_run), tokenizer)
    rendered = tokenizer.decode(encoded["input_ids"][0])
    assert "설명하세요.\n\n거푸집<|eot_id|>" in rendered
    assert rendered.count("<|begin_of_text|>") == 1


def test_image_is_refused(tiny_run, tmp_path):
    assert main(["generate", str(tiny_run), "이 사진을 설명하세요.", "--image", str(tmp_path / "a.png")]) == 2


def test_empty_prompt_is_refused(tiny_run):
    assert main(["generate", str(tiny_run), "  "]) == 2
