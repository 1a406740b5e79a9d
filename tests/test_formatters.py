"""The `messages` and `sharegpt` formatters: multi-turn masks with the Llama 3 template, the mapping onto the same
conversation as alpaca, and every row error's exact text."""

from __future__ import annotations

import pytest

from toolkit.config.recipe import DataSection
from toolkit.data import encode, formatters, reading
from toolkit.model import loading

TURNS = [
    {"role": "user", "content": "거푸집이 무엇입니까?"},
    {"role": "assistant", "content": "콘크리트를 부어 모양을 잡는 임시 틀입니다."},
    {"role": "user", "content": "언제 떼어 냅니까?"},
    {"role": "assistant", "content": "콘크리트가 충분히 굳은 뒤에 떼어 냅니다."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return loading.load_tokenizer("builtin:tiny-mllama")


def encoded(tokenizer, fields, formatter="messages", **values):
    section = DataSection(train="t.jsonl", formatter=formatter, **values)
    return encode.encode_rows([reading.Row("t.jsonl", 1, fields)], section, tokenizer, 4096).examples[0]


def learned_pieces(tokenizer, example) -> list[str]:
    """Each stretch of learned tokens, decoded."""
    pieces, current = [], []
    for token, learned in zip(example.input_ids, example.completion_mask):
        if learned:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    return pieces + ([tokenizer.decode(current)] if current else [])


def test_every_assistant_turn_is_learned_with_its_end_of_turn(tokenizer):
    example = encoded(tokenizer, {"messages": TURNS})
    assert learned_pieces(tokenizer, example) == [TURNS[1]["content"] + "<|eot_id|>",
                                                  TURNS[3]["content"] + "<|eot_id|>"]
    whole = tokenizer.apply_chat_template(TURNS, tokenize=False, date_string="26 Jul 2024")
    assert example.input_ids == tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_train_on_last_learns_only_the_final_answer(tokenizer):
    example = encoded(tokenizer, {"messages": TURNS}, train_on="last")
    assert learned_pieces(tokenizer, example) == [TURNS[3]["content"] + "<|eot_id|>"]


def test_sharegpt_and_alpaca_rows_become_the_same_conversation(tokenizer):
    sharegpt = {"conversations": [{"from": "human", "value": m["content"]} if m["role"] == "user" else
                                  {"from": "gpt", "value": m["content"]} for m in TURNS]}
    assert encoded(tokenizer, sharegpt, "sharegpt") == encoded(tokenizer, {"messages": TURNS})
    alpaca = {"instruction": "다음 용어를 설명하세요.", "input": "거푸집", "output": "임시 틀입니다."}
    as_messages = {"messages": [{"role": "user", "content": "다음 용어를 설명하세요.\n\n거푸집"},
                                {"role": "assistant", "content": "임시 틀입니다."}]}
    assert encoded(tokenizer, alpaca, "alpaca") == encoded(tokenizer, as_messages)


def test_a_rows_own_system_turn_wins_over_the_recipes(tokenizer):
    own = {"messages": [{"role": "system", "content": "행 시스템"}, *TURNS[:2]]}
    text = tokenizer.decode(encoded(tokenizer, own, system_prompt="레시피 시스템").input_ids)
    assert "행 시스템<|eot_id|>" in text and "레시피 시스템" not in text
    text = tokenizer.decode(encoded(tokenizer, {"messages": TURNS[:2]}, system_prompt="레시피 시스템").input_ids)
    assert "레시피 시스템<|eot_id|>" in text


def test_image_parts_come_first_and_sharegpt_markers_place_them(tokenizer):
    parts = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "text", "text": "무엇입니까?"}]},
                          {"role": "assistant", "content": "H형강입니다."}]}
    marked = {"conversations": [{"from": "human", "value": "<image>무엇입니까?"}, {"from": "gpt", "value": "H형강입니다."}],
              "images": ["a.png"]}
    first = encoded(tokenizer, parts)
    assert first == encoded(tokenizer, marked, "sharegpt") and first.images == ("a.png",)
    assert tokenizer.decode(first.input_ids).startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                                        "<|image|>무엇입니까?<|eot_id|>")


def problems(formatter: str, row: dict) -> list[str]:
    return formatters.FORMATTERS[formatter].problems(row)


