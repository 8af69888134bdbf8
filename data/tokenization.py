"""Chat examples to token ids with a response mask: labels only on the final assistant turn.

Two ways to find the response tokens, chosen per tokenizer:

* `generation`: templates that mark assistant text with `{% generation %}` give the mask
  directly through `apply_chat_template(..., return_assistant_tokens_mask=True)`; the last
  marked span is the response.
* `prefix` (every other template): render the conversation without its last turn plus the
  generation prompt, and the whole conversation; the response is the text the second adds.
  Prompt and response text are tokenised separately and concatenated, which is exactly what
  the model sees at inference (it generates after the prompt's last token), and keeps the
  boundary exact even where a BPE merge could straddle it. Everything the template emits
  after the generation prompt is labelled, including its end-of-turn token, so the model
  learns to stop.

Truncation policy (`max_length`): the prompt is kept whole and the response's tail is cut
to fit. An example whose prompt leaves fewer than `min_response_tokens` response tokens is
not trained on; it is returned as a `TokenizationIssue` with its reason, for the report.
The whole response is never dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from safekeel.data.config import ConfigError, option

IGNORE_INDEX = -100  # label value that cross-entropy skips (the torch / transformers convention)
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class TokenizationConfig:
    max_length: int = option(1024, help="Longest sequence in tokens (prompt + response).")
    min_response_tokens: int = option(1, help="Examples left with fewer response tokens after "
                                      "truncation are reported and not trained on.")
    mask_method: Literal["auto", "prefix", "generation"] = option(
        "auto", help="How response tokens are found: generation uses the template's "
        "{% generation %} marks, prefix renders the prompt alone and takes what the full "
        "conversation adds; auto uses generation where the template has the marks.")

    def validate(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"max_length: must be at least 2, got {self.max_length}")
        if not 1 <= self.min_response_tokens < self.max_length:
            raise ConfigError(
                f"min_response_tokens: must be in [1, max_length), got {self.min_response_tokens}"
            )


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    prompt_length: int  # tokens before the first response token
    response_tokens: int  # labelled tokens kept
    truncated_tokens: int  # response tokens cut by max_length


@dataclass
class TokenizationIssue:
    reason: Literal["prompt_too_long", "no_response_tokens", "template_mismatch"]
    detail: str


def has_generation_marks(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return bool(_GENERATION_TAG.search(template if isinstance(template, str) else str(template)))


def split_prompt_response(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (as rendered for generation) and of the final assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's response")
    prompt_text = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=False
    )
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise TemplateMismatch(
            "the chat template renders the prompt differently when the response follows "
            "(prompt text is not a prefix of the full text); use a template with "
            "{% generation %} marks and mask_method=generation"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids


def _split_by_generation_mask(
    tokenizer: Any, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if not any(mask):
        return ids, []
    end = len(mask) - mask[::-1].index(1)  # one past the last marked token
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    # tokens after the final span (template trailer) are neither prompt nor response
    return ids[:start], ids[start:end]


class TemplateMismatch(ValueError):
    pass


def prompt_and_response_ids(
    tokenizer: Any, messages: list[dict[str, str]], mask_method: str = "auto"
) -> tuple[list[int], list[int]]:
    """Untruncated prompt and response token ids, the way training will see them.

    STAR cuts responses on these response tokens, so its segment ends line up with the
    trainer's labels.
    """
    if mask_method == "auto":
        mask_method = "generation" if has_generation_marks(tokenizer) else "prefix"
    if mask_method == "generation":
        return _split_by_generation_mask(tokenizer, messages)
    return split_prompt_response(tokenizer, messages)


def tokenize_example(
    tokenizer: Any, messages: list[dict[str, str]], cfg: TokenizationConfig
) -> TokenizedExample | TokenizationIssue:
    """Token ids and labels for one conversation, or the reason it cannot be trained on."""
    try:
        prompt_ids, response_ids = prompt_and_response_ids(tokenizer, messages, cfg.mask_method)
    except TemplateMismatch as err:
        return TokenizationIssue("template_mismatch", str(err))
    if not response_ids:
        return TokenizationIssue("no_response_tokens", "the response renders to no tokens")
    room = cfg.max_length - len(prompt_ids)
    if room < cfg.min_response_tokens:
        return TokenizationIssue(
            "prompt_too_long",
            f"prompt has {len(prompt_ids)} tokens, leaving {max(room, 0)} of max_length "
            f"{cfg.max_length} for the response (need {cfg.min_response_tokens})",
        )
    kept = response_ids[:room]
    return TokenizedExample(
        input_ids=prompt_ids + kept,
        labels=[IGNORE_INDEX] * len(prompt_ids) + kept,
        prompt_length=len(prompt_ids),
        response_tokens=len(kept),
        truncated_tokens=len(response_ids) - len(kept),
    )
