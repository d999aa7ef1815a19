"""Sentence BLEU-4 with smoothing method 3, averaged over examples: the standard score (on words: whitespace
words for text written with spaces, jieba words for Chinese and Japanese), and LlamaFactory's (`bleu4_lf`: on
characters, as its ComputeSimilarity computes it). Self-contained so `evaluate.load(path)` reads it."""

import re

import datasets
import evaluate
import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

# Chinese characters, Japanese kana and their punctuation and full-width forms: text written without spaces
CJK_STRETCHES = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef"
                           r"\U00020000-\U0003134f]+)")
jieba.setLogLevel(60)


def words(text: str) -> list[str]:
    """Whitespace words of the text's stretches written with spaces, jieba words of its Chinese and Japanese ones:
    each stretch cut the same way whatever else the text holds, so a prediction and its reference are always split
    alike."""
    out = []
    for index, stretch in enumerate(CJK_STRETCHES.split(text)):
        out += stretch.split() if index % 2 == 0 else [w for w in jieba.cut(stretch) if w.strip()]
    return out


def bleu(reference: list[str], prediction: list[str]) -> float:
    if not reference or not prediction:
        return 0.0
    return sentence_bleu([reference], prediction, smoothing_function=SmoothingFunction().method3)


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean sentence-level BLEU-4 (nltk, smoothing method 3) on words; bleu4_lf on characters.",
            citation="Papineni et al., 2002. BLEU: a Method for Automatic Evaluation of Machine Translation.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        pairs = list(zip(predictions, references, strict=True))
        count = max(len(pairs), 1)
        return {
            "bleu4": sum(bleu(words(r), words(p)) for p, r in pairs) / count,
            "bleu4_lf": sum(bleu(list(r), list(p)) for p, r in pairs) / count,
        }
