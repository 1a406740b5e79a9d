"""Formatters turn one data row into a conversation: a list of `{"role", "content"}` messages in the order the chat
template renders them. Plain functions in a dict; add one here with the fields it needs.

The last message is the assistant's answer; for generation (eval, generate, merge's check) a formatter is called on
a row without an answer and the conversation up to that answer is used as the prompt.
"""

from __future__ import annotations

REQUIRED_FIELDS = {"alpaca": ("instruction", "output")}
OPTIONAL_TEXT_FIELDS = {"alpaca": ("input",)}


def user_text_alpaca(row: dict) -> str:
    """Instruction, then a blank line and the input when there is one."""
    instruction = row["instruction"].strip()
    extra = (row.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def alpaca(row: dict, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_text_alpaca(row)})
    messages.append({"role": "assistant", "content": (row.get("output") or "").strip()})
    return messages


FORMATTERS = {"alpaca": alpaca}
