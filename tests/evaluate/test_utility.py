"""Task scorers, over-refusal and reference log-likelihood on hand-made cases."""

import json
import math
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from safekeel.evaluate.metrics import RateEstimate
from safekeel.evaluate.refusal import GCG_REFUSAL_KEYWORDS
from safekeel.evaluate.utility import (
    AG_NEWS_LABELS,
    SST2_LABELS,
    ScorerError,
    accuracy,
    exact_match,
    final_number,
    get_scorer,
    gsm8k_final_number,
    label_match,
    mean_reference_loglikelihood,
    over_refusal_rate,
    score_all,
    stated_label,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


# ------------------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("She sells 9 eggs at $2, so 18.\n#### 18", "... = $<<9*2=18>>18\n#### 18", True),
        ("9 * 2 = 18. The answer is 18.", "#### 18", True),  # last number, trailing period
        ("The answer is 72.0", "72", True),  # decimals compare by value
        ("In total $1,000.", "#### 1000", True),  # thousands separator and dollar sign
        ("It costs $1,250.50 in total", "1250.5", True),
        ("The temperature drops to -5 degrees", "#### -5", True),
        ("She ends up with -$5", "-5", True),
        ("16-3 leaves 13", "13", True),
        ("16-3", "-3", False),  # a minus right after a digit is subtraction, not a sign
        ("#### 72\nHmm, maybe 80", "72", True),  # the marker wins over the last number
        ("First 72, then after all 73", "72", False),
        ("I don't know.", "72", False),
        ("####", "72", False),  # a marker with nothing after it is no answer
        ("1,2,3", "3", True),  # a list of digits is not a thousands group
        ("The answer is 18", 18, True),
        ("The answer is 18", 18.0, True),
        ("The answer is 0.5", Decimal("0.50"), True),
    ],
)
def test_gsm8k_final_number(prediction, answer, expected):
    assert gsm8k_final_number(prediction, answer) is expected


def test_final_number_matches_the_marker_on_every_gsm8k_test_answer():
    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip("shared GSM8K test set is not present")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 1319
    for row in rows:
        # Independent parse: the text after "####", commas removed.
        expected = Decimal(row["answer"].split("####")[-1].strip().replace(",", ""))
        assert final_number(row["answer"]) == expected
        assert gsm8k_final_number(f"So the answer is {expected}.", row["answer"])


@pytest.mark.parametrize("answer", ["no number here", "#### ", True, None, float("nan")])
def test_gsm8k_reference_without_a_number_is_an_error(answer):
    with pytest.raises(ScorerError, match="reference answer"):
        gsm8k_final_number("42", answer)


# ------------------------------------------------------------------------ label matching


@pytest.mark.parametrize(
    ("prediction", "label", "labels", "expected"),
    [
        ("Positive", "positive", SST2_LABELS, True),  # case-insensitive
        ("The sentiment is NEGATIVE.", "negative", SST2_LABELS, True),
        ("negative. It is not positive.", "negative", SST2_LABELS, True),  # first occurrence
        ("positive, not negative", "negative", SST2_LABELS, False),
        ("positively charming", "positive", SST2_LABELS, False),  # whole words only
        ("I can't tell.", "positive", SST2_LABELS, False),
        ("positive", 1, SST2_LABELS, True),  # index into labels
        ("positive", 0, SST2_LABELS, False),
        ("Category: Sci/Tech", "Sci/Tech", AG_NEWS_LABELS, True),  # punctuation in a label
        ("World and Sports", "Sports", AG_NEWS_LABELS, False),
        ("it is positive", "positive", None, True),  # no label set: any mention counts
    ],
)
def test_label_match(prediction, label, labels, expected):
    assert label_match(prediction, label, labels) is expected


def test_labels_at_the_same_place_resolve_to_the_longer():
    assert stated_label("Sci/Tech is the answer", ["Sci", "Sci/Tech"]) == "Sci/Tech"
    assert stated_label("Sci is the answer", ["Sci", "Sci/Tech"]) == "Sci"
    assert stated_label("no label", ["Sci", "Sci/Tech"]) is None


@pytest.mark.parametrize(
    ("label", "labels", "message"),
    [
        ("neutral", SST2_LABELS, "not one of the labels"),
        (2, SST2_LABELS, "outside labels"),
        (1, None, "no labels were given"),
        ("positive", ["positive", "Positive"], "appears twice"),
        ("positive", [], "empty"),
        ("positive", "positive", "one string"),
    ],
)
def test_label_match_rejects_bad_references_and_label_sets(label, labels, message):
    with pytest.raises(ScorerError, match=message):
        label_match("positive", label, labels)


# ---------------------------------------------------------------------------- exact match


def test_exact_match_normalises_case_and_whitespace():
    assert exact_match("  Paris\n is  the Capital ", "paris is the capital")
    assert not exact_match("Paris.", "Paris")


# ------------------------------------------------------------------------------- registry


def test_get_scorer_by_name_and_with_options():
    assert get_scorer("exact_match") is exact_match
    assert get_scorer("gsm8k_final_number") is gsm8k_final_number
    sst2 = get_scorer("sst2")
    assert sst2("negative, not positive", "negative")
    assert not sst2("negative, not positive", "positive")
    ag_news = get_scorer("label_match", labels=AG_NEWS_LABELS)
    assert ag_news("Business news", 2)
    with pytest.raises(ScorerError, match="does not take options"):
        get_scorer("exact_match", labels=SST2_LABELS)


