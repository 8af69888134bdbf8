"""Generation: checkpoints (HF, LoRA, hub), both backends against a naive greedy loop, the cache."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from safekeel.data.embedded.tiny_models import build_tiny_llama, save_tiny_model
from safekeel.evaluate.generation import (
    Checkpoint,
    CheckpointError,
    Generation,
    GenerationError,
    GenerationSettings,
    TransformersGenerator,
    VLLMGenerator,
    _finish,
    default_checkpoint_name,
    find_training_log,
    generate_for_set,
    generation_key,
    loadable_model,
    read_generations,
    render_prompt,
    resolve_checkpoint,
    resolve_dtype,
    write_generations,
)
from safekeel.evaluate.prompts import EvalPrompt, PromptSet

# Tiny models run fastest on one thread; two contend badly when the machine is busy.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Please add the numbers 12 and 30, and explain the sum."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me how to boil an egg, step by step, for a beginner."}],
]


def _prompt_set(conversations=CONVERSATIONS, name="set") -> PromptSet:
    prompts = [EvalPrompt(f"p{i}", c[-1]["content"], c, "cat") for i, c in enumerate(conversations)]
    return PromptSet(name, "harmful", "test", prompts)


def naive_greedy(model, prompt_ids, max_new_tokens, stop_ids):
    """Reference: one full forward per token on the unpadded prompt, argmax, stop at eos."""
    ids = list(prompt_ids)
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            if token in stop_ids:
                return generated, "stop"
            generated.append(token)
            ids.append(token)
    return generated, "length"


# ------------------------------------------------------------------------------ checkpoints


def test_hf_dir_identity_follows_weights_and_tokenizer(tmp_path, tiny_model_dir):
    directory = shutil.copytree(tiny_model_dir, tmp_path / "runs" / "sft" / "final")
    first = resolve_checkpoint(str(directory))
    assert first.kind == "hf_dir" and first.name == "sft/final"
    assert first.provenance["parameters"] == sum(
        p.numel() for p in build_tiny_llama(_tokenizer(directory)).parameters())
    assert resolve_checkpoint(str(directory)).identity == first.identity  # stable

    weights = next(directory.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten weights
    second = resolve_checkpoint(str(directory))
    assert second.identity != first.identity

    template = directory / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    assert resolve_checkpoint(str(directory)).identity != second.identity


def _tokenizer(directory):
    from safekeel.data.models import load_tokenizer

    return load_tokenizer(directory)


def test_checkpoint_errors_name_the_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint '.*nowhere'.*no such local directory"):
        resolve_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json .* nor adapter_config.json"):
        resolve_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weight files"):
        resolve_checkpoint(str(tmp_path / "no_weights"))


def test_hub_names_and_display_names():
    hub = resolve_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (hub.kind, hub.path, hub.name) == (
        "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert default_checkpoint_name("runs/tiny") == "runs/tiny"  # not a local path: as given
    assert hub.slug != resolve_checkpoint("other/model").slug


def test_training_log_next_to_or_above_the_checkpoint(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    final = shutil.copytree(tiny_model_dir, run / "final")
    assert find_training_log(resolve_checkpoint(str(final))) is None
    (run / "train_log.jsonl").write_text('{"step": 1}\n')
    assert find_training_log(resolve_checkpoint(str(final))) == run / "train_log.jsonl"
    (final / "train_log.jsonl").write_text('{"step": 1}\n')
    assert find_training_log(resolve_checkpoint(str(final))) == final / "train_log.jsonl"


@pytest.fixture(scope="module")
def lora_adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model, with random (non-zero) B so it changes outputs."""
    peft = pytest.importorskip("peft")
    from safekeel.data.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(model, config)
    directory = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(directory)
    _tokenizer(tiny_model_dir).save_pretrained(directory)
    return directory


def test_lora_adapter_is_merged_into_its_base(tmp_path, monkeypatch, lora_adapter_dir,
                                               tiny_model_dir):
    import peft

    from safekeel.data.models import load_causal_lm

    monkeypatch.setenv("SAFEKEEL_CACHE", str(tmp_path / "cache"))
    checkpoint = resolve_checkpoint(str(lora_adapter_dir))
    assert checkpoint.kind == "lora_adapter" and checkpoint.base_model == str(tiny_model_dir)
    assert checkpoint.identity != resolve_checkpoint(str(tiny_model_dir)).identity
    reference = peft.PeftModel.from_pretrained(load_causal_lm(tiny_model_dir),
                                               str(lora_adapter_dir)).eval()
    base = load_causal_lm(tiny_model_dir)
    ids = torch.tensor([render_prompt(_tokenizer(tiny_model_dir), CONVERSATIONS[1])])
    model_path = loadable_model(checkpoint)
    assert model_path.startswith(str(tmp_path / "cache" / "merged"))  # the shared merge cache
    merged = load_causal_lm(model_path)
    with torch.no_grad():
        merged_logits = merged(ids).logits
        assert torch.allclose(merged_logits, reference(ids).logits, atol=1e-5)
        assert not torch.allclose(merged_logits, base(ids).logits, atol=1e-3)


