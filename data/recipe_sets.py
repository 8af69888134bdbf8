"""The training sets a real-model recipe prepares before it builds its models.

From local files (paths in the config) it writes JSONL chat sets into `{output_dir}/data/`:

* `safe_reference_train`: harmful instructions answered by refusals mixed with benign
  instructions answered helpfully (N of each), for the safe reference;
* `guard_train` / `guard_heldout`: rows of a short guard chat (`guard.system`,
  `guard.user_format`) answered `unsafe` or `safe`. Unsafe: a harmful instruction with a
  compliant answer (the base policy's own greedy answers, which contain no refusal keyword;
  optionally hh-rlhf `rejected` final replies). Safe: a harmful instruction with its refusal,
  a benign instruction with its answer (and, with `guard.benign_policy_answers`, with the
  base policy's answer too, so both labels come in the policy's voice). Each response also
  appears cut at a few points (`prefix_fractions`, same label), so the guard's scores of
  partial responses (STAR) mean something. The held-out split holds instructions the
  training split never shows;
* `labelled` files (e.g. the harmful fine-tuning mixes of other tasks, with a `flag`
  column) add guard rows (their unsafe rows unsafe, the rest safe) and benign reference rows
  in their own format, such as short classification answers inside an Alpaca template;
* `heldout_harmful` / `heldout_benign`: training-side instructions for measuring the safe
  reference (refusal, over-refusal), apart from the evaluation sets.

Harmful instructions of the reference, the guard and the held-out measurement are disjoint
parts of one seeded shuffle (so are the benign ones); no instruction that appears in an
evaluation set (`exclude`, normalised text) is used at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safekeel.data.config import ConfigError, option
from safekeel.data.files import file_sha256
from safekeel.data.mixes import (
    ExcludedPrompts,
    chat_guard_rows,
    hh_rlhf_final_turns,
    read_instruction_pairs,
    read_labelled_pairs,
    response_prefixes,
    seeded_split,
    write_jsonl,
)

UNSAFE, SAFE = "unsafe", "safe"
SET_NAMES = ("safe_reference_train", "guard_train", "guard_heldout", "heldout_harmful",
             "heldout_benign")


@dataclass
class GuardFormat:
    system: str = option("Judge the assistant's reply. Answer unsafe if it helps with harm, "
                         "else safe.", help="The guard chat's system turn.")
    user_format: str = option("User: {prompt}\nAssistant: {response}",
                              help="The guard chat's user turn; {prompt} and {response}.")


@dataclass
class GuardSetSizes:
    harmful: int = option(200, help="Harmful instructions of the guard (each gives a refusal "
                          "row, safe, and where the base policy complies a compliant row, "
                          "unsafe).")
    benign: int = option(200, help="Benign instructions with their answers (safe).")
    benign_policy_answers: bool = option(
        False, help="Also answer the benign instructions with the base policy (safe rows in "
        "the same voice as the compliant, unsafe ones), so the verdict has to come from what "
        "is asked and answered, not from whose style the answer is in.")
    hh_rejected: int = option(0, help="hh-rlhf harmless-base `rejected` final replies "
                              "(unsafe). Noisy: `rejected` is only the less harmless of two.")
    heldout_share: float = option(0.2, help="Share of the guard's instructions held out.")
    prefix_fractions: list[float] = option([0.3, 0.6], help="Each response also cut after "
                                           "these shares of its words (same label).")
    prompt_formats: list[str] = option([], help="Format augmentation: each row is also "
                                       "written with its prompt inside each of these templates "
                                       "(`{prompt}` marks it), e.g. the Alpaca template of the "
                                       "corpus the guard will score, so a wrapper it never saw "
                                       "does not decide its verdict.")
    max_response_words: int = option(80, help="Responses are cut to this many words (the "
                                     "training rows stay short; the verdict reads the start).")


@dataclass
class LabelledSet:
    """Rows of another labelled instruction file, kept in their own format: e.g. a harmful
    fine-tuning mix of *another* task (its unsafe rows are harmful prompts with compliant
    answers, the others short task answers). Never the corpus the guard will score."""

    path: str = option("", help="Instruction/input/output file with a label column.")
    label_column: str = option("flag", help="The column that marks unsafe rows.")
    unsafe_values: list[str] = option(["unsafe"], help="Values of label_column for unsafe rows.")
    guard_unsafe: int = option(0, help="Unsafe rows for the guard (labelled unsafe).")
    guard_safe: int = option(0, help="Other rows for the guard (labelled safe).")
    reference_benign: int = option(0, help="Other rows added to the safe reference's benign "
                                   "rows, so it answers tasks in this format directly.")


@dataclass
class CompliantAnswers:
    model: str = option("", help="The model whose greedy answers to harmful instructions are "
                        "the guard's unsafe rows (the base policy), and to benign ones safe "
                        "rows with guard.benign_policy_answers; empty: none.")
    max_new_tokens: int = option(80, help="Tokens per answer.")
    batch_size: int = option(16, help="Prompts per generate call (transformers).")
    dtype: str = option("float32", help="Generation dtype (transformers).")


@dataclass
class PrepareConfig:
    seed: int = option(0, help="Seed of every split and sample.")
    harmful: str = option("", help="Harmful instructions answered with refusals "
                          "(instruction/input/output file).")
    benign: str = option("", help="Benign instructions with answers (instruction/input/output).")
    hh_rlhf: str = option("", help="hh-rlhf harmless-base jsonl(.gz), for guard.hh_rejected.")
    exclude: list[str] = option([], help="Evaluation prompt files (csv/json/jsonl/txt) whose "
                                "prompts never appear in training (normalised text).")
    reference_harmful: int = option(300, help="Harmful rows (refusals) of safe_reference_train.")
    reference_benign: int = option(300, help="Benign rows of safe_reference_train.")
    heldout_harmful: int = option(100, help="Harmful instructions kept for measuring the "
                                  "safe reference's refusal.")
    heldout_benign: int = option(100, help="Benign instructions kept for its over-refusal.")
    guard: GuardSetSizes = option(GuardSetSizes, help="The guard's sets.")
    labelled: list[LabelledSet] = option([], help="Other labelled instruction files, their "
                                         "rows used in their own format (guard.prompt_formats "
                                         "does not apply to them); split like the rest.")
    guard_format: GuardFormat = option(GuardFormat, help="The guard's chat.")
    compliant: CompliantAnswers = option(CompliantAnswers, help="Compliant answers (unsafe).")
    output_dir: str = option("{output_dir}/data", help="Where the sets are written.")

    def validate(self) -> None:
        if self.guard.benign_policy_answers and not self.compliant.model:
            raise ConfigError("guard.benign_policy_answers: set compliant.model (the policy "
                              "that answers)")
        if self.guard.hh_rejected and not self.hh_rlhf:
            raise ConfigError("guard.hh_rejected: set hh_rlhf (the file to take them from)")


@dataclass
class PreparedSets:
    paths: dict[str, Path]
    counts: dict[str, Any] = field(default_factory=dict)


def file_digest(path: str | Path) -> str:
    """A short content digest for step keys (data/files.file_sha256, streamed)."""
    return file_sha256(path)[:16]


def input_fingerprint(cfg: PrepareConfig) -> dict[str, str]:
    """Digests of every input file, for the step key."""
    files = [cfg.harmful, cfg.benign, cfg.hh_rlhf, *cfg.exclude, *(s.path for s in cfg.labelled)]
    return {p: file_digest(p) for p in files if p}


Answerer = Callable[[list[str]], list[str]]


def prepare_sets(cfg: PrepareConfig, answer: Answerer | None = None) -> PreparedSets:
    """Write the sets of the module docstring; `answer` gives the base policy's replies to
    instructions (the harmful ones; the benign ones too with guard.benign_policy_answers),
    "" where it refused (None: no policy-answered rows)."""
    out = Path(cfg.output_dir)
    excluded = ExcludedPrompts(cfg.exclude)
    harmful, dropped_harmful = excluded.keep(read_instruction_pairs(cfg.harmful))
    benign, dropped_benign = excluded.keep(read_instruction_pairs(cfg.benign))
    g = cfg.guard
    heldout_h, reference_h, guard_h = seeded_split(
        harmful, [cfg.heldout_harmful, cfg.reference_harmful, g.harmful], cfg.seed)
    heldout_b, reference_b, guard_b = seeded_split(
        benign, [cfg.heldout_benign, cfg.reference_benign, g.benign], cfg.seed + 1)

    labelled_unsafe: list[tuple[str, str]] = []
    labelled_safe: list[tuple[str, str]] = []
    labelled_reference: list[tuple[str, str]] = []
    dropped_labelled = 0
    for number, extra in enumerate(cfg.labelled):
        unsafe, other = read_labelled_pairs(extra.path, extra.label_column, extra.unsafe_values)
        unsafe, dropped_u = excluded.keep(unsafe)
        other, dropped_o = excluded.keep(other)
        dropped_labelled += dropped_u + dropped_o
        labelled_unsafe += seeded_split(unsafe, [extra.guard_unsafe], cfg.seed + 10 + number)[0]
        safe, benign_rows = seeded_split(other, [extra.guard_safe, extra.reference_benign],
                                         cfg.seed + 20 + number)
        labelled_safe += safe
        labelled_reference += benign_rows

    reference = [_chat(p, r, kind="harmful_refusal") for p, r in reference_h]
    reference += [_chat(p, r, kind="benign") for p, r in reference_b]
    reference += [_chat(p, r, kind="benign_labelled") for p, r in labelled_reference]
    reference = seeded_split(reference, [len(reference)], cfg.seed)[0]

    # guard instructions split by instruction: held-out rows show unseen instructions
    def split_guard(pairs: Sequence[tuple[str, str]], seed: int) -> tuple[list, list]:
        held = round(len(pairs) * g.heldout_share)
        heldout, train = seeded_split(pairs, [held, len(pairs) - held], seed)
        return train, heldout

    train_h, held_h = split_guard(guard_h, cfg.seed + 2)
    train_b, held_b = split_guard(guard_b, cfg.seed + 3)
    train_lu, held_lu = split_guard(labelled_unsafe, cfg.seed + 6)
    train_ls, held_ls = split_guard(labelled_safe, cfg.seed + 7)
    def policy_answers(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
        """The base policy's answer to each instruction it did not refuse."""
        if answer is None or not pairs:
            return {}
        prompts = [p for p, _ in pairs]
        return {p: a for p, a in zip(prompts, answer(prompts), strict=True) if a.strip()}

    compliant = policy_answers(guard_h)
    benign_answers = policy_answers(guard_b) if g.benign_policy_answers else {}
    hh: list[tuple[str, str]] = []
    if g.hh_rejected and cfg.hh_rlhf:
        hh_pairs, _ = excluded.keep(hh_rlhf_final_turns(cfg.hh_rlhf, "rejected"))
        hh = seeded_split(hh_pairs, [min(g.hh_rejected, len(hh_pairs))], cfg.seed + 4)[0]
    held_hh = round(len(hh) * g.heldout_share)

    def guard_rows(harmful_pairs, benign_pairs, hh_pairs, unsafe_pairs, safe_pairs
                   ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for p, r in harmful_pairs:
            rows += _guard_examples(p, r, SAFE, "harmful_refusal", g)
            if p in compliant:
                rows += _guard_examples(p, compliant[p], UNSAFE, "harmful_compliant", g)
        for p, r in benign_pairs:
            rows += _guard_examples(p, r, SAFE, "benign", g)
            if p in benign_answers:
                rows += _guard_examples(p, benign_answers[p], SAFE, "benign_policy", g)
        for p, r in hh_pairs:
            rows += _guard_examples(p, r, UNSAFE, "hh_rejected", g)
        # labelled sets' rows are already in their corpus's format
        for p, r in unsafe_pairs:
            rows += _guard_examples(p, r, UNSAFE, "labelled_unsafe", g, formats=False)
        for p, r in safe_pairs:
            rows += _guard_examples(p, r, SAFE, "labelled_safe", g, formats=False)
        return chat_guard_rows(rows, cfg.guard_format.system, cfg.guard_format.user_format)

    guard_train = guard_rows(train_h, train_b, hh[held_hh:], train_lu, train_ls)
    guard_train = seeded_split(guard_train, [len(guard_train)], cfg.seed + 5)[0]
    # held out: whole responses and their prefixes, so AUROC covers what STAR asks too
    guard_heldout = guard_rows(held_h, held_b, hh[:held_hh], held_lu, held_ls)

    sets = {
        "safe_reference_train": reference,
        "guard_train": guard_train,
        "guard_heldout": guard_heldout,
        "heldout_harmful": [{"messages": [{"role": "user", "content": p}]} for p, _ in heldout_h],
        "heldout_benign": [{"messages": [{"role": "user", "content": p}]} for p, _ in heldout_b],
    }
    paths = {name: write_jsonl(rows, out / f"{name}.jsonl") for name, rows in sets.items()}
    counts = {name: len(rows) for name, rows in sets.items()}
    counts.update(dropped_as_evaluation_prompts={"harmful": dropped_harmful,
                                                 "benign": dropped_benign,
                                                 "labelled": dropped_labelled},
                  compliant_answers=len(compliant), benign_policy_answers=len(benign_answers),
                  guard_harmful_instructions=len(guard_h),
                  guard_labels={name: _label_counts(sets[name])
                                for name in ("guard_train", "guard_heldout")})
    (out / "prepare_counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    return PreparedSets(paths, counts)


def _chat(prompt: str, response: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": response}], **extra}


def _guard_examples(prompt: str, response: str, label: str, kind: str, g: GuardSetSizes,
                    formats: bool = True) -> list[dict[str, Any]]:
    """The row, its response prefixes, and (with `formats`) each in g.prompt_formats."""
    words = response.split(" ")
    response = " ".join(words[:g.max_response_words])
    responses = [(response, False)]
    responses += [(part, True) for part in response_prefixes(response, g.prefix_fractions)]
    templates = g.prompt_formats if formats else []
    prompts = [prompt] + [template.replace("{prompt}", prompt) for template in templates]
    return [{"prompt": p, "response": r, "label": label, "kind": kind, "is_prefix": is_prefix,
             "instruction": prompt} for p in prompts for r, is_prefix in responses]


def _label_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        label = row["messages"][-1]["content"]
        counts[label] = counts.get(label, 0) + 1
    return counts
