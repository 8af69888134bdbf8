"""Safety Critic: hand-computed P(unsafe), batching, truncation, errors, vLLM = transformers.

The guard is a tiny random Llama: its scores are arbitrary but deterministic, so every
test compares the critic with an independent computation (a plain full forward and a
softmax over the two label logits) or with the other backend, never with stored numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import safekeel.data.guard.critic as critic_module
from safekeel.data.guard.critic import (
    BACKEND_AGREEMENT_ATOL,
    TRUNCATION_MARKER,
    CriticError,
    GuardSettings,
    SafetyCritic,
    TransformersCritic,
    VLLMCritic,
    make_critic,
    vllm_engine_kwargs,
)
from safekeel.data.guard.templates import (
    GuardTemplateError,
    get_guard_template,
    guard_prompt_ids,
    resolve_label_tokens,
)
from safekeel.data.shards import CRITIC_COLUMN, Provenance

# Labels right after the response: a random model's verdict then depends on each row's own
# last tokens, so the scores differ from row to row.
GENERIC_OPTIONS = {
    "response_template": "Is the answer unsafe? Question: {prompt} Answer: {response}",
    "labels": ["unsafe", "safe"],
    "label_prefix": " ",
}
TEMPLATES = {"generic": GENERIC_OPTIONS, "llama_guard_3": {}}


def chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """A conversation from alternating user / assistant texts."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


CONVERSATIONS = [
    chat("What is the capital of France?", "The capital of France is Paris."),
    chat("How do I boil an egg?", "Put the egg in boiling water for nine minutes"),
    chat("Tell me how to hurt someone.", "I'm sorry, but I cannot help with that request"),
    chat("Write a poem about the sea", "The sea is grey, the sea is wide!"),
    chat("Hi", "Good morning! How can I help you today?", "Add 12 and 30.", "The sum is 42",
         system="You are helpful."),
    chat("Name three colours.", "Red, green and blue"),
]
# ~1,800 guard tokens: longer than the guard's 1,024-token context.
LONG_RESPONSE = "The train leaves the station at nine. " * 150 + "It arrives at noon."
LONG_CONVERSATION = chat("Describe the trip.", LONG_RESPONSE)


def guard_settings(model_dir, template: str = "generic", **overrides) -> GuardSettings:
    values = {
        "model": str(model_dir),
        "template": template,
        "template_options": dict(TEMPLATES.get(template, {})),
        "dtype": "float32",
        "batch_size": 4,
        "progress": False,
    }
    values.update(overrides)
    return GuardSettings(**values)


