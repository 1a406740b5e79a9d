"""Formatters turn one data row into a prompt/completion conversation. Plain functions in a dict; add one here.

Each returns `{"prompt": [messages...], "completion": [assistant message]}`, TRL's conversational
prompt-completion form, so TRL masks the loss to the completion (assistant content and its end-of-turn token).
"""

from __future__ import annotations

REQUIRED_FIELDS = {"alpaca": ("instruction", "output")}
OPTIONAL_TEXT_FIELDS = {"alpaca": ("input",)}


def user_text_alpaca(row: dict) -> str:
    """Instruction, then a blank line and the input when there is one."""
    instruction = row["instruction"].strip()
    extra = (row.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def alpaca(row: dict, system_prompt: str | None = None) -> dict:
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompt.append({"role": "user", "content": user_text_alpaca(row)})
    answer = (row.get("output") or "").strip()  # absent when only a prompt is wanted (generation)
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}


FORMATTERS = {"alpaca": alpaca}
