"""Evaluation prompt sets: harmful sets (files, presets, attack wrappers), benign sets, tasks.

Every set becomes a `PromptSet`: a name, where it came from, and a list of `EvalPrompt`, each
with a stable `id`, the request as written (`prompt`), the chat `messages` the model is shown
(the request after any attack wrapper), an optional `category`, and for tasks a `reference`.

Files are read by `data.corpus.load_examples` (csv, json, jsonl, parquet, hub datasets, with
a column mapping); plain text files hold one prompt a line. Presets name the usual harmful
sets and resolve to their hub locations; `path` may point at a local copy of the same set,
whose columns may follow the hub layout or the original release (both are listed per preset).

    prompts = load_prompt_set(PromptSetConfig(preset="advbench", path="harmful_behaviors.csv"))
    prompts.prompts[0].messages   # [{"role": "user", "content": "Write a script that ..."}]
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from safekeel.data.corpus import (
    CorpusConfig,
    CorpusError,
    content_id,
    load_examples,
    resolve_sources,
)
from safekeel.data.embedded.world import check_answer
from safekeel.evaluate.config import AttackConfig, PromptSetConfig, TaskConfig
from safekeel.evaluate.utility import ScorerError

Message = dict[str, str]
SetKind = Literal["harmful", "benign", "task"]

UNCATEGORIZED = "uncategorized"  # category of a row whose category cell is empty
# HarmBench writes a contextual behaviour as its context, this separator, then the request.
CONTEXT_SEPARATOR = "\n\n---\n\n"


class PromptSetError(ValueError):
    """A prompt set or task cannot be loaded: names the set, the file and what is wrong."""


# --------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """Where a named harmful set lives on the hub, and which columns hold what.

    Column lists are candidates, first match wins: the hub copy's names come first, then
    those of the original release, so a local copy of either loads with the same preset.
    """

    name: str
    description: str
    hub_path: str
    split: str = "train"
    subset: str | None = None
    prompt_columns: tuple[str, ...] = ("prompt",)
    category_columns: tuple[str, ...] = ()
    context_columns: tuple[str, ...] = ()
    id_columns: tuple[str, ...] = ()
    # "table": one row per prompt; "category_files": HEx-PHI's one headerless CSV per category
    layout: Literal["table", "category_files"] = "table"


# HEx-PHI's category numbers (its files are category_1.csv ... category_11.csv); category 2
# (child abuse content) is not distributed.
HEX_PHI_CATEGORIES: dict[int, str] = {
    1: "Illegal Activity",
    2: "Child Abuse Content",
    3: "Hate/Harass/Violence",
    4: "Malware",
    5: "Physical Harm",
    6: "Economic Harm",
    7: "Fraud/Deception",
    8: "Adult Content",
    9: "Political Campaigning",
    10: "Privacy Violation Activity",
    11: "Tailored Financial Advice",
}

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("advbench", "AdvBench harmful behaviours (520, no categories)",
               "walledai/AdvBench", prompt_columns=("prompt", "goal")),
        Preset("harmbench", "HarmBench text behaviours (standard; contextual ones with context)",
               "walledai/HarmBench", subset="standard",
               prompt_columns=("prompt", "Behavior"),
               category_columns=("category", "SemanticCategory"),
               context_columns=("context", "ContextString"),
               id_columns=("BehaviorID",)),
        Preset("jailbreakbench", "JailbreakBench JBB-Behaviors, harmful (100, 10 categories)",
               "JailbreakBench/JBB-Behaviors", split="harmful", subset="behaviors",
               prompt_columns=("Goal", "goal"), category_columns=("Category", "category")),
        Preset("strongreject", "StrongREJECT forbidden prompts (313, 6 categories)",
               "walledai/StrongREJECT", prompt_columns=("prompt", "forbidden_prompt"),
               category_columns=("category",)),
        Preset("malicious_instruct", "MaliciousInstruct (100, one prompt a line originally)",
               "walledai/MaliciousInstruct", prompt_columns=("prompt",)),
        Preset("hex_phi", "HEx-PHI (330, 11 categories; gated: accept its licence on the hub)",
               "LLM-Tuning-Safety/HEx-PHI", layout="category_files"),
    )
}


# --------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of a set."""

    id: str
    prompt: str  # the request as written (with any context), before an attack wrapper
    messages: list[Message]  # what the model is shown
    category: str | None = None
    reference: Any = None  # tasks: the answer (or the row), what the scorer compares with


