"""Text normalisation and key-term matching for `toolkit eval` (pure functions, no model, no I/O).

The matching rule. Text and term are both normalised, then the term must occur as a substring of the text:

1. Unicode NFKC: full-width letters and digits become half-width (`Ａ１` -> `A1`), compatibility jamo and
   decomposed (NFD) Hangul compose into syllables (`ㄱㅏ` -> `가`), `㎡` -> `m2`.
2. casefold: Latin letters (and other cased scripts) compare case-insensitively (`LoRA` = `lora`).
3. Every whitespace character and every Unicode punctuation character (categories P*: `·`, `-`, `/`, `(`,
   ...) is removed, plus `ㆍ` (Hangul araea), which Korean text commonly uses as a middle dot.

So `철근 콘크리트` matches `철근콘크리트` (Korean spacing varies between writers), `온도·습도` matches `온도 습도`
and `온도-습도`, `ＲＣ조` matches `rc조`. The price is that whitespace and punctuation never distinguish two terms;
for domain terms that is what we want. Symbols (`°`, `~`, `+`) and digits are kept. A term that normalises to
nothing (only punctuation) counts as found, since there is nothing left to miss.

`exact_match` uses the same `normalize` on the whole answer and reference.

This module is the one place the rule lives. The metric scripts in `toolkit/metrics/` import it with an absolute
`from toolkit.evaluation.terms import ...`: `evaluate.load` copies a metric script into its own module cache and imports the
copy in this same interpreter, where `toolkit` is importable (it is the package running the evaluation), so an
absolute import keeps working after the copy. Only relative imports of files outside the script's own folder would
break, and evaluate's import scanner even checks that `toolkit` can be imported before loading the script.
"""

from __future__ import annotations

import unicodedata

EXTRA_SEPARATORS = frozenset("\u318d\u119e")  # ㆍ (araea, used as a middle dot) and what NFKC turns it into


def dropped(char: str) -> bool:
    """Characters that never distinguish terms: whitespace, punctuation, and the araea used as a middle dot."""
    return char.isspace() or unicodedata.category(char).startswith("P") or char in EXTRA_SEPARATORS


def normalize(text: str) -> str:
    """The comparison form of a text (see the module docstring for the rule)."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return "".join(c for c in folded if not dropped(c))


def split_terms(answer: str, terms: list[str]) -> tuple[list[str], list[str]]:
    """(found, missing): which key terms an answer contains, in the order given, for per-row reports."""
    norm_answer = normalize(answer)
    found = [t for t in terms if normalize(t) in norm_answer]
    missing = [t for t in terms if normalize(t) not in norm_answer]
    return found, missing


def glossary_terms_in(reference: str, glossary: list[str]) -> list[str]:
    """The glossary terms the reference answer uses: what a row without its own `terms` is expected to mention."""
    norm_reference = normalize(reference)
    return list(dict.fromkeys(t for t in glossary if normalize(t) and normalize(t) in norm_reference))


def key_terms(fields: dict, glossary: list[str] | None) -> list[str] | None:
    """A row's key terms: its own `terms` list, else the glossary's terms in its reference, else None (unknown).

    None and [] differ: None means there is nothing to measure against, which must read as "n/a", never as 0.
    """
    if fields.get("terms") is not None:
        return list(fields["terms"])
    if glossary is not None:
        return glossary_terms_in(fields.get("output") or "", glossary)
    return None
