"""LoRA adapters used as models: an adapter directory resolves to a merged, full checkpoint.

A directory holding `adapter_config.json` (a peft LoRA adapter) names its base in
`base_model_name_or_path`; the base may be the alias `smollm2-135m-instruct`, a local HF
directory, a hub id, or itself an adapter directory (a chain adapter -> adapter -> base).
`merged_checkpoint` merges the whole chain into the base, innermost adapter first, in
float32 (adapters stored in bfloat16 are upcast), saves the result in the base's dtype with
the tokenizer of the outermost adapter that has one (else the base's), and keeps it in
`$SAFEKEEL_CACHE/merged/<key>/`. The key hashes the chain's content (every adapter's
config, weights and tokenizer files, and the base's identity), so a changed adapter gets a
new merge and an unchanged one is merged only once. The merge is written to a hidden
sibling and renamed into place with its record (`safekeel_merge.json`) inside: a crash
leaves no directory under the final name.

Relative base paths are read as peft does, relative to the working directory. Adapter
weights must be safetensors (a pickled `adapter_model.bin` is refused).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safekeel.data.files import build_directory_once, file_sha256
from safekeel.data.models import (
    SMOLLM2_ALIAS,
    MissingPackageError,
    ModelNotFoundError,
    _hide_progress_bars,
    cache_root,
    locate_model,
)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGE_RECORD = "safekeel_merge.json"
MERGE_FORMAT = 1  # bump when the merged output for the same chain changes
PEFT_INSTALL_HINT = "pip install 'safekeel[peft]'"

# Files besides the weights that change what a merged checkpoint holds or how it renders.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_BASE_CONFIG_FILES = ("config.json", "generation_config.json", *_TOKENIZER_FILES)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
# adapter_config.json keys that say where the base is, not what the adapter does
_LOCATION_KEYS = ("base_model_name_or_path", "revision")


class AdapterError(ModelNotFoundError):
    """An adapter chain cannot be resolved (missing base, a loop, unreadable files)."""


@dataclass(frozen=True)
class AdapterChain:
    """The adapters from the given one inwards, and the model under the innermost."""

    adapters: tuple[Path, ...]  # resolved adapter directories, outermost first
    base: str  # the innermost adapter's base_model_name_or_path, as written
    base_path: str  # that base located: a directory or a hub id

    def describe(self) -> str:
        return " -> ".join([*(str(a) for a in self.adapters), self.base])


def merged_cache_dir() -> Path:
    """Where merged adapter chains live: `$SAFEKEEL_CACHE/merged`."""
    return cache_root() / "merged"


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    return Path(path, ADAPTER_CONFIG).is_file()


def read_adapter_base(adapter_dir: str | os.PathLike[str]) -> str:
    """The adapter's `base_model_name_or_path`: as written, except a relative path that
    names a folder beside the adapter (`../safe_reference`), which is read from the
    adapter's folder, so a published set of stacked adapters loads wherever it is copied."""
    config = _read_adapter_config(Path(adapter_dir))
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise AdapterError(f"LoRA adapter {adapter_dir}: {ADAPTER_CONFIG} names no "
                           "base_model_name_or_path")
    beside = Path(adapter_dir) / base
    if not Path(base).is_absolute() and base.startswith(("./", "../")) and beside.is_dir():
        return str(beside.resolve())
    return base


def adapter_chain(adapter_dir: str | os.PathLike[str]) -> AdapterChain:
    """Follow `base_model_name_or_path` from `adapter_dir` down to a model that is no adapter."""
    current = Path(adapter_dir).expanduser().resolve()
    seen: list[Path] = []
    while True:
        if current in seen:
            raise AdapterError("LoRA adapter chain loops: " + " -> ".join(
                str(p) for p in [*seen, current]))
        seen.append(current)
        if not (current / ADAPTER_WEIGHTS).is_file():
            raise AdapterError(f"LoRA adapter {current}: no {ADAPTER_WEIGHTS} (pickled "
                               "adapter_model.bin files are not loaded)")
        base = read_adapter_base(current)
        try:
            located = locate_model(base)
        except ModelNotFoundError as error:
            raise AdapterError(f"LoRA adapter {current}: its base cannot be found: {error}") from None
        if Path(located).is_dir() and is_adapter_dir(located):
            current = Path(located).resolve()
            continue
        return AdapterChain(tuple(seen), base, located)


def base_reference(spec: str | os.PathLike[str]) -> str:
    """How an adapter trained on `spec` records its base: the alias and hub ids as written,
    local directories as absolute paths (so the record does not depend on the working
    directory, nor point into the merge cache)."""
    text = os.fspath(spec)
    if text == SMOLLM2_ALIAS:
        return text
    path = Path(text).expanduser()
    return str(path.resolve()) if path.is_dir() else text


