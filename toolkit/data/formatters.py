"""Formatters turn one data row into a conversation: a list of `{"role", "content"}` messages in the order the chat
template renders them. Each format is one `Formatter` record in `FORMATTERS`: its conversion, its row checks and
the columns it keeps as lists; a new format is a new record here, and nothing else names formats or their fields.

A message's content is a string, or a list of parts `{"type": "text", "text": ...}` and `{"type": "image",
"image": path}` (paths as written in the row; `toolkit.data` resolves them). An image always comes first in its
turn, as Llama 3.2 Vision's template places it. The last message is the assistant's answer; for generation (eval,
generate, merge's check) the conversation up to that answer is the prompt.

Row checks return every problem of a row as short texts (`field 'x' ...`), never raise, and are complete: a row
without problems formats without error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from toolkit.data.sources import json_type_name

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
IMAGE_MARKER = "<image>"  # where LLaMA-Factory-style sharegpt rows mark an image in the text


def text_problem(value, name: str, required: bool = True) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a string, got {json_type_name(value)}"
    if required and not value.strip():
        return f"{name} is empty"
    return None


# ---- images named at the row level (alpaca, sharegpt) ----


def row_images(row: dict) -> list[str]:
    """The row's image paths: `image` (one path) or `images` (a list)."""
    if "image" in row:
        return [row["image"]]
    return list(row.get("images") or [])


def row_image_problems(row: dict) -> list[str]:
    problems = []
    if "image" in row and "images" in row:
        problems.append("fields 'image' and 'images' cannot be used together; use 'images' for several")
    if "image" in row:
        problem = text_problem(row["image"], "field 'image'")
        problems += [f"{problem} (a path to the image file)"] if problem else []
    if "images" in row:
        images = row["images"]
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p.strip() for p in images):
            problems.append("field 'images' must be a non-empty list of image paths")
    return problems


def image_parts(paths: list[str]) -> list[dict]:
    return [{"type": "image", "image": path} for path in paths]


def with_images(text: str, paths: list[str]) -> str | list[dict]:
    """A user turn's content: the images first, then the text (a plain string when there is no image)."""
    if not paths:
        return text
    return image_parts(paths) + [{"type": "text", "text": text}]


# ---- alpaca ----


