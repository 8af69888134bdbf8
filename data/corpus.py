"""Load a fine-tuning corpus from local files or the hub and normalise it to chat examples.

A normalised example is a dict with
  * `id`: a string, stable across runs: the source's id column, else a content hash;
  * `messages`: [{role, content}, ...], the last assistant turn being the response;
  * every original column, carried through untouched.

Local files (and the data files of a hub-style directory) are read by our own streaming
readers, one file at a time, so a corpus larger than memory streams, every problem can be
named by file, row and field, and values reach validation exactly as the file holds them
(no type inference across rows). Hub datasets stream through `datasets.load_dataset`.
Rows are counted from 0 within their file (or hub split).
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from safekeel.data.config import ConfigError, option

log = logging.getLogger(__name__)

FILE_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

Shape = Literal[
    "auto", "messages", "sharegpt", "prompt_response", "instruction", "goal_target", "columns"
]
ROLES = ("system", "user", "assistant")
# label_column values that mean harmful unless label_positive says otherwise
DEFAULT_POSITIVE_LABELS = ("unsafe", "harmful", "1", "true", "yes", "positive")


@dataclass
class CorpusConfig:
    path: str = option("", help="Local file, glob, or directory of jsonl/json/csv/parquet files, "
                            "or a hub dataset name (owner/name).")
    format: Literal["auto", "json", "csv", "parquet", "hub"] = option(
        "auto", help="File format; auto picks it from the file suffix, or hub for a dataset name.")
    split: str = option("train", help="Split to read (hub datasets and hub-style directories).")
    subset: str | None = option(None, help="Hub dataset configuration name, if it has several.")
    revision: str | None = option(None, help="Hub dataset revision (branch, tag or commit).")
    shape: Shape = option("auto", help="How rows map to chat messages: messages (chat list), "
                          "sharegpt (conversations with from/value), prompt_response, instruction "
                          "(instruction/input/output), goal_target (AdvBench), columns (use "
                          "`columns`), or auto (detect from the column names).")
    columns: dict[str, str] = option({}, help="For shape=columns: which source columns hold "
                                     "prompt, response, system (optional) and id (optional), "
                                     "e.g. {prompt: question, response: answer}.")
    id_column: str | None = option(None, help="Column with a stable row id; default: `id` if "
                                   "present, else a hash of the messages.")
    require_response: bool = option(True, help="Rows must end with an assistant response "
                                    "(false for prompt-only sets, e.g. probe training).")
    on_bad_row: Literal["error", "skip"] = option("error", help="error: stop at the first bad "
                                                  "row, naming file, row and field; skip: drop "
                                                  "it and count it by reason in the report.")
    max_rows: int | None = option(None, help="Read at most this many rows (for quick runs).")
    label_column: str | None = option(None, help="A column holding each row's known class "
                                      "(e.g. `flag` in the NLSR mixes): annotate's report then "
                                      "gives every risk score's AUROC against it. Checked "
                                      "before scoring; a bad value stops the run naming file, "
                                      "row and field.")
    label_positive: list[str] = option([], help="Values of label_column that mean harmful "
                                       "(compared ignoring case); default: "
                                       + "/".join(DEFAULT_POSITIVE_LABELS) + ".")
    label_negative: list[str] = option([], help="Values that mean benign; default: every "
                                       "other text value (and 0/false). When given, a value in "
                                       "neither list is an error.")

    def validate(self) -> None:
        if (self.label_positive or self.label_negative) and not self.label_column:
            raise ConfigError("label_positive / label_negative: set label_column too")
        both = {v.casefold() for v in self.label_positive} & {
            v.casefold() for v in self.label_negative}
        if both:
            raise ConfigError(f"label_positive and label_negative: {min(both)!r} is in both")
        if self.shape == "columns":
            missing = {"prompt"} - set(self.columns)
            if missing or (self.require_response and "response" not in self.columns):
                raise ConfigError(
                    "columns: shape=columns needs at least `prompt`"
                    + (" and `response`" if self.require_response else "")
                    + f" mapped to source columns, got {self.columns!r}"
                )
        allowed = {"prompt", "response", "system", "id"}
        unknown = set(self.columns) - allowed
        if unknown:
            raise ConfigError(
                f"columns: unknown target {min(unknown)!r}; allowed: {sorted(allowed)}"
            )
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"max_rows: must be at least 1, got {self.max_rows}")


class CorpusError(ValueError):
    """A corpus problem, with the file, row and field it was found at."""

    def __init__(self, source: str, message: str, row: int | None = None, field: str | None = None):
        self.source, self.row, self.field, self.reason = source, row, field, message
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


@dataclass
class LoadReport:
    """What was read and what was skipped (by reason), for the stage's own report."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first few skip messages, verbatim

    def skip(self, err: CorpusError) -> None:
        self.skipped[err.reason.split(":")[0]] += 1
        if len(self.examples) < 20:
            self.examples.append(str(err))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "skip_examples": self.examples,
        }


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One readable unit: a local file, or a hub dataset split."""

    name: str  # for messages: the file path, or "hub:owner/name[split]"
    builder: str  # datasets builder: json / csv / parquet, or the hub name / local repo dir
    data_files: str | None
    is_repo: bool = False


def resolve_sources(cfg: CorpusConfig) -> list[Source]:
    """Expand the configured path into the files (or the hub dataset) to read, in order."""
    if not cfg.path:
        raise CorpusError("corpus", "no corpus path given (set corpus.path)")
    path = Path(cfg.path).expanduser()
    if cfg.format == "hub":
        return [Source(f"hub:{cfg.path}[{cfg.split}]", cfg.path, None, is_repo=True)]
    if any(ch in cfg.path for ch in "*?["):
        files = sorted(glob.glob(os.path.expanduser(cfg.path), recursive=True))
        if not files:
            raise CorpusError(cfg.path, "no file matches this pattern")
        return [_file_source(Path(f), cfg) for f in files]
    if path.is_dir():
        # A directory laid out like a hub dataset repo (data/train-*.parquet, README configs)
        # loads exactly as its hub name would.
        return _directory_sources(path, cfg)
    if path.is_file():
        return [_file_source(path, cfg)]
    if cfg.format == "auto" and _looks_like_hub_id(cfg.path):
        return [Source(f"hub:{cfg.path}[{cfg.split}]", cfg.path, None, is_repo=True)]
    raise CorpusError(str(path), "file not found (and not a hub dataset name of the form owner/name)")


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) in (1, 2) and all(p and not p.startswith(".") for p in parts) and not (
        Path(text).suffix in FILE_FORMATS
    )


def _file_source(path: Path, cfg: CorpusConfig) -> Source:
    if cfg.format != "auto":
        return Source(str(path), cfg.format, str(path))
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise CorpusError(
            str(path),
            f"unknown file format {suffix or '(no suffix)'!r}; known: "
            + ", ".join(sorted(FILE_FORMATS))
            + " (or set corpus.format)",
        )
    return Source(str(path), FILE_FORMATS[suffix], str(path))


def _stream_source(source: Source, cfg: CorpusConfig) -> Iterator[dict[str, Any] | _RowError]:
    """The rows of one source, each exactly as the file holds it (or a `_RowError` for a row
    that cannot be parsed at all). A source with no rows is an error naming it.

    Local files are read by our own readers, not `datasets`: its loaders infer one type per
    column across rows, so a JSON string "4" beside an integer turns into 4, and a valid row
    would be named (or skipped) for its neighbour's defect.
    """
    rows = 0
    for row in _source_rows(source, cfg):
        rows += 1
        yield row
    if rows == 0:
        what = "file" if source.data_files else "split"
        raise CorpusError(source.name, f"no rows: the {what} is empty")


def _source_rows(source: Source, cfg: CorpusConfig) -> Iterator[dict[str, Any] | _RowError]:
    if source.is_repo:
        yield from _repo_rows(source, cfg)
        return
    path = source.data_files or source.builder
    readers = {"json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    if source.builder not in readers:  # pragma: no cover - the config validates the format
        raise CorpusError(source.name, f"unknown format {source.builder!r}")
    try:
        yield from readers[source.builder](path, source.name)
    except OSError as err:
        raise CorpusError(source.name, f"cannot be read: {err.strerror or err}") from None


def _decode(line: bytes) -> str | _RowError:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return _RowError(None, f"not valid UTF-8: byte {bad.start} of the line")


def _json_rows(path: str, name: str) -> Iterator[dict[str, Any] | _RowError]:
    """A JSON array of objects, or JSON lines (one value a line; blank lines ignored)."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        yield from _json_array_rows(path, name)
        return
    with open(path, "rb") as fh:
        row = 0
        for number, line in enumerate(fh, start=1):
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            text = _decode(line)
            if isinstance(text, _RowError):
                yield text
            else:
                try:
                    yield json.loads(text)
                except json.JSONDecodeError as bad:
                    yield _RowError(None, f"invalid JSON: {bad.msg} (line {number})")
            row += 1