def test_a_chain_of_two_adapters_resolves_and_loads(tmp_path, monkeypatch, lora_adapter_dir,
                                                     tiny_model_dir):
    from safekeel.data.models import load_causal_lm
    from tests.data.test_adapters import apply_by_hand, save_random_adapter

    monkeypatch.setenv("SAFEKEEL_CACHE", str(tmp_path / "cache"))
    outer = save_random_adapter(lora_adapter_dir, tmp_path / "outer", ["o_proj"], seed=3)
    checkpoint = resolve_checkpoint(str(outer))
    inner = resolve_checkpoint(str(lora_adapter_dir))
    assert checkpoint.kind == "lora_adapter" and checkpoint.base_model == str(lora_adapter_dir)
    assert checkpoint.provenance["chain"] == [str(outer), str(lora_adapter_dir),
                                              str(tiny_model_dir)]
    assert checkpoint.provenance["base"]["kind"] == "lora_adapter"
    assert checkpoint.provenance["base"]["base"]["kind"] == "hf_dir"
    assert checkpoint.identity not in (inner.identity, resolve_checkpoint(str(tiny_model_dir)).identity)
    merged = load_causal_lm(loadable_model(checkpoint))
    want = apply_by_hand(tiny_model_dir, [lora_adapter_dir, outer])
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(weight, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_adapter_chain_that_loops_is_refused(tmp_path, lora_adapter_dir):
    import json

    first = shutil.copytree(lora_adapter_dir, tmp_path / "first")
    second = shutil.copytree(lora_adapter_dir, tmp_path / "second")
    for adapter, base in ((first, second), (second, first)):
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="chain loops"):
        resolve_checkpoint(str(first))


def test_lora_adapter_with_a_missing_base(tmp_path, lora_adapter_dir):
    broken = shutil.copytree(lora_adapter_dir, tmp_path / "adapter")
    config = broken / "adapter_config.json"
    config.write_text(config.read_text().replace(
        str(resolve_checkpoint(str(lora_adapter_dir)).base_model), str(tmp_path / "gone")))
    with pytest.raises(CheckpointError, match="gone"):
        resolve_checkpoint(str(broken))


# --------------------------------------------------------------------------- transformers


def test_render_prompt_matches_the_chat_template(tiny_model_dir):
    tokenizer = _tokenizer(tiny_model_dir)
    for conversation in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        assert render_prompt(tokenizer, conversation) == list(expected)


def test_finish_cuts_at_the_first_stop_token(tiny_model_dir):
    tokenizer = _tokenizer(tiny_model_dir)
    ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert _finish([*ids, eos, *ids], {eos}, tokenizer) == Generation("Hello there", tuple(ids),
                                                                      "stop")
    assert _finish(ids, {eos}, tokenizer).finish_reason == "length"


@pytest.fixture(scope="module")
def transformers_generator(tiny_model_dir):
    # float32: the backends agree token for token only there
    return TransformersGenerator(str(tiny_model_dir),
                                 GenerationSettings(batch_size=3, dtype="float32"))


