"""Data text on the terminal: controls shown as escapes, never sent raw; eval's examples table cut to a few lines."""

from __future__ import annotations

from rich.console import Console

from toolkit.commands import eval as eval_command
from toolkit.evaluation import scoring
from toolkit.ui.terminal import one_line, visible

HOSTILE = "a\x1b[2J\x00b\r\nc\td\u202eevil\u2066x\u200fy\x85z\x7f\ud800"


def test_controls_bidi_and_surrogates_are_escaped():
    assert visible(HOSTILE) == "a\\x1b[2J\\x00b\\x0d\nc\td\\u202eevil\\u2066x\\u200fy\\x85z\\x7f\\ud800"
    assert one_line(HOSTILE) == "a\\x1b[2J\\x00b c d\\u202eevil\\u2066x\\u200fy\\x85z\\x7f\\ud800"
    assert one_line("  거푸집은\n\n 임시   틀\t입니다 ") == "거푸집은 임시 틀 입니다"
    assert visible("C:\\path \\x1b 그대로") == "C:\\path \\x1b 그대로"  # backslashes are left alone


def test_a_long_answer_is_cut_to_a_few_lines_of_its_column():
    cell = eval_command.clip("거푸집 " * 50, width=20)
    assert cell.plain == "거푸집 거푸집 거푸집\n" * 3 + "거푸집 거푸집 거푸…"
    assert eval_command.clip("짧은 답", width=20).plain == "짧은 답"
    assert eval_command.clip(None, width=20).plain == ""
    word = eval_command.clip("x" * 200, width=10).plain
    assert word.split("\n") == ["x" * 10] * 3 + ["x" * 9 + "…"]


def record(prediction: str) -> dict:
    return {"input": "거푸집\x1b]0;title\x07", "instruction": "다음 건설 용어를 설명하세요.",
            "reference": "거푸집은 콘크리트를 부어 넣을 때 모양을 잡아 주는 임시 틀입니다.", "prediction": prediction,
            "base_prediction": "\u202e" + "word " * 300, "terms_missing": ["임시\x00틀"]}


def test_the_examples_table_shows_data_escaped_and_short(monkeypatch):
    console = Console(width=100, record=True, color_system=None, file=open("/dev/null", "w"))
    monkeypatch.setattr(eval_command, "console", console)
    eval_command.show_examples([record("거푸집" * 400)], compare=True)
    text = console.export_text()
    assert "\x1b" not in text and "\x00" not in text and "\u202e" not in text and "\x07" not in text
    assert [line.rstrip() for line in text.splitlines()][4:] == [
        "│ 거푸집\\x1b]0;tit │ 거푸집은         │ 거푸집거푸집거푸 │ \\u202eword word  │ 임시\\x00틀       │",
        "│ le\\x07           │ 콘크리트를 부어  │ 집거푸집거푸집거 │ word word word   │                  │",
        "│                  │ 넣을 때 모양을   │ 푸집거푸집거푸집 │ word word word   │                  │",
        "│                  │ 잡아 주는 임시…  │ 거푸집거푸집거…  │ word word word…  │                  │",
        "└──────────────────┴──────────────────┴──────────────────┴──────────────────┴──────────────────┘",
    ]  # a 1,200-character answer fills EXAMPLE_LINES lines of its column, not dozens
    assert eval_command.column_width(5) == (100 - 16) // 5


def test_the_examples_table_shows_the_question_of_messages_and_sharegpt_rows(monkeypatch):
    from toolkit.config.recipe import DataSection
    from toolkit.data import reading

    console = Console(width=100, record=True, color_system=None, file=open("/dev/null", "w"))
    monkeypatch.setattr(eval_command, "console", console)
    turns = [{"role": "user", "content": "첫 질문"}, {"role": "assistant", "content": "첫 답"},
             {"role": "user", "content": "슬럼프란?"}, {"role": "assistant", "content": "반죽질기 값"}]
    sharegpt = [{"from": "human" if t["role"] == "user" else "gpt", "value": t["content"]} for t in turns]
    for formatter, fields in (("messages", {"messages": turns}), ("sharegpt", {"conversations": sharegpt})):
        section = DataSection(train="t.jsonl", formatter=formatter)
        records = scoring.prediction_records([reading.Row("t.jsonl", 1, fields)], section, [None], ["답변"], None)
        console.export_text()  # clear what an earlier table recorded
        eval_command.show_examples(records, compare=False)
        first_row = [line.rstrip() for line in console.export_text().splitlines()][4]
        assert [cell.strip() for cell in first_row.split("│")[1:4]] == ["슬럼프란?", "반죽질기 값", "답변"]
