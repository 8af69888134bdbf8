"""Utility of a fine-tuned model: task scorers, over-refusal, reference log-likelihood.

Every scorer has one signature, ``score(prediction: str, reference) -> bool | float``, so a
task config names its scorer (see :func:`get_scorer`) and the evaluation loop stays the
same for classification, arithmetic and free-form tasks. A user's own scorer is named as
``"package.module:function"``.

Over-refusal is measured on benign prompts with the refusal-keyword judge: a defense that
refuses everything keeps ASR at zero and must show up here as bad.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from safekeel.evaluate.metrics import RateEstimate
from safekeel.evaluate.refusal import DEFAULT_REFUSAL_KEYWORDS, is_refusal, validate_keywords

Scorer = Callable[[str, Any], bool | float]

SST2_LABELS: tuple[str, ...] = ("negative", "positive")
AG_NEWS_LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")


class ScorerError(ValueError):
    """A scorer cannot be found, configured, or applied to its reference."""


# --------------------------------------------------------------------------- classification


def stated_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The allowed label that ``prediction`` states, or None when it states none.

    Matching is case-insensitive and on whole words (a label must not touch letters or digits
    on either side, so "positive" is not found in "positively"). When several labels appear,
    the one that occurs *first* wins: models usually lead with their answer and then explain
    ("negative. It is not positive because ..."). Two labels found at the same place (one a
    prefix of the other) resolve to the longer. Negation is not understood: "not positive"
    states "positive".
    """
    best: tuple[int, int, str] | None = None  # (start, -length, label): smallest wins
    for label in labels:
        # Lookarounds rather than \b, so labels that start or end with punctuation
        # ("Sci/Tech", "C++") still get whole-word matching.
        match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", prediction, flags=re.IGNORECASE)
        if match is not None:
            candidate = (match.start(), -len(label), label)
            if best is None or candidate < best:
                best = candidate
    return None if best is None else best[2]


def label_match(prediction: str, label: str | int, labels: Sequence[str] | None = None) -> bool:
    """True when the label ``prediction`` states (see :func:`stated_label`) is ``label``.

    ``labels`` is the task's set of allowed labels (e.g. :data:`SST2_LABELS`); ``label`` may
    then also be an index into it. Without ``labels``, only ``label`` itself is looked for,
    so a response naming every class would count as right: pass ``labels`` for real tasks.
    """
    _require_text(prediction, "prediction")
    allowed = _allowed_labels(labels)
    reference = _reference_label(label, allowed)
    stated = stated_label(prediction, allowed or (reference,))
    return stated is not None and stated.casefold() == reference.casefold()