def chain_key(chain: AdapterChain) -> str:
    """The cache key of a chain's merge: its adapters' content and the base's identity."""
    parts = [f"format:{MERGE_FORMAT}"]
    for adapter in chain.adapters:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *_TOKENIZER_FILES):
            if (adapter / name).is_file():
                parts.append(f"{name}:{file_sha256(adapter / name)}")
        parts.append("--")
    parts.append(f"base:{base_identity(chain.base_path)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def adapters_sha256(chain: AdapterChain) -> str:
    """What the adapters do, wherever they and their base are stored: each adapter's weights
    and its config without location keys. Goes into model fingerprints (a LoRA adapter
    seldom touches the embeddings those hash)."""
    parts = []
    for adapter in chain.adapters:
        config = {k: v for k, v in _read_adapter_config(adapter).items() if k not in _LOCATION_KEYS}
        parts.append(json.dumps(config, sort_keys=True))
        parts.append(file_sha256(adapter / ADAPTER_WEIGHTS))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def base_identity(located: str) -> str:
    """A base directory's config and tokenizer files by content, its weight files by name,
    size and modification time (hashing gigabytes on every load would be too slow; a
    rewrite changes them); a hub id by name."""
    path = Path(located)
    if not path.is_dir():
        return f"hub:{located}"
    parts = [f"dir:{path.resolve()}"]
    for name in _BASE_CONFIG_FILES:
        if (path / name).is_file():
            parts.append(f"{name}:{file_sha256(path / name)}")
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES:
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def read_merge_record(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of a merged checkpoint directory, None for any other model."""
    record = Path(model_dir, MERGE_RECORD) if model_dir else None
    if record is None or not record.is_file():
        return None
    try:
        value = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def merged_adapters_sha256(model_dir: str | os.PathLike[str]) -> str | None:
    """`adapters_sha256` of the chain a merged checkpoint came from; None for other models."""
    record = read_merge_record(model_dir)
    value = record.get("adapters_sha256") if record else None
    return value if isinstance(value, str) else None


def merged_checkpoint(adapter_dir: str | os.PathLike[str]) -> Path:
    """The merged HF checkpoint of the adapter chain starting at `adapter_dir` (cached)."""
    chain = adapter_chain(adapter_dir)
    target = merged_cache_dir() / chain_key(chain)
    if target.exists():
        _check_merged(target)
        return target
    if importlib.util.find_spec("peft") is None:
        raise MissingPackageError(
            f"LoRA adapter {chain.adapters[0]}: loading an adapter needs peft: {PEFT_INSTALL_HINT}")
    logger.info("Merging LoRA adapter chain %s into %s (once)", chain.describe(), target)

    def merge(staging: Path) -> None:
        with _hide_progress_bars():
            _merge_into(chain, staging)

    build_directory_once(target, merge)
    _check_merged(target)
    return target


def _merge_into(chain: AdapterChain, out_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        save_dtype = _float_dtype(AutoConfig.from_pretrained(chain.base_path))
        model = AutoModelForCausalLM.from_pretrained(chain.base_path, dtype=torch.float32)
        for adapter in reversed(chain.adapters):  # innermost first
            # autocast_adapter_dtype (the default) upcasts bf16/fp16 adapter weights to float32
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise AdapterError(f"LoRA adapter chain {chain.describe()}: cannot merge "
                           f"({type(error).__name__}: {error})") from error
    tokenizer_source = next((str(a) for a in chain.adapters
                             if (a / "tokenizer_config.json").is_file()), chain.base_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    model.to(save_dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "format": MERGE_FORMAT,
        "chain": [str(a) for a in chain.adapters],
        "base": chain.base,
        "base_path": chain.base_path,
        "dtype": str(save_dtype).removeprefix("torch."),
        "adapters_sha256": adapters_sha256(chain),
        "tokenizer_from": tokenizer_source,
    }
    # The record is written last: a directory without it is never trusted.
    (out_dir / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _float_dtype(config: Any) -> torch.dtype:
    """The base's own floating dtype (float32 when the config does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _check_merged(directory: Path) -> None:
    if read_merge_record(directory) is None or not (directory / "config.json").is_file():
        raise AdapterError(f"merged adapter cache {directory} is incomplete (no {MERGE_RECORD}); "
                           "delete the directory and it will be merged again")


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        value = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"LoRA adapter {adapter_dir}: cannot read {ADAPTER_CONFIG} "
                           f"({error})") from None
    if not isinstance(value, dict):
        raise AdapterError(f"LoRA adapter {adapter_dir}: {ADAPTER_CONFIG} is not a JSON object")
    return value
