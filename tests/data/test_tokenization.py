"""Response masks: labels on the final assistant turn only, for every row, under both methods."""

import pytest

from safekeel.data.config import from_dict
from safekeel.data.embedded.tiny_models import build_tokenizer
from safekeel.data.tokenization import (
    IGNORE_INDEX,
    TokenizationConfig,
    TokenizationIssue,
    TokenizedExample,
    tokenize_example,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The answer is 5."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Describe a cat in two words."},
     {"role": "assistant", "content": "Curious and soft."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
     {"role": "user", "content": "Why do we need sleep?"},
     {"role": "assistant", "content": "Sleep lets the body rest. ¿Sí? 😴"}],
]


@pytest.fixture(scope="module")
def tokenizers():
    return {"prefix": build_tokenizer(), "generation": build_tokenizer(generation_markers=True)}


def labelled_text(tokenizer, example: TokenizedExample) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("method", ["prefix", "generation"])
def test_every_row_labels_exactly_its_final_response(tokenizers, method):
    tokenizer = tokenizers[method]
    cfg = from_dict(TokenizationConfig, {"mask_method": method})
    for messages in CONVERSATIONS:
        example = tokenize_example(tokenizer, messages, cfg)
        assert isinstance(example, TokenizedExample)
        # the unlabelled part is exactly the prompt as rendered for generation
        prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                                    tokenize=False)
        assert tokenizer.decode(example.input_ids[: example.prompt_length]) == prompt_text
        assert all(t == IGNORE_INDEX for t in example.labels[: example.prompt_length])
        labels = example.labels[example.prompt_length:]
        assert labels == example.input_ids[example.prompt_length:]
        # the response and the end-of-turn token are learnt; earlier assistant turns are not
        expected = messages[-1]["content"] + "<|im_end|>" + ("\n" if method == "prefix" else "")
        assert labelled_text(tokenizer, example) == expected
        assert example.response_tokens == len(labels) and example.truncated_tokens == 0


def test_auto_picks_generation_marks_where_the_template_has_them(tokenizers):
    cfg = TokenizationConfig()
    marked = tokenize_example(tokenizers["generation"], CONVERSATIONS[0], cfg)
    plain = tokenize_example(tokenizers["prefix"], CONVERSATIONS[0], cfg)
    assert labelled_text(tokenizers["generation"], marked).endswith("<|im_end|>")
    assert labelled_text(tokenizers["prefix"], plain).endswith("<|im_end|>\n")


def test_truncation_cuts_the_response_tail_and_counts_it(tokenizers):
    tokenizer = tokenizers["prefix"]
    messages = CONVERSATIONS[1]
    full = tokenize_example(tokenizer, messages, TokenizationConfig())
    cfg = from_dict(TokenizationConfig, {"max_length": full.prompt_length + 3})
    cut = tokenize_example(tokenizer, messages, cfg)
    assert len(cut.input_ids) == full.prompt_length + 3
    assert cut.input_ids == full.input_ids[: full.prompt_length + 3]
    assert cut.response_tokens == 3
    assert cut.truncated_tokens == full.response_tokens - 3


def test_prompt_that_leaves_no_room_is_reported_not_trained(tokenizers):
    tokenizer = tokenizers["prefix"]
    full = tokenize_example(tokenizer, CONVERSATIONS[1], TokenizationConfig())
    cfg = from_dict(TokenizationConfig, {"max_length": full.prompt_length + 1,
                                         "min_response_tokens": 2})
    issue = tokenize_example(tokenizer, CONVERSATIONS[1], cfg)
    assert isinstance(issue, TokenizationIssue) and issue.reason == "prompt_too_long"
    assert f"prompt has {full.prompt_length} tokens" in issue.detail


def test_template_that_renders_prompts_differently_is_reported(tokenizers):
    tokenizer = build_tokenizer()
    # a template that appends a marker only when the conversation ends on a user turn
    tokenizer.chat_template = tokenizer.chat_template + (
        "{%- if messages[-1]['role'] == 'user' %}{{ '[open]' }}{%- endif %}")
    issue = tokenize_example(tokenizer, CONVERSATIONS[0],
                             from_dict(TokenizationConfig, {"mask_method": "prefix"}))
    assert isinstance(issue, TokenizationIssue) and issue.reason == "template_mismatch"


def test_generation_template_without_assistant_mark_gives_no_response(tokenizers):
    tokenizer = build_tokenizer(generation_markers=True)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{% generation %}", "").replace("{% endgeneration %}", "") + "{% generation %}{% endgeneration %}"
    issue = tokenize_example(tokenizer, CONVERSATIONS[0],
                             from_dict(TokenizationConfig, {"mask_method": "generation"}))
    assert isinstance(issue, TokenizationIssue) and issue.reason == "no_response_tokens"


@pytest.mark.parametrize("method", ["prefix", "generation"])
def test_mask_of_every_row_of_a_corpus(tmp_path, tokenizers, method):
    """Every row of a loaded corpus: labels are exactly its final response, never empty."""
    from safekeel.data.corpus import CorpusConfig, load_examples
    from safekeel.data.embedded.world import make_world, write_jsonl

    path = write_jsonl(make_world(0, alignment_size=200).alignment_train, tmp_path / "w.jsonl")
    tokenizer = tokenizers[method]
    cfg = from_dict(TokenizationConfig, {"mask_method": method})
    tail = "<|im_end|>" + ("\n" if method == "prefix" else "")
    examples = load_examples(CorpusConfig(path=str(path)))
    assert len(examples) == 200
    for example in examples:
        tokenized = tokenize_example(tokenizer, example["messages"], cfg)
        assert tokenized.response_tokens > 0, example["id"]
        assert labelled_text(tokenizer, tokenized) == example["messages"][-1]["content"] + tail