def _allowed_labels(labels: Sequence[str] | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise ScorerError("labels: expected a list of label strings, got one string")
    allowed = tuple(labels)
    if not allowed:
        raise ScorerError("labels: the list of allowed labels is empty")
    seen: set[str] = set()
    for label in allowed:
        if not isinstance(label, str) or not label.strip():
            raise ScorerError(f"labels: {label!r} is not a non-empty string")
        if label.casefold() in seen:
            raise ScorerError(f"labels: {label!r} appears twice (labels are case-insensitive)")
        seen.add(label.casefold())
    return allowed


def _reference_label(label: str | int, allowed: tuple[str, ...] | None) -> str:
    if isinstance(label, int) and not isinstance(label, bool):
        if allowed is None:
            raise ScorerError(f"reference label {label} is an index, but no labels were given")
        if not 0 <= label < len(allowed):
            raise ScorerError(f"reference label index {label} is outside labels {allowed}")
        return allowed[label]
    if not isinstance(label, str) or not label.strip():
        raise ScorerError(f"reference label {label!r} is not a non-empty string or an index")
    if allowed is not None and label.casefold() not in {name.casefold() for name in allowed}:
        raise ScorerError(f"reference label {label!r} is not one of the labels {allowed}")
    return label


# ------------------------------------------------------------------------------- arithmetic

# A number as people and models write it: an optional minus sign and dollar sign,
# thousands separated by commas or not, an optional decimal part. The lookbehind keeps
# "x2" or "16-3" from yielding "2" or "-3" (a minus right after a digit is subtraction).
_NUMBER = re.compile(r"(?<![\w.)])(-)?\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
_GSM8K_MARKER = "####"


def final_number(text: str) -> Decimal | None:
    """The answer a GSM8K-style solution ends on, or None if it has no number.

    If ``text`` has the ``####`` marker, the first number after the last marker; otherwise
    the last number in the text. Commas, ``$`` signs and trailing zeros are ignored, so
    "$1,000.00" is 1000.
    """
    marker = text.rfind(_GSM8K_MARKER)
    if marker >= 0:
        match = _NUMBER.search(text, marker + len(_GSM8K_MARKER))
    else:
        matches = list(_NUMBER.finditer(text))
        match = matches[-1] if matches else None
    if match is None:
        return None
    sign, digits, fraction = match.groups()
    return Decimal(f"{sign or ''}{digits.replace(',', '')}{fraction or ''}")


def gsm8k_final_number(prediction: str, answer: str | float | Decimal) -> bool:
    """True when the prediction's final number equals the reference answer's.

    ``answer`` is a GSM8K solution ("... #### 72"), a plain number ("72", 72), or any text
    whose last number is the answer. Numbers compare by value: "72.0" equals "72".
    """
    _require_text(prediction, "prediction")
    expected = _reference_number(answer)
    predicted = final_number(prediction)
    return predicted is not None and predicted == expected


def _reference_number(answer: str | float | Decimal) -> Decimal:
    if isinstance(answer, bool):
        raise ScorerError(f"reference answer {answer!r} is a bool, not a number")
    if isinstance(answer, int | float | Decimal):
        try:
            number = Decimal(str(answer))
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite():
            raise ScorerError(f"reference answer {answer!r} is not a finite number")
        return number
    if not isinstance(answer, str):
        raise ScorerError(f"reference answer has type {type(answer).__name__}; expected text")
    number = final_number(answer)
    if number is None:
        raise ScorerError(f"reference answer {answer[-80:]!r} contains no final number")
    return number


# -------------------------------------------------------------------------------- free form


def exact_match(prediction: str, reference: str) -> bool:
    """True when the two texts are equal up to case and runs of whitespace."""
    _require_text(prediction, "prediction")
    _require_text(reference, "reference")
    return _normalise(prediction) == _normalise(reference)


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _require_text(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise ScorerError(f"{what} must be a string, got {type(value).__name__}")


# --------------------------------------------------------------------------------- registry

SCORERS: Mapping[str, Scorer] = {
    "label_match": label_match,
    "sst2": functools.partial(label_match, labels=SST2_LABELS),
    "ag_news": functools.partial(label_match, labels=AG_NEWS_LABELS),
    "gsm8k_final_number": gsm8k_final_number,
    "exact_match": exact_match,
}


def get_scorer(name: str, **options: Any) -> Scorer:
    """The scorer called ``name``, with ``options`` bound as keyword arguments.

    ``name`` is one of :data:`SCORERS` or ``"package.module:function"`` for a user's own
    function with the scorer signature. ``get_scorer("label_match", labels=[...])`` binds
    a task's labels.
    """
    if not isinstance(name, str) or not name:
        raise ScorerError(f"scorer name must be a non-empty string, got {name!r}")
    if name in SCORERS:
        scorer = SCORERS[name]
    elif ":" in name:
        scorer = import_function(name)
    else:
        raise ScorerError(
            f"unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))} "
            "or give your own as 'package.module:function'"
        )
    if not options:
        return scorer
    try:
        inspect.signature(scorer).bind_partial(**options)
    except TypeError as error:
        raise ScorerError(
            f"scorer {name!r} does not take options {sorted(options)}: {error}"
        ) from error
    return functools.partial(scorer, **options)


def import_function(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (the function may be ``Class.method``)."""
    module_name, _, attribute_path = spec.rpartition(":")
    if not module_name or not attribute_path:
        raise ScorerError(f"{spec!r}: expected 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ScorerError(f"{spec!r}: cannot import module {module_name!r} ({error})") from error
    for attribute in attribute_path.split("."):
        try:
            target = getattr(target, attribute)
        except AttributeError:
            raise ScorerError(
                f"{spec!r}: module {module_name!r} has no attribute {attribute_path!r}"
            ) from None
    if not callable(target):
        raise ScorerError(f"{spec!r}: {attribute_path!r} is not callable")
    return target


def score_all(
    scorer: Scorer, predictions: Sequence[str], references: Sequence[Any]
) -> list[bool | float]:
    """Apply ``scorer`` row by row; an error names the row it came from."""
    if len(predictions) != len(references):
        raise ScorerError(f"got {len(predictions)} predictions but {len(references)} references")
    scores = []
    for row, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        try:
            scores.append(scorer(prediction, reference))
        except ScorerError as error:
            raise ScorerError(f"row {row}: {error}") from error
    return scores


def accuracy(
    scorer: Scorer,
    predictions: Sequence[str],
    references: Sequence[Any],
    *,
    confidence: float = 0.95,
) -> RateEstimate:
    """Share of rows a right/wrong scorer calls right, with its Wilson interval."""
    scores = score_all(scorer, predictions, references)
    for row, score in enumerate(scores):
        if not isinstance(score, bool):
            raise ScorerError(
                f"row {row}: accuracy needs a right/wrong scorer, got score {score!r}"
            )
    return RateEstimate.from_counts(sum(scores), len(scores), confidence=confidence)


# ----------------------------------------------------------------------------- over-refusal


def over_refusal_rate(
    responses: Sequence[str],
    keywords: Sequence[str] = DEFAULT_REFUSAL_KEYWORDS,
    *,
    case_sensitive: bool = True,
    confidence: float = 0.95,
) -> RateEstimate:
    """Share of responses to *benign* prompts that the keyword judge calls refusals.

    Empty responses count as refusals (see :mod:`evaluate.refusal`): answering a benign
    request with nothing is as useless as declining it.
    """
    keywords = validate_keywords(keywords)
    refused = 0
    for row, response in enumerate(responses):
        if not isinstance(response, str):
            raise ScorerError(f"response of row {row} is {type(response).__name__}, not a string")
        refused += is_refusal(response, keywords, case_sensitive=case_sensitive)
    return RateEstimate.from_counts(refused, len(responses), confidence=confidence)


# ------------------------------------------------------------------ reference log-likelihood


def mean_reference_loglikelihood(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[Mapping[str, str]]],
    references: Sequence[str],
    batch_size: int = 8,
) -> list[float]:
    """Per example, the mean log-probability per token of the reference given the prompt.

    Each prompt (a user message, or a list of chat messages) is formatted with the
    tokenizer's chat template and the generation prompt; the reference text is tokenised on
    its own (no special tokens) and appended, so its token count does not depend on how it
    would merge with the template. ``model`` is a transformers causal LM. Higher is better;
    average the returned values for a task score.
    """
    if len(prompts) != len(references):
        raise ScorerError(f"got {len(prompts)} prompts but {len(references)} references")
    if batch_size < 1:
        raise ScorerError(f"batch_size must be at least 1, got {batch_size}")
    rows = [
        _prompt_and_reference_ids(tokenizer, prompt, reference, row)
        for row, (prompt, reference) in enumerate(zip(prompts, references, strict=True))
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()  # dropout would make the score random
    try:
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                scores.extend(_batch_mean_logprobs(model, batch, pad_id, device))
    finally:
        model.train(was_training)
    return scores


def _prompt_and_reference_ids(
    tokenizer: Any, prompt: str | Sequence[Mapping[str, str]], reference: str, row: int
) -> tuple[list[int], list[int]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prompt_text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    # The template already writes any BOS or special tokens: do not add them twice.
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    if not isinstance(reference, str):
        raise ScorerError(f"reference of row {row} is {type(reference).__name__}, not a string")
    reference_ids = list(tokenizer(reference, add_special_tokens=False)["input_ids"])
    if not prompt_ids:
        raise ScorerError(f"row {row}: the chat-formatted prompt has no tokens")
    if not reference_ids:
        raise ScorerError(f"row {row}: the reference has no tokens")
    return prompt_ids, reference_ids


def _batch_mean_logprobs(
    model: torch.nn.Module,
    batch: list[tuple[list[int], list[int]]],
    pad_id: int,
    device: torch.device,
) -> list[float]:
    # Left padding lines every row's reference up against the end, so the model only has to
    # produce logits for the last (longest reference + 1) positions, never for the prompts.
    total = max(len(prompt) + len(reference) for prompt, reference in batch)
    longest_reference = max(len(reference) for _, reference in batch)
    input_ids = torch.full((len(batch), total), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), total), dtype=torch.long)
    for i, (prompt, reference) in enumerate(batch):
        ids = prompt + reference
        input_ids[i, total - len(ids) :] = torch.tensor(ids)
        attention_mask[i, total - len(ids) :] = 1
    # Positions count from each row's first real token, as they would without padding.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        logits_to_keep=longest_reference + 1,
    ).logits
    # The logit at position j predicts token j + 1: drop the last one.
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, total - longest_reference :].to(device)
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    scores = []
    for i, (_, reference) in enumerate(batch):
        # Shorter references sit at the right end of the window; the rest is prompt tokens.
        scores.append(token_log_probs[i, longest_reference - len(reference) :].mean().item())
    return scores
