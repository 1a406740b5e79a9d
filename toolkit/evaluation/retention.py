"""What domain tuning cost: the same general questions answered by the base and the tuned model, side by side.

A tuned adapter can raise the domain's term accuracy and quietly damage what the base model already knew. This
module measures that drift on a *general* set (the toolkit ships one: short Korean and English questions with
reference answers and key terms, plus a few image prompts, in `toolkit/assets/retention/`), three ways:

- term accuracy, base vs tuned: does the tuned model still name the right thing (same metric as `toolkit eval`);
- mean per-token KL(tuned || base) on the reference answers, teacher-forced: how far the tuned model's next-token
  distributions moved on text the base knew, whether or not greedy decoding shows it yet. It is taken over the
  tokens the loss would cover for that row (each answer token and its end of turn), pooled over the whole set;
- the share of greedy answers that changed at all.

"Base" is the same loaded model inside `base()` (PEFT's `disable_adapter` by default), so base and tuned differ
only by the adapter; with the same model on both sides every number is exactly zero (tested).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from toolkit.data import encode, formatters, reading, sources
from toolkit.errors import ToolkitError
from toolkit.evaluation import generation, terms
from toolkit.ui.report import progress_bar

ANSWER_TOKENS = 64  # general answers are one sentence; a longer cap only costs time on a base that never stops
KL_BATCH_SIZE = 8


def shipped_set() -> Path:
    """The general set the toolkit ships (alpaca rows with `terms`; image paths relative to its folder)."""
    return Path(str(resources.files("toolkit").joinpath("assets/retention/general.jsonl")))


@dataclass
class GeneralSet:
    """General rows ready to ask: where they came from, how to read them, and what was left out."""

    source: str
    section: object  # the DataSection the rows are read with
    rows: list[reading.Row]
    skipped_images: int = 0  # image rows left out because the model reads no images

    @property
    def image_rows(self) -> int:
        return sum(bool(formatters.images_in(reading.conversation(row, self.section))) for row in self.rows)

    @property
    def references(self) -> list[str]:
        return [reading.reference(row, self.section) for row in self.rows]

    @property
    def key_terms(self) -> list[list[str] | None]:
        return [terms.key_terms({"terms": row.fields.get("terms"), "output": ref}, None)
                for row, ref in zip(self.rows, self.references)]


def general_section(run_section, path: str | None):
    """How general rows are read: the shipped set as alpaca rows, a user's file with the run's formatter; both
    with the run's pinned date and no system prompt (the questions are asked plainly, as of any model)."""
    formatter = formatters.DEFAULT if path is None else run_section.formatter
    return run_section.model_copy(update={"formatter": formatter, "system_prompt": None, "image_root": None,
                                          "eval": None, "eval_fraction": 0.0, "glossary": None})


def load_general_set(run_section, path: str | None = None, key: str = "--retention-data",
                     reads_images: bool = True) -> GeneralSet:
    """Read and check the general rows (every problem at once, named by `key`); image rows are dropped and
    counted when the model has no vision tower. Fails when no row is left or no row has key terms."""
    section = general_section(run_section, path)
    file = Path(path) if path is not None else shipped_set()
    problems = sources.check_exists(str(file), key)
    if problems:
        raise ToolkitError(problems[0])
    rows, problems = reading.parse_rows(file, section)
    reading.raise_problems(problems, key)
    kept = [row for row in rows if reads_images or not formatters.images_in(reading.conversation(row, section))]
    general = GeneralSet(str(file) if path is not None else "shipped general set", section, kept,
                         skipped_images=len(rows) - len(kept))
    if not kept:
        raise ToolkitError(f"{key} {file}: no rows to ask" + (" (every row has an image and the model reads none)"
                                                             if rows else ""))
    if not any(general.key_terms):
        raise ToolkitError(f"{key} {file}: no row has 'terms'; a general set needs key terms to score answers")
    return general


def answer_positions(completion_mask: list[int]) -> list[int]:
    """Positions whose logits predict a learned token: the one before each masked token (causal shift)."""
    return [t - 1 for t, learned in enumerate(completion_mask) if learned and t > 0]


def token_kl(tuned_logits, base_logits):
    """KL(tuned || base) in nats for each row of logits (shape [N, vocab]), computed in float32."""
    import torch

    tuned = torch.log_softmax(tuned_logits.float(), dim=-1)
    base = torch.log_softmax(base_logits.float(), dim=-1)
    return (tuned.exp() * (tuned - base)).sum(dim=-1)


def teacher_forced(rows: list[reading.Row], section, tokenizer) -> list[encode.Encoded]:
    """Each row with its reference answer, encoded exactly as training encodes a row (the loss mask marks the
    last answer and its end of turn)."""
    return [encode.encode_conversation(reading.conversation(row, section), tokenizer, section.date_string, "last")
            for row in rows]