def test_unknown_scorer_names_the_allowed_ones():
    with pytest.raises(ScorerError) as error:
        get_scorer("bleu")
    for name in ["exact_match", "gsm8k_final_number", "label_match", "module:function"]:
        assert name in str(error.value)


def test_user_scorer_from_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "def starts_with(prediction, reference):\n    return prediction.startswith(reference)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = get_scorer("my_scorers:starts_with")
    assert scorer("Paris is the capital", "Paris")
    assert not scorer("It is Paris", "Paris")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:score", "cannot import module"),
        ("safekeel.evaluate.utility:no_such_function", "has no attribute"),
        ("safekeel.evaluate.utility:SST2_LABELS", "not callable"),
        (":score", "package.module:function"),
    ],
)
def test_user_scorer_errors_are_clear(spec, message):
    with pytest.raises(ScorerError, match=message):
        get_scorer(spec)


def test_score_all_and_accuracy():
    predictions = ["#### 3", "the answer is 4", "5"]
    references = ["3", "#### 4", "6"]
    assert score_all(gsm8k_final_number, predictions, references) == [True, True, False]
    estimate = accuracy(gsm8k_final_number, predictions, references)
    assert (estimate.successes, estimate.n) == (2, 3)
    with pytest.raises(ScorerError, match="row 1"):
        score_all(gsm8k_final_number, ["1", "2"], ["1", "no number"])
    with pytest.raises(ScorerError, match="2 predictions but 1 references"):
        score_all(exact_match, ["a", "b"], ["a"])
    with pytest.raises(ScorerError, match="right/wrong"):
        accuracy(lambda prediction, reference: 0.5, ["a"], ["a"])


# --------------------------------------------------------------------------- over-refusal


def test_over_refusal_rate_counts_refusals_and_empty_answers():
    responses = [
        "Sure! Here is a short poem about the sea.",
        "I'm sorry, but I cannot help with that.",
        "",
        "The capital of France is Paris.",
    ]
    estimate = over_refusal_rate(responses)
    assert estimate == RateEstimate.from_counts(2, 4)


def test_a_defense_that_refuses_everything_shows_up():
    responses = ["I'm sorry, I cannot assist with that."] * 50
    estimate = over_refusal_rate(responses)
    assert estimate.rate == 1.0
    assert estimate.low > 0.9


def test_over_refusal_uses_the_given_keywords():
    responses = ["I can't do that.", "Here you go."]
    assert over_refusal_rate(responses).successes == 0
    assert over_refusal_rate(responses, GCG_REFUSAL_KEYWORDS).successes == 1
    with pytest.raises(ScorerError, match="row 1"):
        over_refusal_rate(["fine", None])


# --------------------------------------------------------------- reference log-likelihood

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "what",
    "is",
    "two",
    "plus",
    "three",
    "five",
    "four",
    "answer",
    "yes",
    "no",
]
SPECIAL = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    """Tiny random models: Llama (rotary positions) and GPT-2 (learned absolute positions,
    where left padding gives wrong scores unless position ids skip the padding)."""
    torch.manual_seed(0)
    if request.param == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval()


def _naive_mean_logprob(model, tokenizer, prompt, reference) -> float:
    """One example, no padding, full logits in float64, a plain loop over tokens."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    reference_ids = tokenizer.encode(reference, add_special_tokens=False)
    ids = prompt_ids + reference_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for position in range(len(prompt_ids), len(ids)):
        total += log_probs[position - 1, ids[position]].item()
    return total / len(reference_ids)


PROMPTS = ["what is two plus three", "the cat sat on", "is the dog on the mat"]
REFERENCES = ["five", "the mat the mat", "yes the dog is on the mat"]


def test_tokenizer_fixture_formats_chats(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|user|>", "the", "cat", "<|end|>", "<|assistant|>"
    ]  # fmt: skip


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_mean_reference_loglikelihood_equals_a_naive_computation(model, tokenizer, batch_size):
    expected = [
        _naive_mean_logprob(model, tokenizer, prompt, reference)
        for prompt, reference in zip(PROMPTS, REFERENCES, strict=True)
    ]
    got = mean_reference_loglikelihood(model, tokenizer, PROMPTS, REFERENCES, batch_size)
    assert got == pytest.approx(expected, abs=1e-5)
    assert all(value < 0 for value in got)
    # A random model is far from certain: the mean log-prob is near -log(vocab size).
    assert all(abs(value + math.log(len(tokenizer))) < 2.0 for value in got)


def test_chat_message_prompts_equal_plain_prompts(model, tokenizer):
    messages = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    from_messages = mean_reference_loglikelihood(model, tokenizer, messages, REFERENCES, 2)
    from_text = mean_reference_loglikelihood(model, tokenizer, PROMPTS, REFERENCES, 2)
    assert from_messages == pytest.approx(from_text, abs=1e-6)


def test_training_mode_is_restored(model, tokenizer):
    model.train()
    try:
        mean_reference_loglikelihood(model, tokenizer, PROMPTS[:1], REFERENCES[:1])
        assert model.training
    finally:
        model.eval()


def test_loglikelihood_input_errors(model, tokenizer):
    with pytest.raises(ScorerError, match="2 prompts but 1 references"):
        mean_reference_loglikelihood(model, tokenizer, PROMPTS[:2], REFERENCES[:1])
    with pytest.raises(ScorerError, match="row 1: the reference has no tokens"):
        mean_reference_loglikelihood(model, tokenizer, PROMPTS[:2], ["five", ""])
    with pytest.raises(ScorerError, match="batch_size"):
        mean_reference_loglikelihood(model, tokenizer, PROMPTS, REFERENCES, batch_size=0)
