"""Training mixes from local files: read, keep evaluation prompts out, split, write JSONL.

Generic pieces a recipe's data preparation is made of:

* `read_instruction_pairs`: (prompt, response) pairs of an instruction/input/output file
  through the corpus reader (so every row problem is named the same way as in annotate);
* `prompts_in_file` / `ExcludedPrompts`: the prompts of evaluation sets (csv, json, jsonl,
  a json mapping of columns) as normalised text, and the check that drops a training row
  whose prompt is one of them;
* `seeded_split`: disjoint parts of a pool in a seeded order;
* `response_prefixes`: cut points of a response (for guards whose prefix scores STAR reads);
* `chat_guard_rows` / `chat_guard_template`: guard training rows as a chat of the policy's
  tokenizer and the critic's `generic` template that renders exactly that chat.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from safekeel.data.corpus import CorpusConfig, load_examples

# Columns evaluation sets keep their prompts in (AdvBench goal, HarmBench Behavior, ...).
PROMPT_COLUMNS = ("goal", "behavior", "instruction", "instructions", "prompt", "question")


def normalise_prompt(text: str) -> str:
    """Lower case, letters and digits only, single spaces: the same request written with
    other punctuation, case or spacing compares equal."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def read_instruction_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) of each row of an instruction/input/output file (input, when
    present, follows the instruction after a blank line, as the corpus reader joins it)."""
    rows = load_examples(CorpusConfig(path=str(path), shape="instruction"))
    return [(row["messages"][-2]["content"].strip(), row["messages"][-1]["content"].strip())
            for row in rows]


def read_labelled_pairs(path: str | Path, label_column: str, unsafe_values: Sequence[str]
                        ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, response) pairs of an instruction file with a label column, split into the
    rows whose label is one of `unsafe_values` and the others; a row without the column is
    refused, naming file and row."""
    rows = load_examples(CorpusConfig(path=str(path), shape="instruction"))
    unsafe: list[tuple[str, str]] = []
    other: list[tuple[str, str]] = []
    for number, row in enumerate(rows):
        if label_column not in row:
            raise ValueError(f"{path}, row {number}: no label column {label_column!r}")
        pair = (row["messages"][-2]["content"].strip(), row["messages"][-1]["content"].strip())
        (unsafe if str(row[label_column]) in unsafe_values else other).append(pair)
    return unsafe, other


def _json_rows(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        if ".jsonl" in path.suffixes:
            return [json.loads(line) for line in handle if line.strip()]
        data = json.load(handle)
    if isinstance(data, dict):  # a mapping of columns: {"instructions": [...], ...}
        columns = {k: v for k, v in data.items() if isinstance(v, list)}
        length = min((len(v) for v in columns.values()), default=0)
        return [{k: v[i] for k, v in columns.items()} for i in range(length)]
    return [row if isinstance(row, dict) else {"prompt": row} for row in data]


def prompts_in_file(path: str | Path) -> list[str]:
    """The prompts of an evaluation file: the first column named like a prompt column
    (case-insensitive; a txt file holds one prompt a line)."""
    path = Path(path)
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = _json_rows(path)
    if not rows:
        return []
    by_lower = {name.lower(): name for name in rows[0]}
    column = next((by_lower[c] for c in PROMPT_COLUMNS if c in by_lower), None)
    if column is None:
        raise ValueError(f"{path}: no prompt column (looked for {', '.join(PROMPT_COLUMNS)}; "
                         f"found {', '.join(rows[0])})")
    return [str(row[column]) for row in rows if row.get(column)]


class ExcludedPrompts:
    """Normalised prompts of the evaluation sets; training rows with one of them are dropped."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.sources = [str(p) for p in paths]
        self.prompts = {normalise_prompt(text) for p in self.sources
                        for text in prompts_in_file(p)}

    def __contains__(self, prompt: str) -> bool:
        return normalise_prompt(prompt) in self.prompts

    def keep(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
        """The pairs whose prompt is no evaluation prompt (first copy of repeated prompts
        only), and how many were dropped as evaluation prompts."""
        kept, seen, dropped = [], set(), 0
        for prompt, response in pairs:
            key = normalise_prompt(prompt)
            if key in self.prompts:
                dropped += 1
            elif key and key not in seen:
                seen.add(key)
                kept.append((prompt, response))
        return kept, dropped


def seeded_split(items: Sequence[Any], sizes: Sequence[int], seed: int) -> list[list[Any]]:
    """Disjoint parts of `items` of the given sizes, in one seeded shuffle order."""
    if sum(sizes) > len(items):
        raise ValueError(f"cannot take {' + '.join(map(str, sizes))} = {sum(sizes)} items "
                         f"from a pool of {len(items)}")
    order = list(items)
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start:start + size])
        start += size
    return parts


def response_prefixes(response: str, fractions: Sequence[float]) -> list[str]:
    """The response cut after the given fractions of its words (distinct, non-empty,
    shorter than the whole)."""
    words = response.split(" ")
    cuts = sorted({max(1, int(len(words) * f)) for f in fractions if 0 < f < 1})
    return [" ".join(words[:cut]) for cut in cuts if cut < len(words)]


def hh_rlhf_final_turns(path: str | Path, transcript: str = "rejected") -> list[tuple[str, str]]:
    """(last human turn, final assistant reply) of an hh-rlhf jsonl(.gz) transcript column."""
    pairs = []
    for row in _json_rows(Path(path)):
        text = row[transcript]
        human, _, reply = text.rpartition("\n\nAssistant:")
        prompt = human.rpartition("\n\nHuman:")[2]
        if prompt.strip() and reply.strip():
            pairs.append((prompt.strip(), reply.strip()))
    return pairs


# --------------------------------------------------------------------------------------
# Guard rows as the policy's chat
# --------------------------------------------------------------------------------------

_PROMPT_MARK, _RESPONSE_MARK = "\x00PROMPT\x00", "\x00RESPONSE\x00"


def guard_messages(prompt: str, response: str, system: str, user_format: str
                   ) -> list[dict[str, str]]:
    """The guard's chat for one (prompt, response) pair, without the verdict."""
    user = user_format.replace("{prompt}", prompt).replace("{response}", response)
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]


def chat_guard_rows(rows: Iterable[dict[str, Any]], system: str, user_format: str
                    ) -> list[dict[str, Any]]:
    """Training rows of the guard: its chat plus the verdict (`label`) as the answer;
    other keys of each row are kept."""
    out = []
    for row in rows:
        messages = guard_messages(row["prompt"], row["response"], system, user_format)
        extra = {k: v for k, v in row.items() if k not in ("prompt", "response")}
        # the pair the chat was made from: what a critic scores when measuring the guard
        extra.update(source_prompt=row["prompt"], source_response=row["response"])
        out.append({**extra, "messages": messages + [
            {"role": "assistant", "content": row["label"]}]})
    return out


def chat_guard_template(tokenizer: Any, system: str, user_format: str) -> str:
    """The critic's `generic` response_template that renders the guard chat exactly as the
    tokenizer's chat template does (system turn, user turn, generation prompt)."""
    text = tokenizer.apply_chat_template(
        guard_messages(_PROMPT_MARK, _RESPONSE_MARK, system, user_format),
        add_generation_prompt=True, tokenize=False)
    text = text.replace("{", "{{").replace("}", "}}")
    return text.replace(_PROMPT_MARK, "{prompt}").replace(_RESPONSE_MARK, "{response}")


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