@pytest.fixture(scope="module")
def guard(tiny_guard_dir):
    """The tiny guard as a plain transformers model and tokenizer, for hand computations."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_guard_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_guard_dir, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def transformers_critics(tiny_guard_dir, guard):
    """One transformers critic per template; "generic" is built from the saved directory."""
    model, tokenizer = guard
    critics = {
        "generic": make_critic(guard_settings(tiny_guard_dir, backend="transformers")),
        "llama_guard_3": TransformersCritic(
            guard_settings(tiny_guard_dir, "llama_guard_3", backend="transformers"),
            model=model, tokenizer=tokenizer,
        ),
    }
    yield critics
    for critic in critics.values():
        critic.close()


def hand_p_unsafe(model, tokenizer, template_name: str, conversation) -> tuple[float, float]:
    """(P(unsafe), label mass) from one plain full forward: softmax over the two label logits."""
    template = get_guard_template(template_name, **TEMPLATES[template_name])
    labels = resolve_label_tokens(tokenizer, template)
    ids = guard_prompt_ids(tokenizer, template.render(conversation, "response"), labels)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    pair = torch.softmax(logits[[labels.unsafe_id, labels.safe_id]], dim=0)
    full = torch.softmax(logits, dim=0)
    return pair[0].item(), (full[labels.unsafe_id] + full[labels.safe_id]).item()


# --------------------------------------------------------------------------------------
# Transformers backend (the reference)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("template_name", ["generic", "llama_guard_3"])
def test_p_unsafe_equals_softmax_over_the_two_label_logits(
    transformers_critics, guard, template_name
):
    model, tokenizer = guard
    result = transformers_critics[template_name].score(CONVERSATIONS)
    expected = [hand_p_unsafe(model, tokenizer, template_name, c) for c in CONVERSATIONS]

    assert result.p_unsafe.dtype == np.float32 and result.p_unsafe.shape == (len(CONVERSATIONS),)
    np.testing.assert_allclose(result.p_unsafe, [p for p, _ in expected], rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.label_mass, [m for _, m in expected], rtol=1e-4)
    assert ((result.p_unsafe >= 0) & (result.p_unsafe <= 1)).all()
    # The scores must differ between rows, or the comparison above proves little.
    assert result.p_unsafe.max() - result.p_unsafe.min() > 0.3
    assert result.truncated == 0 and result.rows == len(CONVERSATIONS)
    assert result.prompt_tokens > 0 and result.rows_per_second > 0


def test_llama_guard_reads_the_verdict_after_the_blank_line(transformers_critics, guard):
    # Llama Guard 3 writes "\n\n" before its verdict: those tokens must be prefilled, and
    # "unsafe" / "safe" split into several tokens here, so the first differing one is read.
    _, tokenizer = guard
    critic = transformers_critics["llama_guard_3"]
    assert critic.label_tokens.prefix_ids, "the blank line is part of the prefill"
    ids = critic.prompts.build(CONVERSATIONS[:1], ["row"]).token_ids[0]
    assert tokenizer.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode([critic.label_tokens.unsafe_id]) != tokenizer.decode(
        [critic.label_tokens.safe_id]
    )


def test_prompt_ids_are_the_guard_prompt_ids(transformers_critics, guard):
    # The builder encodes in one batched call; it must give what guard_prompt_ids gives.
    _, tokenizer = guard
    critic = transformers_critics["llama_guard_3"]
    built = critic.prompts.build(CONVERSATIONS, [str(i) for i in range(len(CONVERSATIONS))])
    for conversation, ids in zip(CONVERSATIONS, built.token_ids, strict=True):
        text = critic.template.render(conversation, "response")
        assert ids == guard_prompt_ids(tokenizer, text, critic.label_tokens)


def test_batch_size_does_not_change_scores(tiny_guard_dir, guard):
    model, tokenizer = guard
    conversations = CONVERSATIONS + [LONG_CONVERSATION]  # rows of very different lengths
    scores = {}
    for batch_size in (1, 3, len(conversations)):
        settings = guard_settings(tiny_guard_dir, "llama_guard_3", batch_size=batch_size)
        critic = TransformersCritic(settings, model=model, tokenizer=tokenizer)
        scores[batch_size] = critic.score(conversations).p_unsafe
    np.testing.assert_allclose(scores[3], scores[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(scores[len(conversations)], scores[1], rtol=0, atol=1e-6)


def test_over_long_conversation_is_cut_in_its_middle_and_counted(tiny_guard_dir, guard):
    model, tokenizer = guard
    settings = guard_settings(tiny_guard_dir, max_model_len=96)
    critic = TransformersCritic(settings, model=model, tokenizer=tokenizer)
    conversations = [CONVERSATIONS[0], LONG_CONVERSATION]

    result = critic.score(conversations)
    assert result.truncated == 1 and result.truncated_rows == [1]
    assert np.isfinite(result.p_unsafe).all()
    assert ((result.p_unsafe >= 0) & (result.p_unsafe <= 1)).all()

    built = critic.prompts.build(conversations, ["short", "long"])
    short_ids, long_ids = built.token_ids
    assert short_ids == guard_prompt_ids(
        tokenizer, critic.template.render(CONVERSATIONS[0], "response"), critic.label_tokens
    )
    # One token of the context stays free for the verdict the engine produces.
    assert len(long_ids) <= 95
    text = tokenizer.decode(long_ids)
    # The template and the (short) question are whole; the response keeps its start and end.
    assert text.startswith("Is the answer unsafe? Question: Describe the trip. Answer: The train")
    assert text.endswith("It arrives at noon.")
    assert text.count(TRUNCATION_MARKER.strip()) == 1
    # Scoring the truncated row = scoring its cut text by hand.
    with torch.no_grad():
        logits = model(torch.tensor([long_ids])).logits[0, -1]
    pair = torch.softmax(logits[[critic.label_tokens.unsafe_id, critic.label_tokens.safe_id]], 0)
    assert result.p_unsafe[1] == pytest.approx(pair[0].item(), abs=1e-5)


def test_truncation_keeps_the_llama_guard_instructions_and_other_turns(tiny_guard_dir, guard):
    model, tokenizer = guard
    settings = guard_settings(tiny_guard_dir, "llama_guard_3", max_model_len=700)
    critic = TransformersCritic(settings, model=model, tokenizer=tokenizer)
    conversation = chat("A long question: " + "tell me about the river. " * 120,
                        "The river flows through the valley.")
    built = critic.prompts.build([conversation], ["row"])
    (ids,) = built.token_ids
    assert built.truncated_rows == [0] and len(ids) <= 699
    text = tokenizer.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|> Task:")
    assert "Agent: The river flows through the valley.\n\n<END CONVERSATION>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert TRUNCATION_MARKER in text


def test_prompt_mode_ignores_the_response(tiny_guard_dir, guard):
    model, tokenizer = guard
    settings = guard_settings(tiny_guard_dir, "llama_guard_3", mode="prompt")
    critic = TransformersCritic(settings, model=model, tokenizer=tokenizer)
    questions = [c[:-1] for c in CONVERSATIONS]  # the same conversations without the response
    with_response = critic.score(CONVERSATIONS).p_unsafe
    np.testing.assert_allclose(with_response, critic.score(questions).p_unsafe, atol=1e-6)
    # ... and differs from judging the response.
    response_mode = TransformersCritic(
        guard_settings(tiny_guard_dir, "llama_guard_3"), model=model, tokenizer=tokenizer
    ).score(CONVERSATIONS).p_unsafe
    assert np.abs(with_response - response_mode).max() > 0.01


def test_annotate_and_provenance_fit_the_annotate_driver(transformers_critics):
    critic = transformers_critics["generic"]
    examples = [{"id": f"ex-{i}", "messages": c} for i, c in enumerate(CONVERSATIONS[:3])]
    columns = critic.annotate(examples)
    assert list(columns) == [CRITIC_COLUMN] == list(critic.columns)
    np.testing.assert_allclose(columns[CRITIC_COLUMN], critic.score(CONVERSATIONS[:3]).p_unsafe)
    provenance = critic.provenance()
    assert set(provenance) <= {f.name for f in dataclasses.fields(Provenance)}
    assert provenance["critic_model"] == critic.settings.model
    assert provenance["critic_template"].startswith("generic mode=response")
    assert isinstance(critic, SafetyCritic)


def test_empty_input_gives_an_empty_result(transformers_critics):
    result = transformers_critics["generic"].score([])
    assert result.rows == 0 and result.p_unsafe.dtype == np.float32 and result.truncated == 0


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_unknown_template_name_is_named(tiny_guard_dir):
    settings = guard_settings(tiny_guard_dir, "llama_guard_9", backend="transformers")
    with pytest.raises(CriticError, match=r"unknown guard template 'llama_guard_9'.*allowed"):
        make_critic(settings)


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word tokenizer with an unknown token and no word 'unsafe' or 'safe'."""
    vocab = {"[UNK]": 0, "Is": 1, "the": 2, "answer": 3, "Question:": 4, "Answer:": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_label_the_guard_tokenizer_cannot_write_is_named(tiny_guard_dir):
    settings = guard_settings(tiny_guard_dir, backend="transformers")
    with pytest.raises(CriticError, match=r"label 'unsafe'.*unknown token") as info:
        TransformersCritic(settings, tokenizer=word_level_tokenizer())
    assert str(tiny_guard_dir) in str(info.value)  # names the guard


def test_labels_no_token_tells_apart_are_named(tiny_guard_dir, guard):
    _, tokenizer = guard
    options = {**GENERIC_OPTIONS, "labels": ["safe!", "safe"]}
    settings = guard_settings(tiny_guard_dir, template_options=options)
    with pytest.raises(CriticError, match="never differ"):
        TransformersCritic(settings, tokenizer=tokenizer)


def test_empty_prompt_names_the_row(transformers_critics):
    conversations = [CONVERSATIONS[0], chat("   ", "Paris.")]
    with pytest.raises(GuardTemplateError, match=r"row-7: messages\[0\].content .* empty"):
        transformers_critics["generic"].score(conversations, sources=["row-6", "row-7"])
    with pytest.raises(GuardTemplateError, match="conversation 1: "):
        transformers_critics["generic"].score(conversations)


def test_context_too_small_for_the_template_fails_at_start(tiny_guard_dir, guard):
    model, tokenizer = guard
    settings = guard_settings(tiny_guard_dir, "llama_guard_3", max_model_len=64)
    with pytest.raises(CriticError, match=r"template alone needs \d+ tokens.*max_model_len=64"):
        TransformersCritic(settings, model=model, tokenizer=tokenizer)


def test_context_longer_than_the_model_is_refused(tiny_guard_dir, guard):
    model, tokenizer = guard
    settings = guard_settings(tiny_guard_dir, max_model_len=4096)
    with pytest.raises(CriticError, match="max_position_embeddings=1024"):
        TransformersCritic(settings, model=model, tokenizer=tokenizer)


def test_mode_the_template_cannot_render_is_refused(tiny_guard_dir, guard):
    _, tokenizer = guard
    settings = guard_settings(tiny_guard_dir, mode="prompt")  # generic: response template only
    with pytest.raises(CriticError, match=r"mode 'prompt' is not supported"):
        TransformersCritic(settings, tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("field", "value"),
    [("backend", "tpu"), ("batch_size", 0), ("mode", "both"), ("dtype", "int8"),
     ("max_model_len", 1), ("gpu_memory_utilization", 1.5), ("model", "")],
)
def test_bad_settings_are_named(tiny_guard_dir, field, value):
    settings = guard_settings(tiny_guard_dir, **{field: value})
    with pytest.raises(CriticError, match=f"critic setting '{field}'"):
        make_critic(settings)


def test_sources_must_match_the_conversations(transformers_critics):
    with pytest.raises(CriticError, match="one name per conversation"):
        transformers_critics["generic"].score(CONVERSATIONS[:2], sources=["only-one"])


def test_closed_critic_refuses_to_score(tiny_guard_dir, guard):
    model, tokenizer = guard
    critic = TransformersCritic(guard_settings(tiny_guard_dir), model=model, tokenizer=tokenizer)
    with critic:
        critic.score(CONVERSATIONS[:1])
    with pytest.raises(CriticError, match="after close"):
        critic.score(CONVERSATIONS[:1])


def test_auto_backend_falls_back_to_transformers_without_vllm(tiny_guard_dir, monkeypatch):
    monkeypatch.setattr(critic_module, "vllm_available", lambda: False)
    critic = make_critic(guard_settings(tiny_guard_dir, backend="auto"))
    assert isinstance(critic, TransformersCritic)
    critic.close()
    with pytest.raises(CriticError, match=r"vllm is not installed: pip install"):
        make_critic(guard_settings(tiny_guard_dir, backend="vllm"))


# --------------------------------------------------------------------------------------
# vLLM backend
# --------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_engine_arguments_pass_through(tiny_guard_dir):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    settings = guard_settings(
        tiny_guard_dir, tensor_parallel_size=2, enable_prefix_caching=True, block_size=32,
        max_model_len=512, revision="abc123",
    )
    kwargs = vllm_engine_kwargs(settings)
    assert kwargs["model"] == str(tiny_guard_dir)
    assert (kwargs["tensor_parallel_size"], kwargs["data_parallel_size"]) == (2, 1)
    assert (kwargs["enable_prefix_caching"], kwargs["block_size"]) == (True, 32)
    assert (kwargs["max_model_len"], kwargs["revision"], kwargs["dtype"]) == (512, "abc123",
                                                                              "float32")
    assert kwargs["trust_remote_code"] is False
    assert kwargs["gpu_memory_utilization"] == (0.25 if current_platform.is_cpu() else 0.9)
    assert "distributed_executor_backend" not in kwargs  # None: vLLM's own choice

    launched = guard_settings(tiny_guard_dir, data_parallel_size=2,
                              distributed_executor_backend="external_launcher")
    assert vllm_engine_kwargs(launched)["data_parallel_size"] == 2
    with pytest.raises(CriticError, match="data_parallel_size=2.*num_workers"):
        vllm_engine_kwargs(guard_settings(tiny_guard_dir, data_parallel_size=2))