@pytest.mark.parametrize("row, expected", [
    ({}, ["missing field 'messages'"]),
    ({"messages": []}, ["field 'messages' must be a non-empty list of turns"]),
    ({"messages": [{"role": "bot", "content": "x"}]}, ["message 1: role 'bot' is not one of system, user, assistant"]),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
     ["message 1: empty content"]),
    ({"messages": [{"role": "user", "content": 3}]},
     ["message 1: 'content' must be a string or a non-empty list of parts"]),
    ({"messages": [{"role": "user", "content": "q"}]},
     ["the conversation must end with an assistant turn (the answer to learn)"]),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "t"},
                   {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     ["two system turns (messages 1 and 2); give at most one, first"]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]},
     ["message 2: the system turn must come first"]),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]},
     ["message 2: expected an assistant turn, got user (turns alternate, user first)"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image", "image": "a.png"}]},
                   {"role": "assistant", "content": "a"}]},
     ["message 1: put the image(s) before the text; Llama 3.2 Vision reads an image first in its turn"]),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "a"}]}]},
     ["message 2: images are only allowed in user turns"]),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "a"}]},
     ["message 1: content part type 'video' is not one of 'text', 'image'"]),
])
def test_messages_row_errors(row, expected):
    assert problems("messages", row) == expected


@pytest.mark.parametrize("row, expected", [
    ({}, ["missing field 'conversations'"]),
    ({"conversations": [{"from": "user", "value": "q"}]},
     ["conversations 1: 'from' 'user' is not one of human, gpt, system"]),
    ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]},
     ["conversations 1: 'value' is empty"]),
    ({"conversations": [{"from": "gpt", "value": "a"}]},
     ["message 1: expected a user turn, got assistant (turns alternate, user first)"]),
    ({"conversations": [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}],
      "images": ["a.png"]}, ["2 <image> marker(s) in the text but 1 image(s)"]),
])
def test_sharegpt_row_errors(row, expected):
    assert problems("sharegpt", row) == expected


def test_each_format_is_one_record_named_by_its_key():
    assert {name: f.name for name, f in formatters.FORMATTERS.items()} == \
        {"alpaca": "alpaca", "messages": "messages", "sharegpt": "sharegpt"}
    assert formatters.list_fields() == ("terms", "images", "messages", "conversations")


def test_a_sharegpt_rows_own_system_turn_gets_no_second_one():
    row = {"conversations": [{"from": "system", "value": "행 시스템"}, {"from": "human", "value": "질문"},
                             {"from": "gpt", "value": "답"}]}
    assert formatters.sharegpt(row, "레시피 시스템") == [
        {"role": "system", "content": "행 시스템"}, {"role": "user", "content": "질문"},
        {"role": "assistant", "content": "답"}]
    assert formatters.sharegpt({"conversations": row["conversations"][1:]}, "레시피 시스템")[0] == \
        {"role": "system", "content": "레시피 시스템"}


def test_each_sharegpt_image_marker_gets_its_own_image_in_order():
    row = {"conversations": [{"from": "human", "value": "<image>첫째"}, {"from": "gpt", "value": "가"},
                             {"from": "human", "value": "둘째<image>"}, {"from": "gpt", "value": "나"}],
           "images": ["a.png", "b.png"]}
    assert formatters.sharegpt(row) == [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "첫째"}]},
        {"role": "assistant", "content": "가"},
        {"role": "user", "content": [{"type": "image", "image": "b.png"}, {"type": "text", "text": "둘째"}]},
        {"role": "assistant", "content": "나"}]


SYSTEM_TURNS = [{"role": "system", "content": "행 시스템"}, *TURNS]


@pytest.mark.parametrize("formatter, fields, system_prompt", [
    ("messages", {"messages": SYSTEM_TURNS}, None),
    ("messages", {"messages": TURNS}, "레시피 시스템"),
    ("sharegpt", {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                     "value": m["content"]} for m in SYSTEM_TURNS]}, "레시피 시스템"),
    ("alpaca", {"instruction": "다음 용어를 설명하세요.", "input": "거푸집", "output": "임시 틀입니다."}, "레시피 시스템"),
])
def test_the_prompt_is_the_whole_conversation_before_the_last_answer(tokenizer, formatter, fields, system_prompt):
    """What eval, sampling and merge's check generate from: the system turn and every earlier turn, exactly the
    tokens training put before the last answer."""
    section = DataSection(train="t.jsonl", formatter=formatter, system_prompt=system_prompt)
    example = encoded(tokenizer, fields, formatter, system_prompt=system_prompt)
    last_answer = max(i for i, learned in enumerate(example.completion_mask) if learned and
                      not example.completion_mask[i - 1])
    prompt = encode.prompt(reading.Row("t.jsonl", 1, fields), section, tokenizer)
    assert prompt.input_ids == example.input_ids[:last_answer]
    text = tokenizer.decode(prompt.input_ids)
    assert text.count("시스템<|eot_id|>") == 1 and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    if formatter != "alpaca":
        assert "거푸집이 무엇입니까?<|eot_id|>" in text and "콘크리트를 부어 모양을 잡는 임시 틀입니다.<|eot_id|>" in text
