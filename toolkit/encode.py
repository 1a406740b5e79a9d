"""A conversation becomes the token ids and loss mask the trainer sees, rendered by the model's own chat template.

Why the toolkit tokenizes instead of handing TRL the messages:
- Data text must stay text. Tokenizing a rendered conversation in one piece turns `<|eot_id|>` or
  `<|start_header_id|>` written inside a row into real special tokens, so a row could end a turn or open a new one.
  Here the template is rendered with a placeholder for every message text; the template's own pieces are tokenized
  with special tokens recognized and each message text with them split (`split_special_tokens=True`), so the text
  `<|eot_id|>` becomes the tokens of its characters. For rows without such text the ids equal those of the whole
  rendering tokenized at once (tested), because every text sits between special tokens or the template's `\n\n`.
- The loss covers every assistant turn of a multi-turn row (or only the last), each answer plus its end-of-turn
  token. TRL's prompt-completion form only masks a single final answer, and its assistant masks need a template with
  generation markers, which Llama 3's templates do not have.
TRL then masks the labels from `completion_mask` as it does for its own tokenized rows.

Every message text is stripped of surrounding whitespace, as Llama 3's template does for the system message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from toolkit.errors import ToolkitError, first_line
from toolkit.formatters import images_in

END_OF_TURN = "<|eot_id|>"
OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters: no template writes them
PLACEHOLDER = re.compile(f"{OPEN}(\\d+){CLOSE}")


@dataclass(frozen=True)
class Encoded:
    """One training row: token ids, per token 1 where the loss applies, and the row's image paths in the order
    their `<|image|>` tokens appear."""

    input_ids: list[int]
    completion_mask: list[int]
    images: tuple[str, ...] = ()

    @property
    def learned(self) -> int:
        return sum(self.completion_mask)


def with_placeholders(messages: list[dict]) -> tuple[list[dict], list[tuple[int, str]]]:
    """The messages with every text replaced by a numbered placeholder, and (message index, text) per placeholder."""
    texts: list[tuple[int, str]] = []

    def hold(index: int, text: str) -> str:
        texts.append((index, text.strip()))
        return f"{OPEN}{len(texts) - 1}{CLOSE}"

    shaped = []
    for index, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            content = hold(index, content)
        else:
            content = [{"type": "text", "text": hold(index, part["text"])} if part.get("type") == "text" else dict(part)
                       for part in content]
        shaped.append({"role": message["role"], "content": content})
    return shaped, texts


def render_skeleton(messages: list[dict], tokenizer, date_string: str, add_generation_prompt: bool):
    shaped, texts = with_placeholders(messages)
    try:
        skeleton = tokenizer.apply_chat_template(shaped, tokenize=False, date_string=date_string,
                                                 add_generation_prompt=add_generation_prompt)
    except Exception as err:  # the template's own raise_exception (e.g. a system message beside an image)
        raise ToolkitError(f"the chat template refused this conversation: {first_line(err)}") from None
    pieces = PLACEHOLDER.split(skeleton)  # template text, index, template text, index, ..., template text
    order = [int(i) for i in pieces[1::2]]
    if order != list(range(len(texts))):
        raise ToolkitError("the model's chat template does not render every message text exactly once, in order; "
                           "the toolkit trains Llama 3 chat templates")
    return pieces[0::2], texts


def token_ids(tokenizer, texts: list[str], as_text: bool) -> list[list[int]]:
    """Ids of each piece; `as_text` encodes special-token strings as ordinary characters."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]


def end_of_turn_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ToolkitError(f"the tokenizer has no {END_OF_TURN} token; the toolkit trains Llama 3 chat models")
    return token_id


def learned_messages(messages: list[dict], train_on: str) -> set[int]:
    """Which assistant turns the loss covers: "all", "last", or "none" (a prompt)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return set() if train_on == "none" else set(assistant[-1:] if train_on == "last" else assistant)


def encode_conversation(messages: list[dict], tokenizer, date_string: str, train_on: str = "all",
                        add_generation_prompt: bool = False) -> Encoded:
    """Token ids of the rendered conversation; the mask marks each learned assistant turn's text and the
    end-of-turn token that closes it."""
    template_pieces, texts = render_skeleton(messages, tokenizer, date_string, add_generation_prompt)
    template_ids = token_ids(tokenizer, template_pieces, as_text=False)
    text_ids = token_ids(tokenizer, [text for _, text in texts], as_text=True)
    learn = learned_messages(messages, train_on)
    eot = end_of_turn_id(tokenizer)
    ids: list[int] = list(template_ids[0])
    mask: list[int] = [0] * len(ids)
    for (message_index, _), piece_ids, following in zip(texts, text_ids, template_ids[1:]):
        learned = message_index in learn
        ids += piece_ids
        mask += [int(learned)] * len(piece_ids)
        tail = [0] * len(following)
        if learned and eot in following:  # the template's end of this turn: learned, so the model learns to stop
            upto = following.index(eot)
            tail[: upto + 1] = [1] * (upto + 1)
        ids += following
        mask += tail
    return Encoded(ids, mask, tuple(images_in(messages)))


def encode_prompt(messages: list[dict], tokenizer, date_string: str) -> Encoded:
    """A prompt that ends where the assistant's answer starts (for generation); nothing in it is learned."""
    return encode_conversation(messages, tokenizer, date_string, train_on="none", add_generation_prompt=True)


def truncate(encoded: Encoded, limit: int) -> Encoded | None:
    """The first `limit` tokens; None when nothing learned would be left (the row would teach nothing)."""
    if len(encoded.input_ids) <= limit:
        return encoded
    cut = Encoded(encoded.input_ids[:limit], encoded.completion_mask[:limit], encoded.images)
    return cut if cut.learned else None


def special_token_texts(tokenizer) -> list[str]:
    """The special-token strings a data row could contain by accident or on purpose (`<|eot_id|>`, ...)."""
    return sorted({t for t in tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder) if t}, key=len,
                  reverse=True)


def special_text_in(messages: list[dict], specials: list[str]) -> str | None:
    """The first special-token string written inside a message text, or None."""
    for message in messages:
        content = message["content"]
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
        for text in parts:
            for special in specials:
                if special in text:
                    return special
    return None