@dataclass(frozen=True)
class PromptSet:
    """A loaded, non-empty set of prompts."""

    name: str
    kind: SetKind
    source: str  # file, directory or hub name, for messages and the report
    prompts: list[EvalPrompt]
    attack: str = "none"
    details: dict[str, Any] = field(default_factory=dict)  # columns used, preset, ...

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_categories(self) -> bool:
        return any(prompt.category is not None for prompt in self.prompts)

    @property
    def categories(self) -> list[str] | None:
        """One category per prompt (`uncategorized` where missing), or None without any."""
        if not self.has_categories:
            return None
        return [prompt.category or UNCATEGORIZED for prompt in self.prompts]

    def fingerprint(self) -> str:
        """Hash of what the model is asked (ids and messages): part of the generation cache key."""
        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(json.dumps([prompt.id, prompt.messages], ensure_ascii=False).encode())
            digest.update(b"\n")
        return digest.hexdigest()[:20]


# --------------------------------------------------------------------------------- attacks


@dataclass(frozen=True)
class Attack:
    """A fixed wrapper around every prompt: a system prompt, a prefix, a suffix."""

    name: str = "none"
    system_prompt: str = ""
    prefix: str = ""
    suffix: str = ""

    def apply(self, messages: Sequence[Message]) -> list[Message]:
        """The messages with the wrapper applied to the last user turn.

        The attack's system prompt comes first; a system turn the set already had follows it
        after a blank line, so neither is lost.
        """
        wrapped = [dict(message) for message in messages]
        last_user = max(i for i, message in enumerate(wrapped) if message["role"] == "user")
        parts = (self.prefix, wrapped[last_user]["content"], self.suffix)
        wrapped[last_user]["content"] = " ".join(part for part in parts if part)
        if self.system_prompt:
            if wrapped and wrapped[0]["role"] == "system":
                wrapped[0]["content"] = f"{self.system_prompt}\n\n{wrapped[0]['content']}"
            else:
                wrapped.insert(0, {"role": "system", "content": self.system_prompt})
        return wrapped


def resolve_attack(cfg: AttackConfig, *, base_dir: Path | None = None) -> Attack:
    """Read an attack's files; the label is `cfg.name`, else 'attack' or 'none'."""
    system_prompt = cfg.system_prompt or _read_attack_file(cfg.system_prompt_file, base_dir)
    suffix = cfg.suffix or _read_attack_file(cfg.suffix_file, base_dir)
    active = bool(system_prompt or cfg.prefix or suffix)
    name = cfg.name or ("attack" if active else "none")
    return Attack(name, system_prompt, cfg.prefix, suffix)


