"""The built-in tokenizer renders exactly what Llama 3.2 Vision Instruct renders, and the loss covers only the
assistant's answer and its <|eot_id|> (TRL's own masking, checked on its prepared dataset)."""

from __future__ import annotations

import pytest

from toolkit import builtin, data, modeling
from toolkit.recipe import DataSection

USER = "다음 건설 용어를 설명하세요.\n\n거푸집"
ANSWER = "콘크리트를 타설할 때 형상을 유지하는 임시 구조물입니다."
SYSTEM_BLOCK = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
TEXT_ONLY = (
    SYSTEM_BLOCK + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n" + USER + "<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER + "<|eot_id|>"
)
IMAGE_ROW = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>이 현장 사진의 결함은?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n철근 피복 부족<|eot_id|>"
)


@pytest.fixture(scope="module")
def tokenizer():
    return modeling.load_tokenizer("builtin:tiny-mllama")


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_text_only_rendering(tokenizer):
    messages = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
    assert render(tokenizer, messages, date_string="26 Jul 2024") == TEXT_ONLY


def test_system_message_is_trimmed_into_the_system_block(tokenizer):
    messages = [{"role": "system", "content": " S \n"}, {"role": "user", "content": USER}]
    text = render(tokenizer, messages, date_string="26 Jul 2024", add_generation_prompt=True)
    assert text.startswith(SYSTEM_BLOCK + "S<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_image_rows_have_no_system_block(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "이 현장 사진의 결함은?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "철근 피복 부족"}]},
    ]
    assert render(tokenizer, messages) == IMAGE_ROW
    with pytest.raises(Exception, match="incompatible with system messages"):
        render(tokenizer, [{"role": "system", "content": "S"}, *messages])


def test_special_tokens_and_pad(tokenizer):
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert tokenizer.eos_token == "<|eot_id|>"
    specials = builtin.all_special_tokens()
    assert len(specials) == 257 and specials[-1] == "<|image|>"
    ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
    assert ids == list(range(ids[0], ids[0] + 257))  # one contiguous block after the text vocabulary


def test_formatter_pins_the_date(tokenizer):
    section = DataSection(train="t.jsonl")
    row = data.Row("t.jsonl", 1, {"instruction": "다음 건설 용어를 설명하세요.", "input": "거푸집", "output": ANSWER})
    assert data.render_text(data.to_conversation(row, section), tokenizer) == TEXT_ONLY


def test_loss_covers_only_the_answer_and_eot(tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    section = DataSection(train="t.jsonl", system_prompt="건설 용어 도우미")
    rows = [data.Row("t.jsonl", 1, {"instruction": "다음 건설 용어를 설명하세요.", "input": "거푸집", "output": ANSWER})]
    model = modeling.load_model(
        modeling_recipe(), "fp32", modeling.detect_accelerator()
    )
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", completion_only_loss=True, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.to_dataset(rows, section),
                         processing_class=tokenizer)
    example = trainer.train_dataset[0]
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(learned) == ANSWER + "<|eot_id|>"
    full = tokenizer.decode(example["input_ids"])
    assert full.startswith("<|begin_of_text|>") and full.count("<|begin_of_text|>") == 1
    assert "건설 용어 도우미<|eot_id|>" in full


def modeling_recipe():
    from toolkit.recipe import recipe_from_dict

    return recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "t.jsonl"}})
