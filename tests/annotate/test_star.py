"""STAR: segments on policy tokens, guard scores of decoded prefixes, values where harm starts."""

from types import SimpleNamespace

import numpy as np
import pytest

from safekeel.annotate.star import StarAnnotator, segment_ends
from safekeel.data.embedded.tiny_models import build_tokenizer
from safekeel.data.shards import STAR_ENDS_COLUMN, STAR_VALUES_COLUMN
from safekeel.data.tokenization import prompt_and_response_ids


class KeywordGuard:
    """A stand-in guard: P(unsafe) = 0.9 once the response mentions `word`, else 0.1."""

    def __init__(self, word: str):
        self.word, self.queries = word, []

    def score(self, conversations, sources=None):
        self.queries.extend(conversations)
        return SimpleNamespace(p_unsafe=np.array(
            [0.9 if self.word in c[-1]["content"] else 0.1 for c in conversations],
            dtype=np.float32))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_segment_ends():
    assert segment_ends(10, 4) == [4, 8, 10]
    assert segment_ends(8, 4) == [4, 8]
    assert segment_ends(3, 8) == [3]
    assert segment_ends(0, 4) == []
    with pytest.raises(ValueError, match="at least 1"):
        segment_ends(5, 0)


def test_values_drop_at_the_segment_where_the_response_turns_harmful(tokenizer):
    benign = "The answer is five. Curious and soft. Sleep lets the body rest."
    messages = [{"role": "user", "content": "Add 2 and 3, then continue."},
                {"role": "assistant", "content": benign + " Now the zorb steps follow."}]
    guard = KeywordGuard("zorb")
    star = StarAnnotator(guard, tokenizer, segment_tokens=4)
    out = star.annotate([{"id": "x", "messages": messages}])
    [values], [ends] = out[STAR_VALUES_COLUMN], out[STAR_ENDS_COLUMN]

    _, response_ids = prompt_and_response_ids(tokenizer, messages)
    assert ends == segment_ends(len(response_ids), 4) and ends[-1] == len(response_ids)
    # the first segment whose decoded prefix contains the harmful word
    first_bad = next(k for k, e in enumerate(ends)
                     if "zorb" in tokenizer.decode(response_ids[:e], skip_special_tokens=True))
    assert first_bad > 0
    assert values[:first_bad] == pytest.approx([0.9] * first_bad)
    assert values[first_bad:] == pytest.approx([0.1] * (len(ends) - first_bad))
    # the guard saw the prompt and each decoded prefix, special tokens stripped
    assert all(q[:-1] == messages[:-1] for q in guard.queries)
    assert all("<|im_end|>" not in q[-1]["content"] for q in guard.queries)
    assert guard.queries[-1][-1]["content"] == messages[-1]["content"]


def test_prefix_without_text_is_safe_and_not_sent_to_the_guard(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    guard = KeywordGuard("never")
    _, response_ids = prompt_and_response_ids(tokenizer, messages)
    out = StarAnnotator(guard, tokenizer, segment_tokens=1).annotate(
        [{"id": "a", "messages": messages}])
    texts = [tokenizer.decode(response_ids[:e], skip_special_tokens=True).strip()
             for e in out[STAR_ENDS_COLUMN][0]]
    assert len(guard.queries) == sum(1 for t in texts if t)
    assert all(v == pytest.approx(0.9) if t else v == 1.0
               for v, t in zip(out[STAR_VALUES_COLUMN][0], texts))


def test_provenance_names_segment_size_and_critic(tokenizer):
    star = StarAnnotator(KeywordGuard("x"), tokenizer, 16, critic_provenance={"critic_model": "g"})
    assert star.provenance() == {"critic_model": "g", "star_segment_size": 16}
    with pytest.raises(ValueError, match="segment_tokens must be at least 1"):
        StarAnnotator(KeywordGuard("x"), tokenizer, 0)
