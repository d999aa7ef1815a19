"""ROUGE and BLEU modules (loaded by evaluate.load(path)): English and Chinese, standard and LlamaFactory's."""

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from tasks.evaluate import text_scores
from tasks.metrics import load

CHINESE = "今天天气很好，我们去公园散步。"


def test_identical_chinese_text_scores_100():
    scores = text_scores([CHINESE], [CHINESE])
    assert {k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "bleu4")} == pytest.approx(
        {"rouge1": 100, "rouge2": 100, "rougeL": 100, "bleu4": 100})
    assert scores["rouge1_lf"] == pytest.approx(100) and scores["bleu4_lf"] == pytest.approx(100)


def test_chinese_partial_overlap_is_between_0_and_100():
    scores = text_scores(["今天天气很好"], [CHINESE])
    assert 0 < scores["rouge1"] < 100 and 0 < scores["rouge1_lf"] < 100 and 0 < scores["bleu4_lf"] < 100


def test_a_pair_is_tokenized_alike_whatever_language_either_side_holds():
    """A Chinese word on one side only must not change how the other words are cut: the Latin words are
    stemmed on both sides (running -> run), and punctuation counts on neither."""
    mixed = text_scores(["running fast"], ["running fast 很快"])
    assert mixed["rouge1"] == pytest.approx(80)  # 2 of 2 predicted words match, 2 of 3 reference words
    assert text_scores(["返回列表。"], ["返回列表"])["rouge1"] == pytest.approx(100)
    assert text_scores(["Return the list"], ["Return the list."])["rouge1"] == pytest.approx(100)


def test_english_scores_keep_rouge_score_semantics():
    prediction, reference = "Return the largest element of a list.", "Find the n largest elements in a dataset."
    scores = load("rouge").compute(predictions=[prediction], references=[reference])
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(reference, prediction)["rouge1"].fmeasure
    assert scores["rouge1"] == pytest.approx(expected)


def test_english_tokens_are_rouge_scores_own_on_the_bundled_data():
    """Words of every script are kept, and on ASCII text the tokens are rouge-score's tokenizer's, to the letter."""
    import json

    from rouge_score.tokenizers import DefaultTokenizer

    from tasks.metrics.rouge.rouge import MixedTokenizer
    from tests.conftest import BUNDLED_DATA

    rows = [json.loads(line) for line in (BUNDLED_DATA / "pydoc_summaries_test.jsonl").read_text().splitlines()]
    texts = [row[field] for row in rows for field in ("instruction", "input", "output")]
    ours, theirs = MixedTokenizer(use_stemmer=True), DefaultTokenizer(use_stemmer=True)
    assert [ours.tokenize(t) for t in texts] == [theirs.tokenize(t) for t in texts]


@pytest.mark.parametrize("text", ["Привет мир, как дела?", "안녕하세요 세계 좋은 아침입니다", "नमस्ते दुनिया कैसे हो",
                                  "こんにちは世界です。", "Ça coûte très cher, naïve café"])
def test_identical_text_in_any_script_scores_100(text):
    """rouge-score's tokenizer keeps only a-z and 0-9: these scored 0 against themselves."""
    scores = text_scores([text], [text])
    assert {k: scores[k] for k in ("rouge1", "rouge2", "rougeL", "bleu4")} == pytest.approx(
        {"rouge1": 100, "rouge2": 100, "rougeL": 100, "bleu4": 100})


def test_llamafactory_bleu_is_on_characters():
    prediction, reference = "the cat sat", "the cat sat down"
    scores = load("bleu").compute(predictions=[prediction], references=[reference])
    smoothing = SmoothingFunction().method3
    assert scores["bleu4_lf"] == pytest.approx(sentence_bleu([list(reference)], list(prediction),
                                                             smoothing_function=smoothing))
    assert scores["bleu4"] == pytest.approx(sentence_bleu([reference.split()], prediction.split(),
                                                          smoothing_function=smoothing))


def test_empty_predictions_score_zero():
    scores = text_scores([""], ["something"])
    assert scores["rouge1"] == 0 and scores["bleu4"] == 0 and scores["rouge1_lf"] == 0 and scores["bleu4_lf"] == 0
