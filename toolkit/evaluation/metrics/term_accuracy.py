"""term_accuracy: the share of answers that contain every one of their key terms.

Each prediction comes with the list of key terms it should mention (`references`). Rows with no key terms are
left out, since they cannot pass or fail; when no row has any, the result is None ("not available"), never 0.
Matching follows `toolkit.evaluation.terms` (NFKC, case, whitespace and punctuation insensitive); see that module for why
the rule lives there and why this script may import it although `evaluate` copies the script elsewhere.
"""

import datasets
import evaluate

from toolkit.evaluation.terms import split_terms


class TermAccuracy(evaluate.Metric):
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
        scored = [(answer, terms) for answer, terms in zip(predictions, references) if terms]
        if not scored:
            return {"term_accuracy": None}
        passed = sum(1 for answer, terms in scored if not split_terms(answer, terms)[1])
        return {"term_accuracy": passed / len(scored)}
