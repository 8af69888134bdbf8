"""LoRA adapters as models: chains merged by hand and by data.adapters, the cache, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safekeel.data import adapters
from safekeel.data.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGE_RECORD,
    AdapterError,
    base_reference,
    merged_cache_dir,
)
from safekeel.data.models import (
    SMOLLM2_ALIAS,
    MissingPackageError,
    ModelNotFoundError,
    load_causal_lm,
    locate_model,
    resolve_model_path,
)

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def save_random_adapter(base: str | Path, out: Path, targets: list[str], *, seed: int,
                        dtype: torch.dtype | None = None) -> Path:
    """A LoRA adapter with random A and B (so it changes the model) on `base`, which may
    itself be an adapter; its config names `base` as given."""
    model = load_causal_lm(base)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = peft.get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    if dtype is not None:
        cast_adapter(out, dtype)
    return Path(out)


def cast_adapter(adapter: Path, dtype: torch.dtype) -> None:
    weights = load_file(str(adapter / ADAPTER_WEIGHTS))
    save_file({k: v.to(dtype) for k, v in weights.items()}, str(adapter / ADAPTER_WEIGHTS))


def apply_by_hand(base: Path, chain: list[Path]) -> dict[str, torch.Tensor]:
    """Base weights plus (alpha / r) B @ A of each adapter, innermost (first) to outermost."""
    weights = {k: v.float() for k, v in load_file(str(Path(base) / "model.safetensors")).items()}
    for adapter in chain:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
        scale = config["lora_alpha"] / config["r"]
        lora = {k: v.float() for k, v in load_file(str(adapter / ADAPTER_WEIGHTS)).items()}
        for key, a in lora.items():
            if ".lora_A." in key:
                b = lora[key.replace(".lora_A.", ".lora_B.")]
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                weights[name] = weights[name] + scale * b @ a
    return weights


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SAFEKEEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def chain(tmp_path, tiny_model_dir, cache) -> tuple[Path, Path]:
    """(inner, outer): inner on the tiny model, outer on inner."""
    inner = save_random_adapter(tiny_model_dir, tmp_path / "inner", ["q_proj", "v_proj"], seed=1)
    outer = save_random_adapter(inner, tmp_path / "outer", ["v_proj", "down_proj"], seed=2)
    return inner, outer


def test_a_chain_of_two_adapters_merges_like_applying_both_by_hand(chain, tiny_model_dir,
                                                                    cache):
    inner, outer = chain
    merged = Path(resolve_model_path(outer))
    assert merged.parent == cache / "merged" == merged_cache_dir()
    got = load_file(str(merged / "model.safetensors"))
    want = apply_by_hand(tiny_model_dir, [inner, outer])
    assert got.keys() == want.keys()
    moved = 0
    for name, weight in want.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(weight, load_file(str(tiny_model_dir / "model.safetensors"))[name])
    assert moved == 2 * 3  # 2 layers x q, v, down (v touched by both)
    record = json.loads((merged / MERGE_RECORD).read_text())
    assert record["chain"] == [str(outer), str(inner)] and record["base"] == str(tiny_model_dir)
    # an adapter alone is one step of the chain
    only_inner = load_file(str(Path(resolve_model_path(inner)) / "model.safetensors"))
    for name, weight in apply_by_hand(tiny_model_dir, [inner]).items():
        torch.testing.assert_close(only_inner[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    # the loaders take the adapter directory itself
    model = load_causal_lm(outer)
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                               want["model.layers.1.mlp.down_proj.weight"])


def test_tokenizer_comes_from_the_outermost_adapter_that_has_one(chain, tiny_model_dir,
                                                                 tiny_tokenizer):
    import copy

    from transformers import AutoTokenizer

    inner, outer = chain
    plain = AutoTokenizer.from_pretrained(resolve_model_path(outer))
    assert plain.chat_template == tiny_tokenizer.chat_template  # none in the chain: the base's
    own = copy.deepcopy(tiny_tokenizer)
    own.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    own.save_pretrained(inner)
    assert AutoTokenizer.from_pretrained(resolve_model_path(inner)).chat_template == own.chat_template
    assert AutoTokenizer.from_pretrained(resolve_model_path(outer)).chat_template == own.chat_template


def test_the_base_dtype_is_kept(tmp_path, tiny_model_dir, cache):
    base = tmp_path / "bf16-base"
    load_causal_lm(tiny_model_dir, dtype="bfloat16").save_pretrained(base)
    shutil.copy(tiny_model_dir / "tokenizer.json", base)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", base)
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter", ["q_proj"], seed=1)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))
    merged = load_file(str(Path(resolve_model_path(adapter)) / "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    # merged in float32, rounded once at the end
    want = apply_by_hand(base, [adapter])
    for name, weight in want.items():
        assert torch.equal(merged[name], weight.to(torch.bfloat16)), name


def test_a_bfloat16_adapter_merges_like_the_float32_one_up_to_its_rounding(
        tmp_path, tiny_model_dir, cache):
    full = save_random_adapter(tiny_model_dir, tmp_path / "f32", ["q_proj", "o_proj"], seed=4)
    half = shutil.copytree(full, tmp_path / "bf16")
    cast_adapter(half, torch.bfloat16)
    from_half = load_file(str(Path(resolve_model_path(half)) / "model.safetensors"))
    from_full = load_file(str(Path(resolve_model_path(full)) / "model.safetensors"))
    assert {t.dtype for t in from_half.values()} == {torch.float32}  # the base's dtype
    # exactly the float32 merge of the rounded adapter weights
    for name, weight in apply_by_hand(tiny_model_dir, [half]).items():
        torch.testing.assert_close(from_half[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    differs = [n for n in from_full if not torch.equal(from_full[n], from_half[n])]
    assert differs  # the rounding is visible, and small
    for name in differs:
        torch.testing.assert_close(from_half[name], from_full[name], rtol=0, atol=2e-2)


def test_a_second_resolve_reuses_the_merge(chain, monkeypatch):
    inner, outer = chain
    first = resolve_model_path(outer)
    stamp = (Path(first) / "model.safetensors").stat().st_mtime_ns

    def no_merge(*args, **kwargs):
        raise AssertionError("merged again")

    monkeypatch.setattr(adapters, "_merge_into", no_merge)
    assert resolve_model_path(outer) == first
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == stamp
    # a changed adapter anywhere in the chain is a new merge
    cast_adapter(inner, torch.bfloat16)
    with pytest.raises(AssertionError, match="merged again"):
        resolve_model_path(outer)


def test_an_interrupted_merge_leaves_nothing_that_is_trusted(chain, monkeypatch):
    _, outer = chain
    real = adapters._merge_into

    def crash_after_writing(chain, out_dir):
        real(chain, out_dir)  # everything written, then the process "dies"
        raise KeyboardInterrupt

    before = sorted(merged_cache_dir().iterdir())  # the inner adapter's, made by the fixture
    monkeypatch.setattr(adapters, "_merge_into", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path(outer)
    assert sorted(merged_cache_dir().iterdir()) == before  # no final dir, no staging left
    monkeypatch.setattr(adapters, "_merge_into", real)
    merged = Path(resolve_model_path(outer))
    # a directory under the final name without the record (not ours) is refused, not used
    (merged / MERGE_RECORD).unlink()
    with pytest.raises(AdapterError, match="incomplete .* delete the directory"):
        resolve_model_path(outer)


def test_bad_chains_are_named_in_one_line(tmp_path, chain, monkeypatch):
    inner, outer = chain

    def rebase(adapter: Path, base: str) -> None:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base
        (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))

    real_find_spec = importlib.util.find_spec
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
        with pytest.raises(MissingPackageError,
                           match=r"needs peft: pip install 'safekeel\[peft\]'"):
            resolve_model_path(outer)

    rebase(inner, str(tmp_path / "gone"))
    with pytest.raises(AdapterError, match=f"LoRA adapter {inner}: its base cannot be found.*gone"):
        resolve_model_path(outer)
    rebase(inner, str(outer))
    with pytest.raises(AdapterError, match="chain loops") as error:
        resolve_model_path(outer)
    assert "\n" not in str(error.value)
    (inner / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(AdapterError, match="names no base_model_name_or_path"):
        resolve_model_path(inner)
    pickled = shutil.copytree(outer, tmp_path / "pickled")
    (pickled / ADAPTER_WEIGHTS).rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        resolve_model_path(pickled)
    assert isinstance(AdapterError("x"), ModelNotFoundError)  # callers' handlers catch it


def test_locate_model_does_not_merge(chain, cache):
    _, outer = chain
    before = sorted(merged_cache_dir().iterdir())
    assert locate_model(outer) == str(outer)
    assert sorted(merged_cache_dir().iterdir()) == before


def test_base_reference_keeps_the_alias_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert base_reference(SMOLLM2_ALIAS) == SMOLLM2_ALIAS
    assert base_reference("local") == str(tmp_path / "local")
    assert base_reference("owner/name") == "owner/name"


def test_fingerprints_tell_adapters_apart_and_ignore_where_they_are(tmp_path, chain,
                                                                    tiny_model_dir):
    from safekeel.annotate.activations import fingerprint_transformers_model

    inner, outer = chain
    moved = shutil.copytree(inner, tmp_path / "moved")

    def fingerprint(name):
        return fingerprint_transformers_model(load_causal_lm(name), name=str(name))

    base, first, again, second = map(fingerprint, (tiny_model_dir, inner, moved, outer))
    assert base.adapters_sha256 is None
    assert base.embedding_sha256 == first.embedding_sha256  # LoRA leaves the embeddings
    assert first.mismatch(again) is None and first.adapters_sha256 == again.adapters_sha256
    for one, other in ((base, first), (first, second), (second, base)):
        assert "adapters_sha256" in (one.mismatch(other) or "")
    # a fingerprint stored before the field existed still matches a plain model
    old = {k: v for k, v in base.to_dict().items() if k != "adapters_sha256"}
    assert type(base).from_dict(old).mismatch(base) is None


def test_critic_loads_an_adapter_on_the_guard(tmp_path, tiny_guard_dir, cache):
    from safekeel.data.guard.critic import TransformersCritic
    from tests.data.test_critic import guard_settings

    adapter = save_random_adapter(tiny_guard_dir, tmp_path / "guard-adapter", ["q_proj", "o_proj"],
                                  seed=5)
    conversations = [[{"role": "user", "content": "How do I bake bread?"},
                      {"role": "assistant", "content": "Mix flour, water and yeast."}]]
    tuned = TransformersCritic(guard_settings(adapter, backend="transformers"))
    plain = TransformersCritic(guard_settings(tiny_guard_dir, backend="transformers"))
    want = apply_by_hand(tiny_guard_dir, [adapter])
    for name, weight in want.items():
        torch.testing.assert_close(tuned.model.state_dict()[name], weight, msg=name)
    tuned_p, plain_p = (c.score(conversations).p_unsafe for c in (tuned, plain))
    assert abs(float(tuned_p[0]) - float(plain_p[0])) > 1e-4
    assert os.fspath(tuned.settings.model) == str(adapter)  # provenance names the adapter


def test_published_stacked_adapters_load_wherever_they_are_copied(chain, tiny_model_dir,
                                                                  tmp_path, cache):
    from safekeel.recipe_results import publish_adapters

    inner, outer = chain
    copies = publish_adapters({"reference": inner, "method": outer}, tmp_path / "published")
    config = json.loads((copies["method"] / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "../reference"
    # the whole folder moved elsewhere and the originals gone: the chain still loads
    moved = tmp_path / "elsewhere" / "adapters"
    shutil.copytree(tmp_path / "published", moved)
    want = apply_by_hand(tiny_model_dir, [inner, outer])
    shutil.rmtree(tmp_path / "published")
    shutil.rmtree(inner)
    got = load_file(str(Path(resolve_model_path(moved / "method")) / "model.safetensors"))
    for name, weight in want.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-5, atol=1e-6, msg=name)