@pytest.fixture(scope="module")
def vllm_critic(make_vllm_engine, tiny_guard_dir):
    """A vLLM critic that starts its own in-process engine, set up as STAR would use it.

    `make_vllm_engine` (tests/conftest.py) is requested for its in-process environment and
    its clean-up after the module; the engine itself is built by `make_critic`.
    """
    settings = guard_settings(
        tiny_guard_dir,
        backend="vllm",
        max_model_len=1024,
        enable_prefix_caching=True,
        block_size=32,
        enforce_eager=True,
        distributed_executor_backend="uni",
        gpu_memory_utilization=0.1,
    )
    critic = make_critic(settings)
    yield critic
    critic.close()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("template_name", ["generic", "llama_guard_3"])
def test_vllm_matches_transformers(vllm_critic, transformers_critics, guard, template_name):
    _, tokenizer = guard
    if template_name == "generic":
        critic = vllm_critic
    else:  # a second critic on the same engine
        settings = dataclasses.replace(
            vllm_critic.settings, template=template_name, template_options={}
        )
        critic = VLLMCritic(settings, llm=vllm_critic.llm, tokenizer=tokenizer)
    assert isinstance(critic, VLLMCritic)
    conversations = CONVERSATIONS + [LONG_CONVERSATION]

    got = critic.score(conversations)
    want = transformers_critics[template_name].score(conversations)

    assert got.truncated_rows == want.truncated_rows == [len(CONVERSATIONS)]
    np.testing.assert_allclose(got.p_unsafe, want.p_unsafe, rtol=0, atol=BACKEND_AGREEMENT_ATOL)
    np.testing.assert_allclose(got.label_mass, want.label_mass, rtol=1e-4)
    assert got.p_unsafe.max() - got.p_unsafe.min() > 0.3
    assert got.rows_per_second > 0


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_batch_size_does_not_change_scores(vllm_critic, guard):
    _, tokenizer = guard
    one_by_one = VLLMCritic(
        dataclasses.replace(vllm_critic.settings, batch_size=1),
        llm=vllm_critic.llm, tokenizer=tokenizer,
    )
    np.testing.assert_allclose(
        one_by_one.score(CONVERSATIONS).p_unsafe, vllm_critic.score(CONVERSATIONS).p_unsafe,
        rtol=0, atol=1e-6,
    )
    one_by_one.close()
    # Closing a critic that shares an engine leaves the engine running.
    assert vllm_critic.score(CONVERSATIONS[:1]).rows == 1


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_prefix_cached_response_prefixes_match_transformers(
    vllm_critic, transformers_critics
):
    # STAR's use: k prefixes of one response share their guard-prompt prefix, which the
    # engine serves from its prefix cache (block 32) after the first one; a second pass
    # is served almost wholly from the cache. Scores must not change either way.
    response = ("Sure, here is a simple plan for your week: rest on Monday, study on Tuesday, "
                "walk on Friday, and read a book to the class every Friday afternoon.")
    words = response.split()
    question = "Please plan my week. " * 8  # a guard prompt of several cache blocks
    prefixes = [chat(question, " ".join(words[:k])) for k in range(2, len(words) + 1, 3)]

    first = vllm_critic.score(prefixes).p_unsafe
    second = vllm_critic.score(prefixes).p_unsafe
    reference = transformers_critics["generic"].score(prefixes).p_unsafe
    np.testing.assert_allclose(second, first, rtol=0, atol=1e-6)
    np.testing.assert_allclose(first, reference, rtol=0, atol=BACKEND_AGREEMENT_ATOL)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_without_logprob_token_ids_falls_back_to_processed_logprobs(
    make_vllm_engine, vllm_critic, transformers_critics, monkeypatch
):
    # For vLLM releases without SamplingParams.logprob_token_ids: sampling restricted to the
    # two labels, engine option logprobs_mode="processed_logprobs". The second engine is
    # left to the fixture to shut down after the module: shutting down one in-process
    # engine tears down vLLM's process-wide parallel state and breaks the other.
    monkeypatch.setattr(critic_module, "vllm_supports_logprob_token_ids", lambda: False)
    settings = dataclasses.replace(vllm_critic.settings, enable_prefix_caching=None,
                                   block_size=None)
    kwargs = vllm_engine_kwargs(settings)
    assert kwargs["logprobs_mode"] == "processed_logprobs"
    engine = make_vllm_engine(kwargs.pop("model"), **kwargs)
    fallback = VLLMCritic(settings, llm=engine, tokenizer=vllm_critic.tokenizer)

    got = fallback.score(CONVERSATIONS)
    want = transformers_critics["generic"].score(CONVERSATIONS)
    np.testing.assert_allclose(got.p_unsafe, want.p_unsafe, rtol=0, atol=BACKEND_AGREEMENT_ATOL)
    assert np.isnan(got.label_mass).all()  # renormalised logprobs say nothing about the mass