def _json_array_rows(path: str, name: str) -> Iterator[dict[str, Any]]:
    # A JSON array is one value: it is parsed whole (as `datasets` does), so an error in it
    # names its line and column rather than a row.
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as bad:
        raise CorpusError(name, f"not valid UTF-8 at byte {bad.start}") from None
    except json.JSONDecodeError as bad:
        raise CorpusError(name, f"invalid JSON: {bad.msg} (line {bad.lineno}, column "
                                f"{bad.colno})") from None
    yield from data


def _csv_rows(path: str, name: str) -> Iterator[dict[str, Any] | _RowError]:
    """Rows of a CSV file with a header. Every cell stays the text it is (no type guessing:
    "4" stays "4", "NA" stays "NA"); only an empty cell reads as missing."""
    import csv

    csv.field_size_limit(1 << 30)  # a long response is a row to validate, not a parse error
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
        except (UnicodeDecodeError, csv.Error) as bad:
            raise CorpusError(name, f"cannot read the header: {bad}") from None
        if header is None:
            return
        row = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as bad:
                # The text stream cannot resync after bad bytes: stop with the row named.
                raise CorpusError(name, f"not valid UTF-8 (byte {bad.start} of a block)",
                                  row=row) from None
            except csv.Error as bad:
                yield _RowError(None, f"invalid CSV: {bad}")
                row += 1
                continue
            if not cells:
                continue
            if len(cells) > len(header):
                yield _RowError(None, f"invalid CSV: {len(cells)} fields, the header has "
                                      f"{len(header)}")
            else:
                values = cells + [""] * (len(header) - len(cells))
                yield {column: value if value != "" else None
                       for column, value in zip(header, values, strict=True)}
            row += 1