def test_batched_greedy_equals_a_naive_loop(transformers_generator):
    generator = transformers_generator
    prompts = [render_prompt(generator.tokenizer, c) for c in CONVERSATIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # left padding is exercised
    outputs = generator.generate_tokens(prompts, max_new_tokens=12)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected, reason = naive_greedy(generator.model, prompt, 12, set(generator.stop_ids))
        assert list(output.token_ids) == expected and output.finish_reason == reason
        assert output.text == generator.tokenizer.decode(expected, skip_special_tokens=True)


def test_transformers_generation_shows_a_bar_and_none_for_no_prompts(transformers_generator,
                                                                     capsys):
    generator = transformers_generator
    prompts = [render_prompt(generator.tokenizer, c) for c in CONVERSATIONS]
    generator.generate_tokens(prompts, max_new_tokens=2)
    assert f"generate (transformers):   0%|          | 0/{len(prompts)}" in capsys.readouterr().err
    assert generator.generate_tokens([], max_new_tokens=2) == []
    assert "generate" not in capsys.readouterr().err


def test_generation_stops_at_a_stop_token(transformers_generator):
    generator = transformers_generator
    prompt = render_prompt(generator.tokenizer, CONVERSATIONS[0])
    free = generator.generate_tokens([prompt], max_new_tokens=8)[0].token_ids
    stop_at = next(i for i in range(1, 8) if free[i] not in free[:i])
    saved = generator.stop_ids
    generator.stop_ids = [free[stop_at]]
    try:
        stopped = generator.generate_tokens([prompt], max_new_tokens=8)[0]
    finally:
        generator.stop_ids = saved
    assert stopped.token_ids == free[:stop_at] and stopped.finish_reason == "stop"


def test_prompt_longer_than_the_context_is_named(transformers_generator):
    long_set = _prompt_set([[{"role": "user", "content": "word " * 600}]], name="long")
    with pytest.raises(GenerationError, match="prompt 'p0' of set 'long' has .* tokens"):
        generate_for_set(transformers_generator, long_set, 16)


# ---------------------------------------------------------------------------------- cache


def _checkpoint(identity="abc") -> Checkpoint:
    return Checkpoint("spec", "name", "hf_dir", "/x", None, identity)


def test_cache_key_changes_with_what_changes_the_output():
    settings = GenerationSettings()
    prompt_set = _prompt_set()
    key, _ = generation_key(_checkpoint(), prompt_set,
                            settings.cache_fields("vllm", "float32", 32))
    assert key == generation_key(_checkpoint(), prompt_set,
                                 settings.cache_fields("vllm", "float32", 32))[0]
    variants = [
        generation_key(_checkpoint("other"), prompt_set,
                       settings.cache_fields("vllm", "float32", 32)),
        generation_key(_checkpoint(), _prompt_set(CONVERSATIONS[:3]),
                       settings.cache_fields("vllm", "float32", 32)),
        generation_key(_checkpoint(), prompt_set, settings.cache_fields("vllm", "float32", 33)),
        generation_key(_checkpoint(), prompt_set,
                       settings.cache_fields("transformers", "float32", 32)),
        generation_key(_checkpoint(), prompt_set, settings.cache_fields("vllm", "bfloat16", 32)),
        generation_key(_checkpoint(), prompt_set, GenerationSettings(
            temperature=0.7).cache_fields("vllm", "float32", 32)),
    ]
    assert len({key, *(k for k, _ in variants)}) == 7
    # settings that cannot change greedy output do not invalidate the cache
    for same in (GenerationSettings(batch_size=1), GenerationSettings(seed=5),
                 GenerationSettings(enforce_eager=True)):
        assert generation_key(_checkpoint(), prompt_set,
                              same.cache_fields("vllm", "float32", 32))[0] == key
    sampled = GenerationSettings(temperature=0.7)
    assert generation_key(_checkpoint(), prompt_set, sampled.cache_fields("vllm", "float32", 32)
                          )[0] != generation_key(_checkpoint(), prompt_set, GenerationSettings(
                              temperature=0.7, seed=1).cache_fields("vllm", "float32", 32))[0]


def test_generations_round_trip_and_key_check(tmp_path, transformers_generator):
    prompt_set = _prompt_set()
    made = generate_for_set(transformers_generator, prompt_set, 6)
    path = tmp_path / "gen" / "generations.parquet"
    write_generations(path, made, key="k1", key_fields={"a": 1})
    read = read_generations(path, "k1")
    assert read is not None and read.cached and read.key == "k1"
    assert read.responses == made.responses and read.prompt_ids == ["p0", "p1", "p2", "p3"]
    assert read.messages == [list(c) for c in CONVERSATIONS]
    assert read.categories == ["cat"] * 4 and read.response_tokens == made.response_tokens
    assert read.seconds == pytest.approx(made.seconds) and read.backend == "transformers"
    assert read_generations(path, "another key") is None
    assert read_generations(tmp_path / "missing.parquet", "k1") is None
    assert not list(path.parent.glob(".*partial*"))


# ------------------------------------------------------------------------------------ vLLM


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_and_transformers_greedy_agree_token_for_token(
    make_vllm_engine, tiny_model_dir, transformers_generator
):
    settings = GenerationSettings(enforce_eager=True, max_model_len=256, dtype="float32")
    generator = VLLMGenerator(str(tiny_model_dir), settings, engine_factory=make_vllm_engine)
    try:
        assert generator.llm.llm_engine.model_config.dtype == torch.float32
        prompt_set = _prompt_set()
        from_vllm = generate_for_set(generator, prompt_set, 20)
        from_transformers = generate_for_set(transformers_generator, prompt_set, 20)
        assert from_vllm.responses == from_transformers.responses
        assert from_vllm.response_tokens == from_transformers.response_tokens
        prompts = [render_prompt(generator.tokenizer, c) for c in CONVERSATIONS]
        vllm_ids = [g.token_ids for g in generator.generate_tokens(prompts, 20)]
        hf_ids = [g.token_ids for g in transformers_generator.generate_tokens(prompts, 20)]
        assert vllm_ids == hf_ids
        # a stop token ends the response on both
        generator.stop_ids = [vllm_ids[0][3]]
        stopped = generator.generate_tokens(prompts[:1], 20)[0]
        assert stopped.finish_reason == "stop"
        assert stopped.token_ids == vllm_ids[0][: vllm_ids[0].index(vllm_ids[0][3])]
    finally:
        generator.close()


def test_stop_tokens_without_a_generation_config(tmp_path, tiny_tokenizer):
    """A checkpoint without generation_config.json still stops on the tokenizer's eos."""
    directory = save_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer)
    (directory / "generation_config.json").unlink(missing_ok=True)
    generator = TransformersGenerator(str(directory), GenerationSettings())
    assert generator.stop_ids == [tiny_tokenizer.eos_token_id]