def user_text_alpaca(row: dict) -> str:
    """Instruction, then a blank line and the input when there is one."""
    instruction = row["instruction"].strip()
    extra = (row.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def alpaca(row: dict, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": with_images(user_text_alpaca(row), row_images(row))})
    messages.append({"role": "assistant", "content": (row.get("output") or "").strip()})
    return messages


def alpaca_problems(row: dict) -> list[str]:
    problems = []
    for name in ("instruction", "output"):
        if name not in row:
            problems.append(f"missing field '{name}'")
        else:
            problems += filter(None, [text_problem(row[name], f"field '{name}'")])
    if "input" in row and row["input"] is not None:
        problems += filter(None, [text_problem(row["input"], "field 'input'", required=False)])
    return problems + row_image_problems(row)


# ---- messages (OpenAI style) ----


def part_problems(part, where: str) -> list[str]:
    if not isinstance(part, dict):
        return [f"{where}: a content part must be an object, got {json_type_name(part)}"]
    kind = part.get("type")
    if kind == "text":
        problem = text_problem(part.get("text"), f"{where}: text part's 'text'")
        return [problem] if problem else []
    if kind == "image":
        path = part.get("image", part.get("path"))
        problem = text_problem(path, f"{where}: image part's 'image'")
        return [f"{problem} (a path to the image file)"] if problem else []
    return [f"{where}: content part type {kind!r} is not one of 'text', 'image'"]


def content_problems(message: dict, where: str) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [f"{where}: empty content"] if not content.strip() else []
    if not isinstance(content, list) or not content:
        return [f"{where}: 'content' must be a string or a non-empty list of parts"]
    problems = [p for part in content for p in part_problems(part, where)]
    if problems:
        return problems
    kinds = [part["type"] for part in content]
    if "image" in kinds and message.get("role") != "user":
        problems.append(f"{where}: images are only allowed in user turns")
    if "text" in kinds and "image" in kinds[kinds.index("text") :]:
        problems.append(f"{where}: put the image(s) before the text; Llama 3.2 Vision reads an image first in its turn")
    if "text" not in kinds:
        problems.append(f"{where}: a turn needs some text besides its image(s)")
    return problems


def order_problems(roles: list[str]) -> list[str]:
    """System first and at most once; then user and assistant alternating, starting with user, ending with
    assistant."""
    problems = []
    systems = [i for i, role in enumerate(roles) if role == "system"]
    if len(systems) > 1:
        problems.append(f"two system turns (messages {systems[0] + 1} and {systems[1] + 1}); give at most one, first")
    elif systems and systems[0] != 0:
        problems.append(f"message {systems[0] + 1}: the system turn must come first")
    turns = [role for role in roles if role != "system"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            number = [j for j, r in enumerate(roles) if r != "system"][i] + 1
            article = "an" if expected == "assistant" else "a"
            problems.append(f"message {number}: expected {article} {expected} turn, got {role} (turns alternate, "
                            "user first)")
            break
    if not turns or turns[-1] != "assistant":
        problems.append("the conversation must end with an assistant turn (the answer to learn)")
    return problems


def messages_shape_problems(messages, field: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"field '{field}' must be a non-empty list of turns"]
    problems = []
    for number, message in enumerate(messages, start=1):
        where = f"message {number}"
        if not isinstance(message, dict):
            problems.append(f"{where}: must be an object, got {json_type_name(message)}")
        elif message.get("role") not in ROLES:
            problems.append(f"{where}: role {message.get('role')!r} is not one of {', '.join(ROLES)}")
        else:
            problems += content_problems(message, where)
    if not problems:
        problems += order_problems([m["role"] for m in messages])
    return problems


def messages_problems(row: dict) -> list[str]:
    if "messages" not in row:
        return ["missing field 'messages'"]
    return messages_shape_problems(row["messages"], "messages")


def normalized_content(content):
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part["type"] == "image":
            parts.append({"type": "image", "image": part.get("image", part.get("path"))})
        else:
            parts.append({"type": "text", "text": part["text"]})
    return parts


def messages(row: dict, system_prompt: str | None = None) -> list[dict]:
    turns = [{"role": m["role"], "content": normalized_content(m["content"])} for m in row["messages"]]
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


# ---- sharegpt ----


def sharegpt_turn_problems(turn, number: int) -> list[str]:
    where = f"conversations {number}"
    if not isinstance(turn, dict):
        return [f"{where}: must be an object, got {json_type_name(turn)}"]
    if turn.get("from") not in SHAREGPT_ROLES:
        return [f"{where}: 'from' {turn.get('from')!r} is not one of {', '.join(SHAREGPT_ROLES)}"]
    problem = text_problem(turn.get("value"), f"{where}: 'value'")
    return [problem] if problem else []


def sharegpt_problems(row: dict) -> list[str]:
    turns = row.get("conversations")
    if "conversations" not in row:
        return ["missing field 'conversations'"]
    if not isinstance(turns, list) or not turns:
        return ["field 'conversations' must be a non-empty list of turns"]
    problems = [p for number, turn in enumerate(turns, start=1) for p in sharegpt_turn_problems(turn, number)]
    problems += row_image_problems(row)
    if problems:
        return problems
    problems += order_problems([SHAREGPT_ROLES[t["from"]] for t in turns])
    markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
    if markers and markers != len(row_images(row)):
        problems.append(f"{markers} {IMAGE_MARKER} marker(s) in the text but {len(row_images(row))} image(s)")
    if any(IMAGE_MARKER in t["value"] for t in turns if t["from"] != "human"):
        problems.append(f"{IMAGE_MARKER} may only appear in human turns")
    return problems


def sharegpt(row: dict, system_prompt: str | None = None) -> list[dict]:
    """`conversations` mapped onto messages. Images go first in the human turn that marks them with `<image>`
    (the marker is removed), or in the first human turn when no turn marks them."""
    images = row_images(row)
    marked = any(IMAGE_MARKER in t["value"] for t in row["conversations"])
    turns, next_image = [], 0
    for turn in row["conversations"]:
        role, text = SHAREGPT_ROLES[turn["from"]], turn["value"]
        if role == "user" and marked:
            count = text.count(IMAGE_MARKER)
            text = text.replace(IMAGE_MARKER, "")
            turns.append({"role": role, "content": with_images(text, images[next_image : next_image + count])})
            next_image += count
        elif role == "user" and next_image == 0 and images:
            turns.append({"role": role, "content": with_images(text, images)})
            next_image = len(images)
        else:
            turns.append({"role": role, "content": text})
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


@dataclass(frozen=True)
class Formatter:
    """One row format: how a row becomes a conversation, every problem a row can have, and the fields whose
    values are lists (a CSV cell holds them as JSON text)."""

    name: str
    to_conversation: Callable[[dict, str | None], list[dict]]
    problems: Callable[[dict], list[str]]
    list_fields: tuple[str, ...] = ()


FORMATTERS = {f.name: f for f in (
    Formatter("alpaca", alpaca, alpaca_problems),
    Formatter("messages", messages, messages_problems, list_fields=("messages",)),
    Formatter("sharegpt", sharegpt, sharegpt_problems, list_fields=("conversations",)),
)}
DEFAULT = "alpaca"  # the recipe's default, and the format of the toolkit's shipped general sets
PROMPT_FIELDS = ("instruction", "input")  # an alpaca row's question, kept beside each answer toolkit eval writes
ROW_LIST_FIELDS = ("terms", "images")  # list fields any format may have: key terms, image paths


def list_fields() -> tuple[str, ...]:
    """Every field some format holds as a list."""
    return ROW_LIST_FIELDS + tuple(name for f in FORMATTERS.values() for name in f.list_fields)


def images_in(conversation: list[dict]) -> list[str]:
    """The image paths of a formatted conversation, in order."""
    return [part["image"] for message in conversation if not isinstance(message["content"], str)
            for part in message["content"] if part["type"] == "image"]


def answer_text(conversation: list[dict]) -> str:
    """The last assistant turn's text: the reference answer for eval."""
    content = conversation[-1]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def question_text(conversation: list[dict]) -> str:
    """The last user turn's text, to show beside an answer."""
    user = [m for m in conversation if m["role"] == "user"]
    if not user:
        return ""
    content = user[-1]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")
