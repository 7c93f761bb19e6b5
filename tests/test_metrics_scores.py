"""Answer scores against computations done by hand."""

import math

import pytest

from appliance.metrics.scores import bleu, chrf, exact_match, token_f1


def test_bleu_is_the_geometric_mean_of_clipped_ngram_precisions():
    # the cat sat on the mat / the cat sat on a mat: 1-grams 5/6 (one "the" clipped), 2-grams 3/5,
    # 3-grams 2/4, 4-grams 1/3; same length, so no brevity penalty.
    by_hand = 100 * math.exp(sum(map(math.log, (5 / 6, 3 / 5, 2 / 4, 1 / 3))) / 4)
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(by_hand, abs=0.01)
    assert bleu(["Paris is the capital."], ["Paris is the capital."]) == pytest.approx(100.0)


def test_a_short_answer_pays_the_brevity_penalty_and_chrf_rewards_close_word_forms():
    full = bleu(["the cat sat on a mat"], ["the cat sat on a mat"])
    short = bleu(["the cat sat on a"], ["the cat sat on a mat"])
    assert short == pytest.approx(full * math.exp(1 - 6 / 5), abs=0.01)  # every n-gram matches; BP = e^(1 - r/c)
    # One word form off: chrF (characters) keeps most of the credit, BLEU's word n-grams lose more.
    assert chrf(["the cats sat on the mat"], ["the cat sat on the mat"]) > bleu(["the cats sat on the mat"], ["the cat sat on the mat"])
    assert chrf(["xyz"], ["the cat sat on the mat"]) == pytest.approx(0.0, abs=1.0)


def test_exact_match_and_token_f1_follow_squad():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert token_f1("the red car", "a red bike") == pytest.approx(0.5)  # articles dropped: red car / red bike