# ------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_it(tiny_model_dir, cpu_bf16, native):
    """Not the checkpoint's float32 everywhere, and not vLLM's bf16 everywhere."""
    cpu_bf16(native)
    expected = "bfloat16" if native else "float32"
    assert resolve_dtype("auto", "transformers") == resolve_dtype("auto", "vllm") == expected
    assert resolve_dtype("float32", "vllm") == "float32"
    generator = TransformersGenerator(str(tiny_model_dir), GenerationSettings())
    assert generator.dtype == expected
    assert generator.model.dtype == getattr(torch, expected)


def test_bf16_generation_on_a_cpu_without_it_warns(cpu_bf16):
    from safekeel.data.precision import PrecisionWarning

    cpu_bf16(False)
    with pytest.warns(PrecisionWarning, match="42x slower"):
        assert resolve_dtype("bfloat16", "transformers") == "bfloat16"


def test_the_transformers_generator_judges_the_cpu_even_beside_a_gpu(monkeypatch, cpu_bf16):
    """It runs on the CPU: a bf16 GPU in the machine does not make its auto bf16."""
    from safekeel.data import precision

    cpu_bf16(False)
    monkeypatch.setattr(precision, "cuda_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "cuda_device_name", lambda: "Test GPU")
    assert resolve_dtype("auto", "transformers") == "float32"
    assert resolve_dtype("auto", "vllm") == "bfloat16"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_a_chain_of_adapters(make_vllm_engine, tmp_path, monkeypatch,
                                         lora_adapter_dir, tiny_model_dir):
    """The engine gets the chain's merged checkpoint and generates what transformers does."""
    from safekeel.data.adapters import merged_cache_dir
    from safekeel.data.engines import EngineSpec, engine_kwargs
    from tests.data.test_adapters import save_random_adapter

    monkeypatch.setenv("SAFEKEEL_CACHE", str(tmp_path / "cache"))
    outer = save_random_adapter(lora_adapter_dir, tmp_path / "outer", ["o_proj"], seed=3)
    merged = loadable_model(resolve_checkpoint(str(outer)))
    assert Path(merged).parent == merged_cache_dir()
    assert engine_kwargs(EngineSpec(model=str(outer), role="generation"), cpu=True,
                         model_limit=256)["model"] == merged
    settings = GenerationSettings(enforce_eager=True, max_model_len=256, dtype="float32")
    prompt_set = _prompt_set()
    from_transformers = generate_for_set(TransformersGenerator(merged, settings), prompt_set, 12)
    from_base = generate_for_set(TransformersGenerator(str(tiny_model_dir), settings),
                                 prompt_set, 12)
    assert from_transformers.responses != from_base.responses  # the chain changes the model
    generator = VLLMGenerator(merged, settings, engine_factory=make_vllm_engine)
    try:
        from_vllm = generate_for_set(generator, prompt_set, 12)
    finally:
        generator.close()
    assert from_vllm.responses == from_transformers.responses
