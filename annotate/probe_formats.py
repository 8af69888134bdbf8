"""Prompt formats for fitting the probe: the same prompt as plain chat and inside wrappers.

A probe fitted only on plain chat prompts can miss a corpus that wraps every instruction in
a template inside the user turn (Alpaca's "Below is an instruction ... ### Instruction:\\n
{instruction}\\n\\n### Response:"): measured on SmolLM2-135M, such a probe gave every harmful
row of an Alpaca-wrapped attack mix P(harmful) below 0.01. Fitting on each prompt once per
format (format augmentation) teaches it the wrapper as irrelevant.

A format is a template with one `{prompt}`, applied to the content of the prompt's last
user turn. Wrappers come from explicit templates, or are derived from the corpus that will
be annotated: the longest prefix and suffix every sampled user turn shares, read the way
annotate's corpus reader renders them. Only that wrapper text is used; the corpus's rows
never become training data of the probe.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from safekeel.annotate.activations import prompt_messages

PROMPT_SLOT = "{prompt}"
PLAIN = "plain"


class FormatError(ValueError):
    """A bad template or a corpus a wrapper cannot be derived from."""


@dataclass(frozen=True)
class PromptFormat:
    """One rendering of a prompt: `template` with `{prompt}` standing for the user's text.

    name: how reports call it; source: where it came from ("plain", "option", or
    "corpus:<path>").
    """

    name: str
    template: str
    source: str

    def __post_init__(self) -> None:
        if self.template.count(PROMPT_SLOT) != 1:
            raise FormatError(f"format {self.name!r}: the template must hold {PROMPT_SLOT} "
                              f"exactly once, got {self.template!r}")

    def render(self, messages: Sequence[Mapping[str, str]],
               source: str = "prompt") -> list[dict[str, str]]:
        """The prompt's turns with its last user turn wrapped (replace, not str.format: a
        template may hold other braces)."""
        turns = prompt_messages(messages, source=source)
        turns[-1] = {"role": "user", "content": self.template.replace(PROMPT_SLOT,
                                                                      turns[-1]["content"])}
        return turns

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


PLAIN_FORMAT = PromptFormat(PLAIN, PROMPT_SLOT, PLAIN)


def shared_wrapper(texts: Sequence[str]) -> tuple[str, str]:
    """The longest prefix and suffix every text shares, as (prefix, suffix).

    Each is cut back to a non-alphanumeric character at its inner end, and kept only if it
    holds some structure (punctuation, a line break): words the prompts happen to share
    ("Write a ...") are the prompts' own, not a wrapper. The suffix is taken from what
    follows the prefix, so the two never overlap.
    """
    if len(texts) < 2:
        raise FormatError(f"a shared wrapper needs at least 2 prompts, got {len(texts)}")
    prefix = os.path.commonprefix(list(texts))
    while prefix and prefix[-1].isalnum():
        prefix = prefix[:-1]
    rests = [text[len(prefix):] for text in texts]
    suffix = os.path.commonprefix([rest[::-1] for rest in rests])[::-1]
    while suffix and suffix[0].isalnum():
        suffix = suffix[1:]
    return _structured(prefix), _structured(suffix)


def _structured(part: str) -> str:
    return part if any(not (c.isalnum() or c == " ") for c in part) else ""


def corpus_format(corpus: Any, sample_rows: int = 1000) -> PromptFormat | None:
    """The wrapper shared by the user turns of the first `sample_rows` rows of `corpus` (a
    `CorpusConfig`), read as annotate reads it; None when they share none (plain prompts)."""
    from safekeel.data.corpus import iter_examples

    # responses are not needed to see the prompt; bad rows are annotate's to report
    cfg = replace(corpus, require_response=False, on_bad_row="skip")
    texts = [prompt_messages(example["messages"], source=f"{corpus.path}, row {i}")[-1]["content"]
             for i, example in enumerate(itertools.islice(iter_examples(cfg), sample_rows))]
    if len(texts) < 2:
        raise FormatError(f"{corpus.path}: format_corpus needs at least 2 readable rows to "
                          f"derive its prompt wrapper, got {len(texts)}")
    prefix, suffix = shared_wrapper(texts)
    if not prefix and not suffix:
        return None
    return PromptFormat(f"corpus:{os.path.basename(corpus.path)}",
                        f"{prefix}{PROMPT_SLOT}{suffix}", f"corpus:{corpus.path}")


def prompt_formats(templates: Sequence[str], corpus: Any | None = None,
                   sample_rows: int = 1000) -> list[PromptFormat]:
    """Plain chat first, then each explicit template, then the corpus's wrapper (if any);
    a wrapper already in the list is not added twice."""
    formats = [PLAIN_FORMAT]
    for i, template in enumerate(templates):
        formats.append(PromptFormat(f"template{i}", template, "option"))
    if corpus is not None:
        derived = corpus_format(corpus, sample_rows)
        if derived is not None:
            formats.append(derived)
    unique: dict[str, PromptFormat] = {}
    for fmt in formats:
        unique.setdefault(fmt.template, fmt)
    return list(unique.values())
