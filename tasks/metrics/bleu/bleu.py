"""Sentence BLEU-4 with smoothing (method 3), averaged over examples, as LlamaFactory reports it."""

import datasets
import evaluate
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean sentence-level BLEU-4 (nltk, smoothing method 3) over whitespace tokens.",
            citation="Papineni et al., 2002. BLEU: a Method for Automatic Evaluation of Machine Translation.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        smoothing = SmoothingFunction().method3
        scores = [
            sentence_bleu([reference.split()], prediction.split(), smoothing_function=smoothing)
            if prediction.split() and reference.split()
            else 0.0
            for prediction, reference in zip(predictions, references, strict=True)
        ]
        return {"bleu4": sum(scores) / max(len(scores), 1)}
