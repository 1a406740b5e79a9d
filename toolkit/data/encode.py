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

The second half turns a recipe's checked rows into training examples: prompts for generation, length limits
(`data.too_long`, counted, never silent) and the `datasets.Dataset` TRL reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data import formatters, reading, vision
from toolkit.data.formatters import images_in
from toolkit.errors import ToolkitError, first_line

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
    return assemble(messages, template_ids, texts, text_ids, learned_messages(messages, train_on),
                    end_of_turn_id(tokenizer))


def assemble(messages: list[dict], template_ids: list[list[int]], texts: list[tuple[int, str]],
             text_ids: list[list[int]], learn: set[int], eot: int) -> Encoded:
    """The row's ids: template pieces and message texts interleaved; the mask covers each learned message's text
    and the template's tokens up to and including the end-of-turn token that closes it."""
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


class BatchEncoder:
    """Encodes many conversations with few tokenizer calls; each row's ids and mask equal `encode_conversation`'s.

    Two things make the per-row path slow, and neither needs to be done per row:
    - Rendering the template. With every text replaced by a numbered placeholder, the rendering depends only on the
      conversation's shape (roles, content parts, image paths), so each shape is rendered and its template pieces
      tokenized once (kept in a bounded memo).
    - Tokenizing the texts. All message texts of a batch go to the tokenizer in one call (its batch API), with
      special-token text split exactly as in the per-row path.
    """

    MEMO_SHAPES = 4096  # rows with images have a shape per image path; the memo is emptied when it fills up

    def __init__(self, tokenizer, date_string: str, train_on: str = "all", add_generation_prompt: bool = False):
        self.tokenizer, self.date_string, self.train_on = tokenizer, date_string, train_on
        self.add_generation_prompt = add_generation_prompt
        self.eot = end_of_turn_id(tokenizer)
        self.shapes: dict[str, list[list[int]]] = {}

    def template_ids(self, messages: list[dict]) -> tuple[list[list[int]], list[tuple[int, str]]]:
        shaped, texts = with_placeholders(messages)
        key = json.dumps(shaped, ensure_ascii=False)
        ids = self.shapes.get(key)
        if ids is None:
            pieces, _ = render_skeleton(messages, self.tokenizer, self.date_string, self.add_generation_prompt)
            ids = token_ids(self.tokenizer, pieces, as_text=False)
            if len(self.shapes) >= self.MEMO_SHAPES:
                self.shapes.clear()
            self.shapes[key] = ids
        return ids, texts

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        """Ids of message texts with special-token strings split, as `token_ids(..., as_text=True)` gives them.

        transformers' batch call sets the Rust tokenizer's `encode_special_tokens` (that is what
        `split_special_tokens` does) and then spends more time turning each result into Python dicts than the
        tokenizer spends encoding; the ids alone are read straight from the Rust tokenizer here. Tokenizers without
        a Rust backend, or with truncation or padding set on it, go through transformers."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation or backend.padding:
            return token_ids(self.tokenizer, texts, as_text=True)
        if not texts:
            return []
        before = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = before

    def encode(self, conversations: list[list[dict]]) -> list[Encoded]:
        plans = [self.template_ids(messages) for messages in conversations]
        text_ids = self.text_ids([text for _, texts in plans for _, text in texts])
        encoded, start = [], 0
        for messages, (template, texts) in zip(conversations, plans):
            pieces = text_ids[start : start + len(texts)]
            start += len(texts)
            encoded.append(assemble(messages, template, texts, pieces, learned_messages(messages, self.train_on),
                                    self.eot))
        return encoded


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


def special_pattern(specials: list[str]) -> re.Pattern:
    """One regular expression for all special-token strings: a Llama 3 tokenizer has over 250, and one search per
    text is much faster than one `in` test per token."""
    return re.compile("|".join(re.escape(s) for s in specials) or "(?!)")


def special_text_in(messages: list[dict], pattern: re.Pattern) -> str | None:
    """The first special-token string written inside a message text, or None."""
    for message in messages:
        content = message["content"]
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
        for text in parts:
            found = pattern.search(text)
            if found:
                return found.group()
    return None


# --- rows of a recipe ---------------------------------------------------------------------------------------------

def prompt(row: reading.Row, data_section, tokenizer) -> Encoded:
    """The prompt exactly as training encoded that part of the row, ending where the answer starts (its images
    ride along in `.images`)."""
    return encode_prompt(reading.prompt_messages(row, data_section), tokenizer, data_section.date_string)


def prompt_ids(row: reading.Row, data_section, tokenizer) -> list[int]:
    return prompt(row, data_section, tokenizer).input_ids


def question_prompt(text: str, data_section, tokenizer, image: str | None = None) -> Encoded:
    """A free question (toolkit generate) as one user turn, with the recipe's system prompt and pinned date;
    with an image, the image comes first and there is no system prompt (the template refuses the two together)."""
    if image and data_section.system_prompt:
        raise ToolkitError("--image: the run's recipe sets data.system_prompt, and Llama 3.2 Vision's template "
                           "refuses a system prompt beside an image")
    messages = [{"role": "system", "content": data_section.system_prompt}] if data_section.system_prompt else []
    content = formatters.with_images(text, [str(Path(image).expanduser().resolve())] if image else [])
    messages.append({"role": "user", "content": content})
    return encode_prompt(messages, tokenizer, data_section.date_string)


KEPT, CUT, DROPPED_LONG, DROPPED_EMPTY, DROPPED_IMAGE = range(5)  # what the length limit did to a row


@dataclass
class Encoding:
    """Rows encoded for training, and what length limits did to them (reported, never silent)."""

    rows: list[reading.Row] = field(default_factory=list)
    examples: list[Encoded] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # every row read, before any cut, for the length report
    kept_lengths: list[int] = field(default_factory=list)  # the kept rows' lengths before any cut
    truncated: int = 0  # cut to the limit, some answer left
    dropped_long: int = 0  # over the limit with data.too_long=drop
    dropped_empty: int = 0  # truncation would have left no answer token
    dropped_image: int = 0  # truncation would have cut an image token away
    special_text: list[str] = field(default_factory=list)  # where rows hold special-token text

    @property
    def dropped(self) -> int:
        return self.dropped_long + self.dropped_empty + self.dropped_image

    @property
    def special_rows(self) -> int:
        return len(self.special_text)

    @property
    def image_rows(self) -> int:
        return sum(bool(e.images) for e in self.examples)

    @property
    def image_flags(self) -> list[bool]:
        return [bool(e.images) for e in self.examples]

    @property
    def images_total(self) -> int:
        return sum(len(e.images) for e in self.examples)

    @property
    def max_images(self) -> int:
        return max((len(e.images) for e in self.examples), default=0)

    def dataset(self, order=None):
        """The kept rows, in `order` (indices into them) when given, as a `datasets.Dataset` for TRL."""
        return to_dataset(self.examples if order is None else [self.examples[i] for i in order])

    def add(self, row: reading.Row, encoded: Encoded, fitted: Encoded | None, status: int,
            special: bool) -> None:
        self.lengths.append(len(encoded.input_ids))
        if special:
            self.special_text.append(row.where or f"{row.source}:{row.line}")
        self.truncated += status == CUT
        self.dropped_long += status == DROPPED_LONG
        self.dropped_empty += status == DROPPED_EMPTY
        self.dropped_image += status == DROPPED_IMAGE
        if fitted is not None:
            self.rows.append(row)
            self.examples.append(fitted)
            self.kept_lengths.append(len(encoded.input_ids))


def fit(encoded: Encoded, limit: int, data_section, image_token_id: int | None):
    """(the row within `limit` tokens or None when it has to be dropped, what happened: KEPT, CUT or DROPPED_*)."""
    if len(encoded.input_ids) <= limit:
        return encoded, KEPT
    if data_section.too_long == "drop":
        return None, DROPPED_LONG
    cut = truncate(encoded, limit)
    if cut is None:
        return None, DROPPED_EMPTY
    if image_token_id is not None and cut.input_ids.count(image_token_id) < encoded.input_ids.count(image_token_id):
        return None, DROPPED_IMAGE
    return cut, CUT


class RowEncoder:
    """Checks and encodes rows in batches for one recipe and tokenizer; one per process, so each worker keeps its
    own template memo and image checks."""

    def __init__(self, data_section, tokenizer, limit: int):
        self.data_section, self.tokenizer, self.limit = data_section, tokenizer, limit
        self.encoder = BatchEncoder(tokenizer, data_section.date_string, data_section.train_on)
        self.specials = special_pattern(special_token_texts(tokenizer))
        self.image_token_id = tokenizer.convert_tokens_to_ids(vision.IMAGE_TOKEN) if vision.IMAGE_TOKEN in \
            tokenizer.get_vocab() else None
        self.images = reading.ImageChecks()

    def check(self, records) -> tuple[list[reading.Row], list[tuple[int, str]]]:
        return reading.check_records(records, self.data_section, self.images)

    def encode(self, rows: list[reading.Row]):
        """(row, encoded before any cut, fitted row or None, status, has special-token text) for each row."""
        conversations = [reading.conversation(row, self.data_section) for row in rows]
        encoded = self.encoder.encode(conversations)
        for row, messages, one in zip(rows, conversations, encoded):
            fitted, status = fit(one, self.limit, self.data_section, self.image_token_id)
            yield row, one, fitted, status, special_text_in(messages, self.specials) is not None


ENCODE_BATCH_ROWS = 512  # rows per tokenizer call


def encode_rows(rows: list[reading.Row], data_section, tokenizer, limit: int) -> Encoding:
    """Encode every row; cut or drop rows over `limit` tokens as data.too_long says, counting each case. A cut
    never removes an image token: such a row is dropped and counted."""
    result = Encoding()
    encoder = RowEncoder(data_section, tokenizer, limit)
    for start in range(0, len(rows), ENCODE_BATCH_ROWS):
        for item in encoder.encode(rows[start : start + ENCODE_BATCH_ROWS]):
            result.add(*item)
    return result


def percentiles(values, points=(50, 90, 99, 100)) -> dict[str, int]:
    """Nearest-rank percentiles of a list or array of numbers (a million lengths sort in milliseconds)."""
    import numpy as np

    ordered = np.sort(np.asarray(values))
    return {f"p{p}": int(ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]) for p in points}


def to_dataset(examples: list[Encoded]):
    """Pre-tokenized rows in the columns TRL reads as they are (`input_ids`, `completion_mask`), plus
    `image_paths` when any row has an image (read by `toolkit.data.vision.VisionCollator`)."""
    from datasets import Dataset

    columns = {"input_ids": [e.input_ids for e in examples], "completion_mask": [e.completion_mask for e in examples]}
    if any(e.images for e in examples):
        columns["image_paths"] = [list(e.images) for e in examples]
    return Dataset.from_dict(columns)
