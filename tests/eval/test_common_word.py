"""The common-word prompt: the word asked for is the list's plurality, and the prompt fits its length."""
import random
import re
from collections import Counter

import pytest

from kvserve.eval.common_word import QUESTION, answered_word, common_word_prompt


@pytest.mark.parametrize("length, share", [(256, 0.33), (1024, 0.33), (2048, 0.1)])
def test_prompt_fits_and_its_word_is_the_plurality(smollm2_tokenizer, length, share):
    ids, word = common_word_prompt(smollm2_tokenizer, length, share, random.Random(length))
    assert length - 64 < len(ids) <= length - 16
    text = smollm2_tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and QUESTION in text  # the chat template wraps it
    items = re.findall(r"^\d+\. (\w+)$", text, re.M)
    counts = Counter(items).most_common(2)
    assert counts[0][0] == word and counts[0][1] > counts[1][1]
    assert abs(counts[0][1] / len(items) - share) < 0.02


def test_answered_word():
    assert answered_word('The word "Yacht" appears most often') == "yacht"
    assert answered_word("Cherry, which appears 40 times.") == "cherry"
    assert answered_word("The word that appears most often in the list is") is None
