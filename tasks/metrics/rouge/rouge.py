"""ROUGE-1/2/L F-measure averaged over examples: the standard scores (Google's `rouge-score`, stemmed, with the
words of every script kept: its own tokenizer keeps only a-z and 0-9, so Chinese, Russian or Korean text scored 0
even against itself; Chinese and Japanese are cut into words by jieba), and LlamaFactory's (`*_lf`:
`rouge-chinese` on jieba words, as its ComputeSimilarity reports them). Self-contained so `evaluate.load(path)`
reads it."""

import unicodedata

import datasets
import evaluate
import jieba
import regex
from nltk.stem.porter import PorterStemmer
from rouge_chinese import Rouge as ChineseRouge
from rouge_score import rouge_scorer

# Chinese characters, Japanese kana and their punctuation and full-width forms: text written without spaces
CJK_STRETCHES = regex.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef"
                              r"\U00020000-\U0003134f]+)")
WORDS = regex.compile(r"[\p{L}\p{N}\p{M}]+")  # letters with their combining marks, and digits
ENGLISH_WORD = regex.compile(r"[a-z0-9]+")
jieba.setLogLevel(60)  # no "Building prefix dict" chatter on every first use


class MixedTokenizer:
    """Lowercased words of any script, English ones stemmed as rouge-score stems them (on ASCII text this is
    rouge-score's own tokenizer: words of a-z and 0-9, Porter-stemmed from four letters on), and jieba words for
    Chinese and Japanese stretches (punctuation dropped). Each stretch is cut the same way whatever else the text
    holds, so a prediction and its reference are always tokenized alike (a text with one Chinese word once went
    wholly through jieba, unstemmed, against a stemmed reference)."""

    def __init__(self, use_stemmer: bool):
        self.stemmer = PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        words = []
        for index, stretch in enumerate(CJK_STRETCHES.split(text)):
            if index % 2 == 0:
                words += [self.stem(w) for w in WORDS.findall(stretch.lower())]
            else:
                words += [w.lower() for w in jieba.cut(stretch) if w.strip() and not all(map(punctuation, w))]
        return words

    def stem(self, word: str) -> str:
        if self.stemmer and len(word) > 3 and ENGLISH_WORD.fullmatch(word):
            return self.stemmer.stem(word)
        return word


def punctuation(char: str) -> bool:
    return unicodedata.category(char).startswith("P") or char.isspace()


def llamafactory_scores(prediction: str, reference: str) -> dict[str, float]:
    """rouge-chinese F-measures on jieba words; 0 where either side has no word (LlamaFactory's rule)."""
    hypothesis, target = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    if not hypothesis.split() or not target.split():
        return {"rouge1_lf": 0.0, "rouge2_lf": 0.0, "rougeL_lf": 0.0}
    scores = ChineseRouge().get_scores(hypothesis, target)[0]
    return {"rouge1_lf": scores["rouge-1"]["f"], "rouge2_lf": scores["rouge-2"]["f"],
            "rougeL_lf": scores["rouge-l"]["f"]}


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE F-measure (rouge1, rouge2, rougeL), mean over examples; *_lf as LlamaFactory reports.",
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rouge_types=("rouge1", "rouge2", "rougeL"), use_stemmer=True):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), tokenizer=MixedTokenizer(use_stemmer))
        names = [*rouge_types, "rouge1_lf", "rouge2_lf", "rougeL_lf"]
        totals = dict.fromkeys(names, 0.0)
        for prediction, reference in zip(predictions, references, strict=True):
            scores = scorer.score(reference, prediction)
            for name in rouge_types:
                totals[name] += scores[name].fmeasure
            for name, value in llamafactory_scores(prediction, reference).items():
                totals[name] += value
        count = max(len(predictions), 1)
        return {name: total / count for name, total in totals.items()}
