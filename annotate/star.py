"""STAR: the guard's safety trajectory over a response (Peng et al. 2025, "Shape it Up!").

Each response is cut into segments of `segment_tokens` tokens of the *policy* tokenizer
(the trainer needs per-token weights in its own token space). Segment k ends at response
token e_k = min(k*M, n); the guard scores the prompt plus the decoded prefix
response[:e_k], and V_k = 1 - P(unsafe) = P(safe) of that prefix. Every token of segment k
later gets V_k as its weight (train.weights.expand_star_to_tokens).

Cost: the k prefixes of one response share their beginning, so with vLLM's prefix caching
(enable_prefix_caching=True, small KV blocks: block_size=32 on CPU) each prefix prefills only
the tokens past the cached blocks; `benchmarks/bench_star.py` measures it.

Only the response tokens training keeps are cut into segments (tokenization.max_length less
the prompt; at least one segment): the trainer gives tokens past the last end the last
value, and a huge response would otherwise cost a guard query per segment and prefixes
quadratic in its length.

A prefix whose decoded text is still empty (a segment of template tokens only) has said
nothing yet and is scored safe (V = 1) without asking the guard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from safekeel.data.risk_columns import STAR_ENDS_COLUMN, STAR_VALUES_COLUMN
from safekeel.data.tokenization import prompt_and_response_ids


def segment_ends(n_tokens: int, segment_tokens: int) -> list[int]:
    """Ends (exclusive) of consecutive segments of `segment_tokens` covering n tokens."""
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be at least 1, got {segment_tokens}")
    if n_tokens < 1:
        return []
    return [min(k * segment_tokens, n_tokens)
            for k in range(1, math.ceil(n_tokens / segment_tokens) + 1)]


class StarAnnotator:
    """Adds `star_v_safe` and `star_token_ends` to each example, scoring prefixes with `critic`.

    `critic` is any object with `score(conversations, sources=...) -> result.p_unsafe` (the
    Safety Critic); the annotator does not own it and does not close it.
    """

    columns = (STAR_VALUES_COLUMN, STAR_ENDS_COLUMN)

    def __init__(self, critic: Any, tokenizer: Any, segment_tokens: int,
                 mask_method: str = "auto", critic_provenance: dict[str, Any] | None = None,
                 max_length: int | None = None):
        if segment_tokens < 1:
            raise ValueError(f"star.segment_tokens must be at least 1, got {segment_tokens}")
        self.critic = critic
        self.tokenizer = tokenizer
        self.segment_tokens = segment_tokens
        self.mask_method = mask_method
        self.critic_provenance = critic_provenance or {}
        # Only the response tokens training keeps (max_length less the prompt) are scored:
        # the trainer gives tokens past the last end the last value, and a 1 MB response
        # would otherwise cost one guard query per segment and prefixes quadratic in its
        # length.
        self.max_length = max_length

    def provenance(self) -> dict[str, Any]:
        return {**self.critic_provenance, "star_segment_size": self.segment_tokens}

    def prefixes(self, example: dict[str, Any]) -> tuple[list[int], list[str]]:
        """Segment ends (policy response tokens) and the decoded response prefix at each."""
        messages = example["messages"]
        prompt_ids, response_ids = prompt_and_response_ids(self.tokenizer, messages,
                                                           self.mask_method)
        scored = len(response_ids)
        if self.max_length is not None:  # at least one segment, even for a prompt too long
            scored = min(scored, max(self.max_length - len(prompt_ids), self.segment_tokens))
        ends = segment_ends(scored, self.segment_tokens)
        texts = [self.tokenizer.decode(response_ids[:end], skip_special_tokens=True).strip()
                 for end in ends]
        return ends, texts

    def annotate(self, examples: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        all_ends: list[list[int]] = []
        values: list[list[float]] = []
        queries: list[list[dict[str, str]]] = []
        sources: list[str] = []
        slots: list[tuple[int, int]] = []  # (example, segment) of each guard query
        for i, example in enumerate(examples):
            ends, texts = self.prefixes(example)
            if not ends:
                raise ValueError(
                    f"example {example.get('id', i)!r}: the response has no policy tokens, "
                    "so STAR has nothing to score"
                )
            all_ends.append(ends)
            values.append([1.0] * len(ends))
            prompt_turns = example["messages"][:-1]
            for k, text in enumerate(texts):
                if text:
                    queries.append([*prompt_turns, {"role": "assistant", "content": text}])
                    sources.append(f"{example.get('id', i)} segment {k}")
                    slots.append((i, k))
        if queries:
            p_unsafe = self.critic.score(queries, sources=sources).p_unsafe
            for (i, k), p in zip(slots, p_unsafe, strict=True):
                values[i][k] = 1.0 - float(p)
        return {STAR_VALUES_COLUMN: values, STAR_ENDS_COLUMN: all_ends}

    def close(self) -> None:
        pass
