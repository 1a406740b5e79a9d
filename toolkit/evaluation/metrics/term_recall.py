"""term_recall: key terms found in the answers / key terms expected, pooled over all rows.

Unlike term_accuracy it gives partial credit: an answer with 2 of 3 terms adds 2 found and 3 expected. When no
row has any key term the result is None ("not available"), never 0. Matching follows `toolkit.evaluation.terms`; see that
module for why the rule lives there and why this script may import it although `evaluate` copies the script.
"""

import datasets
import evaluate

from toolkit.evaluation.terms import split_terms


class TermRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of answers; references: list of key-term lists, one per answer.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        expected = sum(len(terms) for terms in references)
        if not expected:
            return {"term_recall": None}
        found = sum(len(split_terms(answer, terms)[0]) for answer, terms in zip(predictions, references))
        return {"term_recall": found / expected}
