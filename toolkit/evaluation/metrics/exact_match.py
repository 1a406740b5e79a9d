"""exact_match: the share of answers equal to their reference after normalisation.

Both sides go through `toolkit.evaluation.terms.normalize` (NFKC, casefold, all whitespace and punctuation removed), so
spacing, full-width forms and a missing final period do not count as differences. See `toolkit.evaluation.terms` for why
this script may import it although `evaluate` copies the script into its own cache.
"""

import datasets
import evaluate

from toolkit.evaluation.terms import normalize


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions: list of answers; references: list of reference answers.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"exact_match": None}
        same = sum(1 for answer, reference in zip(predictions, references) if normalize(answer) == normalize(reference))
        return {"exact_match": same / len(predictions)}