def padded_batch(tokenizer, examples: list[encode.Encoded], device, images=None) -> dict:
    """Right-padded ids and attention mask (positions stay those of the unpadded row), plus image inputs."""
    import torch

    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        ids[i, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention[i, : len(example.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": attention}
    if any(e.images for e in examples):
        if images is None:
            raise ToolkitError("these rows have images, but the model has no vision tower to read them")
        batch = images.add(batch, [list(e.images) for e in examples])
    return {key: value.to(device) for key, value in batch.items()}


def answer_kl(model, tokenizer, examples: list[encode.Encoded], base, images=None,
              batch_size: int = KL_BATCH_SIZE) -> list[tuple[float, int]]:
    """(summed KL(tuned || base) in nats, answer tokens) per example, in order, teacher-forced on the reference."""
    import torch

    out: list[tuple[float, int]] = []
    with progress_bar() as progress:
        task = progress.add_task("KL on references", total=len(examples), status="")
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = padded_batch(tokenizer, chunk, model.device, images)
            with torch.inference_mode():
                tuned_logits = model(**batch).logits
                with base():
                    base_logits = model(**batch).logits
            for i, example in enumerate(chunk):
                where = answer_positions(example.completion_mask)
                kl = token_kl(tuned_logits[i, where], base_logits[i, where])
                out.append((float(kl.sum()), len(where)))
            progress.update(task, advance=len(chunk))
    return out


@dataclass
class Retention:
    """The drift numbers for one general set, and per row what was asked, answered and how far it moved."""

    source: str
    n_examples: int
    skipped_images: int
    base: dict
    tuned: dict
    kl_per_token: float
    answer_tokens: int
    changed_share: float
    records: list[dict] = field(default_factory=list)

    @property
    def delta(self) -> dict:
        return {k: None if self.tuned[k] is None or self.base[k] is None else self.tuned[k] - self.base[k]
                for k in ("term_accuracy", "term_recall", "exact_match")}

    def summary(self) -> dict:
        """What eval.json keeps (the per-row records go to their own file)."""
        return {"data": self.source, "n_examples": self.n_examples, "skipped_image_rows": self.skipped_images,
                "base": self.base, "tuned": self.tuned, "delta": self.delta, "kl_per_token": self.kl_per_token,
                "answer_tokens": self.answer_tokens, "changed_share": self.changed_share}


def measure(model, tokenizer, general: GeneralSet, *, base=None, images=None, batch_size: int = 8,
            max_new_tokens: int = ANSWER_TOKENS, metrics=None) -> Retention:
    """Ask the general set with the adapter on and inside `base()` (default: `model.disable_adapter`), score both
    sets of greedy answers, and measure KL(tuned || base) on the reference answers."""
    from toolkit.evaluation.scoring import load_metrics, score

    base = base or model.disable_adapter
    metrics = metrics or load_metrics()
    prompts = [encode.prompt(row, general.section, tokenizer) for row in general.rows]
    settings = (tokenizer, prompts, batch_size, max_new_tokens)
    tuned_answers = generation.generate_answers(model, *settings, label="general, tuned", images=images)
    with base():
        base_answers = generation.generate_answers(model, *settings, label="general, base", images=images)
    kl = answer_kl(model, tokenizer, teacher_forced(general.rows, general.section, tokenizer), base, images)
    references, key_terms = general.references, general.key_terms
    tokens = sum(n for _, n in kl)
    records = [{"question": formatters.question_text(reading.conversation(row, general.section)),
                "images": formatters.images_in(reading.conversation(row, general.section)), "reference": reference,
                "terms": row_terms, "prediction": tuned, "base_prediction": base_answer,
                "changed": tuned != base_answer, "kl_per_token": total / n if n else None}
               for row, reference, row_terms, tuned, base_answer, (total, n)
               in zip(general.rows, references, key_terms, tuned_answers, base_answers, kl)]
    return Retention(
        source=general.source, n_examples=len(general.rows), skipped_images=general.skipped_images,
        base=score(metrics, base_answers, references, key_terms),
        tuned=score(metrics, tuned_answers, references, key_terms),
        kl_per_token=sum(total for total, _ in kl) / tokens if tokens else 0.0, answer_tokens=tokens,
        changed_share=sum(r["changed"] for r in records) / len(records), records=records)


def warnings(retention: Retention, settings) -> list[str]:
    """One line per recipe threshold (`retention.max_kl`, `retention.max_accuracy_drop`) the drift is above."""
    lines = []
    if retention.kl_per_token > settings.max_kl:
        lines.append(f"general drift: KL(tuned || base) is {retention.kl_per_token:.3f} nats per answer token, "
                     f"above retention.max_kl={settings.max_kl:g}")
    drop = retention.delta["term_accuracy"]
    if drop is not None and -drop > settings.max_accuracy_drop:
        lines.append(f"general drift: term accuracy fell by {-drop:.3f} ({retention.base['term_accuracy']:.3f} -> "
                     f"{retention.tuned['term_accuracy']:.3f}), more than retention.max_accuracy_drop="
                     f"{settings.max_accuracy_drop:g}")
    return lines


def no_adapter():
    """A `base` for `measure` that changes nothing: the model against itself (all drift is zero)."""
    return contextlib.nullcontext()