def _read_attack_file(path_text: str, base_dir: Path | None) -> str:
    if not path_text:
        return ""
    path = _resolve_path(path_text, base_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PromptSetError(f"attack file {path}: cannot be read ({error})") from error
    # Only the file's final line ending goes: inner spacing is part of an adversarial string.
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise PromptSetError(f"attack file {path}: is empty")
    return text


# ------------------------------------------------------------------------------ prompt sets


def load_prompt_set(
    cfg: PromptSetConfig, kind: SetKind = "harmful", *, base_dir: Path | None = None
) -> PromptSet:
    """Load a harmful or benign prompt set; raises `PromptSetError` naming file and problem."""
    if not cfg.is_configured:
        raise PromptSetError(f"{kind} prompt set: neither a path nor a preset is given")
    preset = PRESETS[cfg.preset] if cfg.preset else None
    attack = resolve_attack(cfg.attack, base_dir=base_dir)
    name = cfg.name or _default_name(cfg, preset, attack)

    if preset is not None and preset.layout == "category_files":
        source, rows = _load_category_files(cfg, preset, base_dir)
        details: dict[str, Any] = {"layout": "category_files"}
    elif cfg.format == "txt" or (cfg.format == "auto" and cfg.path.lower().endswith(".txt")):
        source, rows = _load_text_lines(_resolve_path(cfg.path, base_dir))
        details = {"layout": "one prompt a line"}
    elif (columns := _json_columns(cfg, base_dir)) is not None:
        source, rows, details = columns
    else:
        source, rows, details = _load_table(cfg, preset, base_dir)

    if cfg.max_rows is not None and cfg.sample_seed is not None:
        # a seeded random sample, kept in file order (the same rows on every machine)
        keep = sorted(random.Random(cfg.sample_seed).sample(range(len(rows)),
                                                            min(cfg.max_rows, len(rows))))
        rows = [rows[index] for index in keep]
        details = {**details, "sample_seed": cfg.sample_seed}
    elif cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    if not rows:
        raise PromptSetError(f"{kind} prompt set {name!r}: {source} holds no prompts (empty set)")
    prompts = [replace(row, messages=attack.apply(row.messages)) for row in rows]
    details = {"preset": cfg.preset or None, **details}
    return PromptSet(name, kind, source, prompts, attack.name, details)


def _default_name(cfg: PromptSetConfig, preset: Preset | None, attack: Attack) -> str:
    base = preset.name if preset is not None else _name_from_path(cfg.path)
    return base if attack.name == "none" else f"{base}+{attack.name}"


# File names that say nothing about the set: its folder's name is put in front.
_GENERIC_STEMS = frozenset({"train", "test", "val", "validation", "dev", "eval", "data"})


def _name_from_path(path_text: str) -> str:
    """'advbench/harmful_behaviors.csv' -> 'harmful_behaviors'; 'gsm8k/test.jsonl' ->
    'gsm8k_test'; 'owner/name' (hub) -> 'name'."""
    path = Path(path_text.rstrip("/"))
    if not path.suffix:
        return path.name
    if path.stem.lower() in _GENERIC_STEMS and path.parent.name:
        return f"{path.parent.name}_{path.stem}"
    return path.stem


def _resolve_path(path_text: str, base_dir: Path | None) -> Path:
    path = Path(path_text).expanduser()
    if base_dir is not None and not path.is_absolute() and not path.exists():
        path = base_dir / path
    return path


def _load_text_lines(path: Path) -> tuple[str, list[EvalPrompt]]:
    """One prompt a line; blank lines skipped, surrounding whitespace removed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptSetError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PromptSetError(f"{path}: cannot be read as UTF-8 text ({error})") from error
    lines = [line.strip() for line in text.splitlines()]
    return str(path), _hashed_prompts([(line, None) for line in lines if line])


JSON_COLUMN_PROMPTS = ("instructions", "prompts", "prompt", "instruction", "goal")


def _json_columns(cfg: PromptSetConfig, base_dir: Path | None
                  ) -> tuple[str, list[EvalPrompt], dict[str, Any]] | None:
    """A .json file holding one object of columns, ``{"instructions": [...], "inputs": []}``
    (safety_tuned_llamas' evaluation sets); None for any other file. A list of strings per
    column; an empty list is a column the file leaves out."""
    if not cfg.path.lower().endswith(".json") or cfg.format not in ("auto", "json"):
        return None
    path = _resolve_path(cfg.path, base_dir)
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        if not fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
            return None
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError):
        return None  # JSON lines, or broken: the table reader says what is wrong
    if not (isinstance(data, dict) and data and all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in data.values())):
        return None  # a one-row JSON-lines file (e.g. a messages list) is read as a table
    filled = {name: values for name, values in data.items() if values}
    if len({len(values) for values in filled.values()}) != 1:
        raise PromptSetError(f"{path}: columns of different lengths "
                             f"{ {name: len(values) for name, values in filled.items()} }")
    column = cfg.prompt_column or next((c for c in JSON_COLUMN_PROMPTS if c in filled), None)
    if column not in filled:
        raise PromptSetError(f"{path}: no prompt column {column or ''} among {list(filled)}; "
                             "set prompt_column")
    return str(path), _hashed_prompts([(text, None) for text in filled[column]]), {
        "layout": "json columns", "prompt_column": column}


def _hashed_prompts(items: Sequence[tuple[str, str | None]]) -> list[EvalPrompt]:
    """Prompts with content-hash ids (repeats numbered in order), as data.corpus makes them."""
    counts: Counter[str] = Counter()
    prompts = []
    for text, category in items:
        messages = [{"role": "user", "content": text}]
        base = content_id(messages)
        counts[base] += 1
        prompt_id = base if counts[base] == 1 else f"{base}-{counts[base]}"
        prompts.append(EvalPrompt(prompt_id, text, messages, category))
    return prompts


def _load_category_files(
    cfg: PromptSetConfig, preset: Preset, base_dir: Path | None
) -> tuple[str, list[EvalPrompt]]:
    """HEx-PHI: `category_<n>.csv` files without a header, one prompt a row."""
    if cfg.path:
        directory = _resolve_path(cfg.path, base_dir)
        if not directory.is_dir():
            raise PromptSetError(
                f"{directory}: preset {preset.name!r} expects a directory of category_<n>.csv "
                "files (the hub repository's layout)"
            )
    else:
        directory = _download_hub_files(preset, cfg.revision, "category_*.csv")
    files = sorted(directory.glob("category_*.csv"), key=_category_number)
    if not files:
        raise PromptSetError(f"{directory}: no category_<n>.csv files for preset {preset.name!r}")
    items: list[tuple[str, str | None]] = []
    for path in files:
        number = _category_number(path)
        category = HEX_PHI_CATEGORIES.get(number, path.stem)
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.reader(handle):
                if row and row[0].strip():
                    items.append((row[0].strip(), category))
    return str(directory), _hashed_prompts(items)


def _category_number(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else 10**6


def _download_hub_files(preset: Preset, revision: str | None, pattern: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            preset.hub_path, repo_type="dataset", revision=revision, allow_patterns=[pattern]
        )
    except Exception as error:  # offline, gated without a token, ...: say which set and why
        raise PromptSetError(
            f"preset {preset.name!r}: cannot download {preset.hub_path} ({error}); set `path` "
            "to a local copy"
        ) from error
    return Path(folder)


def _load_table(
    cfg: PromptSetConfig, preset: Preset | None, base_dir: Path | None
) -> tuple[str, list[EvalPrompt], dict[str, Any]]:
    corpus = _corpus_config(cfg.path, cfg.format, cfg.split, cfg.subset, cfg.revision, preset,
                            base_dir)
    source, columns = peek_columns(corpus)
    prompt_column = _pick_column(cfg.prompt_column, preset.prompt_columns if preset else (),
                                 columns, "prompt", source)
    category_column = _pick_column(cfg.category_column,
                                   preset.category_columns if preset else (), columns,
                                   "category", source, required=False)
    context_column = _pick_column(cfg.context_column, preset.context_columns if preset else (),
                                  columns, "context", source, required=False)
    id_column = _pick_column(cfg.id_column, preset.id_columns if preset else (), columns, "id",
                             source, required=False)
    corpus = _with_columns(corpus, prompt_column, id_column)
    examples = _load_examples(corpus, source)

    prompts = []
    for example in examples:
        messages = prompt_messages(example["messages"])
        if context_column and _cell_text(example.get(context_column)):
            context = _cell_text(example[context_column])
            messages[-1]["content"] = f"{context}{CONTEXT_SEPARATOR}{messages[-1]['content']}"
        category = _cell_text(example.get(category_column)) if category_column else None
        prompts.append(EvalPrompt(example["id"], messages[-1]["content"], messages,
                                  category or (UNCATEGORIZED if category_column else None)))
    details = {
        "prompt_column": prompt_column or "(detected)",
        "category_column": category_column,
        "context_column": context_column,
        "id_column": id_column,
    }
    return source, prompts, details


def _corpus_config(
    path: str,
    format: str,
    split: str,
    subset: str | None,
    revision: str | None,
    preset: Preset | None,
    base_dir: Path | None,
) -> CorpusConfig:
    if path:
        resolved = _resolve_path(path, base_dir)
        location = str(resolved) if resolved.exists() else path
        corpus_format = format
    elif preset is not None:
        location, corpus_format = preset.hub_path, "hub"
    else:  # pragma: no cover - callers check is_configured
        raise PromptSetError("no path and no preset")
    return CorpusConfig(
        path=location,
        format=corpus_format,  # type: ignore[arg-type]
        split=split or (preset.split if preset and not path else "train"),
        subset=subset if subset is not None else (preset.subset if preset and not path else None),
        revision=revision,
        require_response=False,
    )


def _with_columns(corpus: CorpusConfig, prompt_column: str | None, id_column: str | None
                  ) -> CorpusConfig:
    if prompt_column is None:  # let the corpus loader detect the shape
        return replace(corpus, id_column=id_column)
    return replace(corpus, shape="columns", columns={"prompt": prompt_column},
                   id_column=id_column)


def peek_columns(corpus: CorpusConfig) -> tuple[str, list[str]]:
    """The source's name and the column names of its first row (to check a column mapping)."""
    import datasets

    try:
        sources = resolve_sources(corpus)
    except CorpusError as error:
        raise PromptSetError(str(error)) from None
    source = sources[0]
    data_file = Path(source.data_files) if source.data_files else None
    if data_file is not None and data_file.is_file() and data_file.stat().st_size == 0:
        raise PromptSetError(f"{source.name}: the file is empty")
    try:
        if source.is_repo:
            stream = datasets.load_dataset(source.builder, corpus.subset, split=corpus.split,
                                           streaming=True, revision=corpus.revision)
        else:
            stream = datasets.load_dataset(source.builder, data_files=source.data_files,
                                           split="train", streaming=True)
        first = next(iter(stream), None)
    except Exception as error:  # unreadable file, offline hub, unknown split: name the source
        raise PromptSetError(f"{source.name}: cannot be read ({error})") from error
    if first is None:
        raise PromptSetError(f"{source.name}: no rows (empty set)")
    return source.name, list(first)


def _pick_column(
    explicit: str,
    candidates: Sequence[str],
    columns: Sequence[str],
    what: str,
    source: str,
    *,
    required: bool = True,
) -> str | None:
    """The column that holds `what`: the configured one (must exist) or the first candidate.

    Returns None when nothing is configured and no candidate is present: for the prompt this
    means "let the corpus loader detect the shape", for the others "no such column".
    """
    if explicit:
        if explicit not in columns:
            raise PromptSetError(
                f"{source}: no {what} column {explicit!r}; the file has columns "
                f"{', '.join(columns)}"
            )
        return explicit
    for candidate in candidates:
        if candidate in columns:
            return candidate
    if candidates and required:
        raise PromptSetError(
            f"{source}: none of the expected {what} columns ({', '.join(candidates)}) is "
            f"present; the file has columns {', '.join(columns)} (set {what}_column)"
        )
    return None


def _load_examples(corpus: CorpusConfig, source: str) -> list[dict[str, Any]]:
    try:
        return load_examples(corpus)
    except CorpusError as error:
        raise PromptSetError(str(error)) from None
    except ValueError as error:  # shape detection: no prompt-like column
        raise PromptSetError(f"{source}: {error}") from None


def prompt_messages(messages: Sequence[Mapping[str, str]]) -> list[Message]:
    """The turns up to the last user turn: a reference response in the set is not shown."""
    turns = [{"role": message["role"], "content": message["content"]} for message in messages]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    return turns


def _cell_text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# ---------------------------------------------------------------------------------- tasks


def load_task(cfg: TaskConfig, *, base_dir: Path | None = None) -> PromptSet:
    """Load a utility task: prompts with the reference each one is scored against."""
    corpus = _corpus_config(cfg.path, cfg.format, cfg.split, cfg.subset, None, None, base_dir)
    corpus = replace(corpus, max_rows=cfg.max_rows)
    source, columns = peek_columns(corpus)
    name = cfg.name or _name_from_path(cfg.path)
    prompt_column = _pick_column(cfg.prompt_column, (), columns, "prompt", source)
    if cfg.answer_column not in columns:
        raise PromptSetError(
            f"task {name!r}: {source} has no answer column {cfg.answer_column!r}; its columns "
            f"are {', '.join(columns)} (set answer_column)"
        )
    examples = _load_examples(_with_columns(corpus, prompt_column, None), source)
    prompts = []
    for row, example in enumerate(examples):
        answer = example.get(cfg.answer_column)
        if answer is None:
            raise PromptSetError(
                f"task {name!r}: {source}, row {row}: the answer column "
                f"{cfg.answer_column!r} is empty"
            )
        if cfg.reference == "row":
            reference: Any = {k: v for k, v in example.items() if k != "messages"}
        else:
            reference = answer
        messages = prompt_messages(example["messages"])
        if cfg.prompt_template:
            messages[-1]["content"] = _from_template(cfg.prompt_template, example, source, row)
        prompts.append(EvalPrompt(example["id"], messages[-1]["content"], messages,
                                  reference=reference))
    if not prompts:
        raise PromptSetError(f"task {name!r}: {source} holds no rows (empty set)")
    details = {"prompt_column": prompt_column or "(detected)", "answer_column":
               cfg.answer_column, "scorer": cfg.scorer}
    return PromptSet(name, "task", source, prompts, "none", details)


def _from_template(template: str, row: Mapping[str, Any], source: str, index: int) -> str:
    """`template` filled from the row's columns (a missing column is empty text)."""
    try:
        return template.format_map({k: "" if v is None else v for k, v in row.items()
                                    if k != "messages"})
    except KeyError as error:
        raise PromptSetError(f"{source}, row {index}: prompt_template names column {error}, "
                             f"which the row does not have") from None


def world_task_scorer(prediction: str, reference: Mapping[str, Any]) -> bool:
    """Scorer for the synthetic world's tasks (use with `reference: row`).

    Adapts `data.embedded.world.check_answer(example, response)` to the scorer signature
    `(prediction, reference)`: the row carries the task kind and the answer.
    """
    if not isinstance(reference, Mapping):
        raise ScorerError(
            "world_task_scorer needs the whole row as reference (set the task's "
            f"`reference: row`), got {type(reference).__name__}"
        )
    if not isinstance(prediction, str):
        raise ScorerError(f"prediction must be a string, got {type(prediction).__name__}")
    try:
        return check_answer(reference, prediction)  # type: ignore[arg-type]
    except ValueError as error:  # a row that is not one of the world's tasks
        raise ScorerError(str(error)) from None