# --------------------------------------------------------------------------------------
# Precision: auto is bf16 only where native, on both backends
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_transformers_guard_auto_dtype_follows_the_cpu(tiny_guard_dir, cpu_bf16, native):
    """The float32 guard stays float32 on a CPU that only emulates bf16."""
    cpu_bf16(native)
    settings = guard_settings(tiny_guard_dir, backend="transformers", dtype="auto",
                              device="cpu")
    critic = make_critic(settings)
    try:
        assert critic.model.dtype == (torch.bfloat16 if native else torch.float32)
    finally:
        critic.close()


def test_transformers_guard_in_bf16_on_a_cpu_without_it_warns(tiny_guard_dir, cpu_bf16):
    from safekeel.data.precision import PrecisionWarning

    cpu_bf16(False)
    settings = guard_settings(tiny_guard_dir, backend="transformers", dtype="bfloat16",
                              device="cpu")
    with pytest.warns(PrecisionWarning, match="42x slower"):
        critic = make_critic(settings)
    assert critic.model.dtype == torch.bfloat16
    critic.close()


@pytest.mark.vllm
@pytest.mark.parametrize("native", [True, False])
def test_vllm_guard_auto_dtype_follows_the_cpu(tiny_guard_dir, cpu_bf16, monkeypatch, native):
    """vLLM's own auto would run the float32 guard in bf16 even where bf16 is emulated."""
    pytest.importorskip("vllm")
    from safekeel.data import engines
    from safekeel.data.precision import PrecisionWarning

    monkeypatch.setattr(engines, "on_cpu", lambda: True)
    cpu_bf16(native)
    for star in (False, True):
        kwargs = vllm_engine_kwargs(guard_settings(tiny_guard_dir, dtype="auto"), star=star)
        assert kwargs["dtype"] == ("bfloat16" if native else "float32")
    if not native:
        with pytest.warns(PrecisionWarning, match="42x slower"):
            vllm_engine_kwargs(guard_settings(tiny_guard_dir, dtype="bfloat16"))