def _parquet_rows(path: str, name: str) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as err:
        raise CorpusError(name, f"cannot be read as parquet: {err}") from None
    for batch in parquet.iter_batches(batch_size=256):
        yield from batch.to_pylist()


def _repo_rows(source: Source, cfg: CorpusConfig) -> Iterator[dict[str, Any]]:
    """A hub dataset through `datasets` (local data files are read by our own readers)."""
    import datasets

    try:
        ds = datasets.load_dataset(
            source.builder, cfg.subset, split=cfg.split, streaming=True, revision=cfg.revision
        )
        yield from ds
    except (UnicodeDecodeError, ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        raise CorpusError(source.name, f"cannot be read: {err}") from err
    except Exception as err:  # pyarrow parse errors have no common base we can import cheaply
        if type(err).__module__.startswith("pyarrow"):
            raise CorpusError(source.name, f"cannot be read: {err}") from err
        raise


def _directory_sources(path: Path, cfg: CorpusConfig) -> list[Source]:
    """The data files of a directory laid out like a hub dataset repo, for `cfg.split`, as
    `datasets` resolves them (data/train-*.parquet, README configs); each is then read by our
    own readers and named in messages. A layout `datasets` resolves to something else
    (a loading script, another format) is read by `datasets` itself."""
    import datasets

    whole = [Source(f"{path}[{cfg.split}]", str(path), None, is_repo=True)]
    try:
        builder = datasets.load_dataset_builder(str(path), cfg.subset, revision=cfg.revision)
    except Exception:  # noqa: BLE001 - whatever it is, `load_dataset` will name it
        return whole
    data_files = builder.config.data_files or {}
    if builder.name not in ("json", "csv", "parquet") or not data_files:
        return whole
    if cfg.split not in data_files:
        raise CorpusError(str(path), f"no split {cfg.split!r}; the dataset has: "
                          + ", ".join(sorted(data_files)) + " (set corpus.split)")
    files = [str(f) for f in data_files[cfg.split]]
    if not all(Path(f).is_file() for f in files):
        return whole
    return [Source(f, builder.name, f) for f in files]


# --------------------------------------------------------------------------- row -> example


def detect_shape(columns: Iterable[str]) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if "prompt" in cols and ({"response", "completion"} & cols):
        return "prompt_response"
    if "instruction" in cols and "output" in cols:
        return "instruction"
    if "goal" in cols and "target" in cols:
        return "goal_target"
    if "prompt" in cols:
        return "prompt_response"  # prompt-only sets
    if "instruction" in cols:
        return "instruction"
    if "goal" in cols:
        return "goal_target"
    raise ValueError(
        "cannot tell the shape from columns "
        + ", ".join(sorted(cols))
        + "; set corpus.shape and, for shape=columns, corpus.columns"
    )


def _text(row: dict[str, Any], column: str, *, required: bool = True) -> str | None:
    if column not in row or row[column] is None:
        if required:
            raise _RowError(column, "missing: the field is absent or null")
        return None
    value = row[column]
    if not isinstance(value, str):
        raise _RowError(column, f"not a string: got {type(value).__name__} {value!r:.60}")
    return value


class _RowError(Exception):
    def __init__(self, field: str | None, message: str):
        self.field, self.message = field, message


def _turns(prompt: str, response: str | None, system: str | None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": prompt})
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return turns


def _sharegpt_turns(row: dict[str, Any]) -> list[dict[str, str]]:
    names = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
             "assistant": "assistant"}
    convo = row.get("conversations")
    if not isinstance(convo, list):
        raise _RowError("conversations", "missing: absent or not a list of turns")
    turns = []
    for i, turn in enumerate(convo):
        if not isinstance(turn, dict) or turn.get("from") not in names:
            raise _RowError(f"conversations[{i}].from", f"unknown role: expected one of {sorted(names)}")
        if not isinstance(turn.get("value"), str):
            raise _RowError(f"conversations[{i}].value", "not a string: the turn has no text value")
        turns.append({"role": names[turn["from"]], "content": turn["value"]})
    return turns


def _chat_turns(row: dict[str, Any]) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RowError("messages", "missing: absent, empty, or not a list of {role, content}")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _RowError(f"messages[{i}]", "not a mapping: expected {role, content}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise _RowError(f"messages[{i}].role", f"unknown role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _RowError(
                f"messages[{i}].content", f"not a string: got {type(content).__name__}"
            )
        turns.append({"role": role, "content": content})
    return turns


def row_to_messages(row: dict[str, Any], shape: str, cfg: CorpusConfig) -> list[dict[str, str]]:
    """Map one source row to chat turns (validated: roles in order, no empty turn)."""
    if shape == "messages":
        turns = _chat_turns(row)
    elif shape == "sharegpt":
        turns = _sharegpt_turns(row)
    elif shape == "prompt_response":
        # rows are read as written: a row may lack the column its neighbours have
        response_col = "completion" if "completion" in row and "response" not in row else "response"
        turns = _turns(
            _text(row, "prompt"),
            _text(row, response_col, required=cfg.require_response),
            _text(row, "system", required=False),
        )
    elif shape == "instruction":
        instruction = _text(row, "instruction")
        extra = _text(row, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = _turns(prompt, _text(row, "output", required=cfg.require_response),
                       _text(row, "system", required=False))
    elif shape == "goal_target":
        turns = _turns(_text(row, "goal"), _text(row, "target", required=cfg.require_response),
                       None)
    elif shape == "columns":
        cols = cfg.columns
        turns = _turns(
            _text(row, cols["prompt"]),
            _text(row, cols["response"], required=cfg.require_response)
            if "response" in cols else None,
            _text(row, cols["system"], required=False) if "system" in cols else None,
        )
    else:  # pragma: no cover - the config validates the shape
        raise ValueError(shape)
    check_turn_order(turns, cfg.require_response)
    return turns


def check_turn_order(turns: list[dict[str, str]], require_response: bool) -> None:
    """system? then user/assistant alternating from user; ends on assistant if required."""
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    if not body:
        raise _RowError("messages", "no user turn: the conversation has no prompt")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        index = i + (len(turns) - len(body))
        if turn["role"] != expected:
            raise _RowError(
                f"messages[{index}].role",
                f"roles out of order: expected {expected!r} here, got {turn['role']!r}",
            )
        if not turn["content"].strip():
            what = "empty response" if turn["role"] == "assistant" else f"empty {turn['role']} turn"
            raise _RowError(f"messages[{index}].content", what)
    if require_response and body[-1]["role"] != "assistant":
        raise _RowError("messages", "no response: the last turn is not from the assistant")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class SeenIds:
    """The ids seen so far, as 8-byte digests with the global row of each: 16 bytes a row.

    The one piece of loader state that grows with the corpus (repeats must be numbered and
    duplicate ids caught across the whole of it). A dict of Python ints would cost about
    250 bytes a row, so new entries wait in a small dict and every `merge_every` of them
    join two sorted numpy arrays that answer lookups by binary search.
    """

    def __init__(self, merge_every: int = 1 << 16):
        self._merge_every = merge_every
        self._digests = np.empty(0, dtype=np.uint64)
        self._rows = np.empty(0, dtype=np.int64)
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._digests) + len(self._recent)

    def row_of(self, digest: int) -> int | None:
        """The global row where `digest` was first added, or None if it never was."""
        row = self._recent.get(digest)
        if row is not None:
            return row
        key = np.uint64(digest)
        at = int(np.searchsorted(self._digests, key))
        if at < len(self._digests) and self._digests[at] == key:
            return int(self._rows[at])
        return None

    def add(self, digest: int, row: int) -> None:
        self._recent[digest] = row
        if len(self._recent) >= self._merge_every:
            self._merge()

    def _merge(self) -> None:
        # Insert the sorted new entries into the sorted arrays: one array copy at a time,
        # so the peak stays near the arrays' own size (a concatenate-and-argsort needs 3x).
        count = len(self._recent)
        digests = np.fromiter(self._recent.keys(), dtype=np.uint64, count=count)
        rows = np.fromiter(self._recent.values(), dtype=np.int64, count=count)
        order = np.argsort(digests)
        digests, rows = digests[order], rows[order]
        at = np.searchsorted(self._digests, digests)
        self._digests = np.insert(self._digests, at, digests)
        self._rows = np.insert(self._rows, at, rows)
        self._recent.clear()


def content_id(messages: list[dict[str, str]]) -> str:
    """A stable id from the conversation text alone (same text, same id, on any machine)."""
    blob = json.dumps(messages, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


# --------------------------------------------------------------------------- the loader


def iter_examples(
    cfg: CorpusConfig,
    report: LoadReport | None = None,
    row_filter: Callable[[int], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream normalised examples from the configured corpus.

    `row_filter(global_row_index)` picks the rows to yield (used to split a corpus between
    workers and to resume). Bad rows raise `CorpusError`, or, with `on_bad_row: skip`, are
    counted in `report` by reason.
    """
    for _, example in iter_indexed_examples(cfg, report, row_filter):
        yield example


def count_rows(cfg: CorpusConfig) -> int:
    """Rows in the corpus (bad ones included) without normalising them: one cheap pass."""
    total = 0
    for source in resolve_sources(cfg):
        for _ in _stream_source(source, cfg):
            total += 1
            if cfg.max_rows is not None and total >= cfg.max_rows:
                return total
    return total


def corpus_fingerprint(cfg: CorpusConfig, chunk_size: int = 1 << 20) -> str:
    """sha256 over the bytes of every local file of the corpus, in reading order, so a rerun
    can tell that the corpus at the same path now holds something else. A remote hub dataset
    is named by its revision instead (unpinned: the name alone, which cannot see updates)."""
    digest = hashlib.sha256()
    for source in resolve_sources(cfg):
        digest.update(f"\0{Path(source.name).name if source.data_files else source.name}\0"
                      .encode())
        if not source.data_files:
            digest.update(f"revision={cfg.revision}".encode())
            continue
        with open(source.data_files, "rb") as fh:
            while block := fh.read(chunk_size):
                digest.update(block)
    return digest.hexdigest()


def iter_indexed_examples(
    cfg: CorpusConfig,
    report: LoadReport | None = None,
    row_filter: Callable[[int], bool] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`iter_examples` with each example's global row index (its position in the corpus)."""
    report = report if report is not None else LoadReport()
    seen_ids = SeenIds()
    source_names: list[str] = []
    source_starts: list[int] = []  # global row of each source's first row
    global_row = 0
    shape: str | None = None if cfg.shape == "auto" else cfg.shape
    id_column = cfg.id_column or cfg.columns.get("id")
    for source in resolve_sources(cfg):
        source_names.append(source.name)
        source_starts.append(global_row)
        for row_index, row in enumerate(_stream_source(source, cfg)):
            if cfg.max_rows is not None and global_row >= cfg.max_rows:
                return
            index = global_row
            global_row += 1
            # Every row is normalised, even rows another worker owns: content-hash ids of
            # repeated conversations are numbered in corpus order, so they must not depend
            # on how the corpus is split.
            owned = row_filter is None or row_filter(index)
            if owned:
                report.rows_read += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                if not isinstance(row, dict):
                    raise _RowError(None, f"not an object: the row is a {type(row).__name__}, "
                                          "expected an object of named fields")
                if shape is None:
                    try:
                        shape = detect_shape(row.keys())
                    except ValueError as err:
                        raise CorpusError(source.name, str(err)) from None
                messages = row_to_messages(row, shape, cfg)
                example_id = _example_id(row, messages, id_column,
                                         lambda i: seen_ids.row_of(_digest(i)) is not None)
                digest = _digest(example_id)
                first = seen_ids.row_of(digest)
                if first is not None:
                    first_source = bisect.bisect_right(source_starts, first) - 1
                    raise _RowError(
                        id_column or "id",
                        f"duplicate id: {example_id!r} was first seen at "
                        f"{source_names[first_source]}, row {first - source_starts[first_source]}",
                    )
            except _RowError as bad:
                if not owned:
                    continue  # its owner reports it
                err = CorpusError(source.name, bad.message, row=row_index, field=bad.field)
                if cfg.on_bad_row == "skip":
                    report.skip(err)
                    continue
                raise err from None
            seen_ids.add(digest, index)
            if not owned:
                continue
            report.rows_kept += 1
            example = {k: v for k, v in row.items() if k not in ("id", "messages")}
            example["id"] = example_id
            example["messages"] = messages
            yield index, example


def _example_id(
    row: dict[str, Any],
    messages: list[dict[str, str]],
    id_column: str | None,
    taken: Callable[[str], bool],
) -> str:
    column = id_column or ("id" if "id" in row else None)
    if column is not None:
        if row.get(column) is None:
            raise _RowError(column, "missing: the id field is absent or null")
        value = row[column]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _RowError(column, f"bad id: must be a string or integer, got {type(value).__name__}")
        return str(value)
    # Identical conversations get the same hash; repeats are numbered in corpus order
    # (hash, hash-2, hash-3, ...) so ids stay unique and still stable from run to run.
    base = candidate = content_id(messages)
    repeat = 1
    while taken(candidate):
        repeat += 1
        candidate = f"{base}-{repeat}"
    return candidate


def label_is_positive(value: Any, cfg: CorpusConfig) -> bool:
    """Whether a label_column value means harmful; ValueError saying why a value is no label.

    Booleans and the numbers 0/1 read as false/true; text is compared ignoring case and
    surrounding spaces. Missing, empty, other numbers and nested values are errors.
    """
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if value not in (0, 1):
            raise ValueError(f"not a label: the number {value!r} (numbers must be 0 or 1)")
        text = str(int(value))
    elif isinstance(value, str) and value.strip():
        text = value.strip().casefold()
    elif value is None:
        raise ValueError("missing: the label is absent or null")
    else:
        raise ValueError(f"not a label: {type(value).__name__} {value!r} (expected text, "
                         "true/false or 0/1)")
    positive = {v.casefold() for v in cfg.label_positive} or set(DEFAULT_POSITIVE_LABELS)
    if text in positive:
        return True
    if cfg.label_negative:
        if text in {v.casefold() for v in cfg.label_negative}:
            return False
        raise ValueError(f"not a label: {value!r} is in neither label_positive "
                         f"{sorted(positive)} nor label_negative {sorted(cfg.label_negative)}")
    return False


def check_labels(cfg: CorpusConfig) -> None:
    """With label_column set, read every row's label once (before any scoring, so a bad one
    stops the run at once); CorpusError names file, row and field. Rows stay as they are."""
    if not cfg.label_column:
        return
    total = 0
    for source in resolve_sources(cfg):
        for row_index, row in enumerate(_stream_source(source, cfg)):
            if cfg.max_rows is not None and total >= cfg.max_rows:
                return
            total += 1
            if not isinstance(row, dict):
                continue  # the reader reports it
            try:
                label_is_positive(row.get(cfg.label_column), cfg)
            except ValueError as err:
                raise CorpusError(source.name, str(err), row=row_index,
                                  field=cfg.label_column) from None


def load_examples(cfg: CorpusConfig, report: LoadReport | None = None) -> list[dict[str, Any]]:
    """All examples in memory: for small corpora, tests and evaluation sets."""
    return list(iter_examples(cfg, report))
