"""Activation extraction: hooks vs `output_hidden_states`, pooling, layers, prompts, vLLM."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from safekeel.annotate.activations import (
    ActivationError,
    ActivationSpec,
    TransformersActivationExtractor,
    VLLMActivationExtractor,
    capture_layer_outputs,
    fingerprint_transformers_model,
    pool_tokens,
    prompt_messages,
    prompt_token_ids,
)
from safekeel.data.embedded.tiny_models import build_tiny_llama, save_tiny_model
from safekeel.data.engines import EngineSpec, engine_kwargs

NUM_LAYERS = 3
TEXTS = [
    "What is the capital of France?",
    "hi",
    "Please add the numbers 12 and 30, then tell me how you did it.",
    "Describe a cat in two words.",
    "hi",  # a repeated prompt must get its own (identical) row
    "Tell me how to boil an egg.",
]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_llama(tiny_tokenizer, num_layers=NUM_LAYERS, seed=3)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    return [
        prompt_token_ids(tiny_tokenizer, [{"role": "user", "content": t}]) for t in TEXTS
    ]


def reference_states(model, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """`output_hidden_states` of one unpadded prompt: [embeddings, layer 0, ..., final norm]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


# --------------------------------------------------------------------------- hooks


def test_hook_output_is_hidden_state_after_the_layer(model, prompts):
    ids = torch.tensor([prompts[0]])
    mask = torch.ones_like(ids)
    captured = capture_layer_outputs(
        model, list(range(NUM_LAYERS)), ids, mask, stop_after_last=False
    )
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(NUM_LAYERS - 1):
        assert torch.equal(captured[layer], states[layer + 1]), f"layer {layer}"
    # transformers applies the final norm to its last entry; the hook reads the raw stream
    last = NUM_LAYERS - 1
    assert not torch.equal(captured[last], states[last + 1])
    with torch.no_grad():
        assert torch.equal(model.model.norm(captured[last]), states[last + 1])


def test_forward_stops_at_the_deepest_requested_layer(model, prompts):
    calls = []
    hooks_before = len(model.model.layers[1]._forward_hooks)  # transformers adds its own
    handle = model.model.layers[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        ids = torch.tensor([prompts[0]])
        early = capture_layer_outputs(model, [1], ids, torch.ones_like(ids))
        assert calls == []
        full = capture_layer_outputs(model, [1], ids, torch.ones_like(ids), stop_after_last=False)
        assert calls == [1]
    finally:
        handle.remove()
    assert torch.equal(early[1], full[1])
    assert len(model.model.layers[1]._forward_hooks) == hooks_before  # ours are removed


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pooled_batch_matches_unpadded_prompts(model, tiny_tokenizer, prompts, pooling,
                                               padding_side):
    spec = ActivationSpec(layers=(1,), pooling=pooling)
    extractor = TransformersActivationExtractor(
        model, tiny_tokenizer, spec, batch_size=4, padding_side=padding_side
    )
    features = extractor.extract(prompts)
    assert features.shape == (len(prompts), 64) and features.dtype == np.float32
    for row, ids in enumerate(prompts):
        states = reference_states(model, ids)[2]  # after layer 1
        expected = states[-1] if pooling == "last" else states.mean(dim=0)
        np.testing.assert_allclose(features[row], expected.numpy(), rtol=1e-5, atol=1e-6)
    # batches are padded (prompts differ in length), so the comparison saw padding
    assert len({len(p) for p in prompts}) > 1


def test_left_and_right_padding_agree(model, tiny_tokenizer, prompts):
    spec = ActivationSpec(layers=(0, 2), pooling="mean")
    left = TransformersActivationExtractor(model, tiny_tokenizer, spec, batch_size=6,
                                           padding_side="left").extract(prompts)
    right = TransformersActivationExtractor(model, tiny_tokenizer, spec, batch_size=6,
                                            padding_side="right").extract(prompts)
    np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(right[1], right[4])  # the repeated prompt


def test_pool_tokens_by_hand_and_ignores_nan_padding():
    hidden = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("nan")]],  # right padded
         [[float("nan"), 0.0], [5.0, 6.0], [7.0, 10.0]]]  # left padded
    )
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert torch.equal(pool_tokens(hidden, mask, "last"), torch.tensor([[3.0, 4.0], [7.0, 10.0]]))
    assert torch.equal(pool_tokens(hidden, mask, "mean"), torch.tensor([[2.0, 3.0], [6.0, 8.0]]))


def test_pooling_is_float32_for_bfloat16_models(model, tiny_tokenizer, prompts):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    spec = ActivationSpec(layers=(0,), pooling="mean")
    features = TransformersActivationExtractor(bf16, tiny_tokenizer, spec).extract(prompts)
    reference = TransformersActivationExtractor(model, tiny_tokenizer, spec).extract(prompts)
    assert features.dtype == np.float32
    # bf16 keeps ~3 significant digits: close to, not equal to, the float32 model
    np.testing.assert_allclose(features, reference, atol=0.05 * np.abs(reference).max())


# --------------------------------------------------------------------------- layers


def test_negative_layers_and_concatenation_order(model, tiny_tokenizer, prompts):
    def features(layers):
        spec = ActivationSpec(layers=layers, pooling="last")
        return TransformersActivationExtractor(model, tiny_tokenizer, spec).extract(prompts)

    last, first = features((2,)), features((0,))
    np.testing.assert_array_equal(features((-1,)), last)
    np.testing.assert_array_equal(features((-3,)), first)
    both = features((-1, 0))
    assert both.shape == (len(prompts), 128)
    np.testing.assert_array_equal(both[:, :64], last)
    np.testing.assert_array_equal(both[:, 64:], first)


def test_all_layers_is_the_mean_over_layers(model, tiny_tokenizer, prompts):
    spec_all = ActivationSpec(layers="all", pooling="mean")
    averaged = TransformersActivationExtractor(model, tiny_tokenizer, spec_all).extract(prompts)
    spec_each = ActivationSpec(layers=(0, 1, 2), pooling="mean")
    each = TransformersActivationExtractor(model, tiny_tokenizer, spec_each).extract(prompts)
    assert averaged.shape == (len(prompts), 64)
    np.testing.assert_allclose(averaged, each.reshape(len(prompts), 3, 64).mean(axis=1),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("layers", "message"),
    [((3,), "out of range"), ((-4,), "out of range"), ((2, -1), "same layer twice")],
)
def test_bad_layers_are_refused(layers, message):
    with pytest.raises(ActivationError, match=message):
        ActivationSpec(layers=layers).resolve_layers(NUM_LAYERS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"layers": ()}, "empty"), ({"layers": (1.5,)}, "not an integer"),
     ({"layers": "some"}, "'all'"), ({"pooling": "max"}, "pooling")],
)
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ActivationError, match=message):
        ActivationSpec(**kwargs)


def test_spec_round_trips_through_a_dict():
    for spec in (ActivationSpec(layers=(-1, 4), pooling="mean"), ActivationSpec(layers="all")):
        assert ActivationSpec.from_dict(spec.to_dict()) == spec


# --------------------------------------------------------------------------- prompts


def test_prompt_is_rendered_with_the_generation_prompt(tiny_tokenizer):
    conversation = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "the response is not part of the prompt"},
    ]
    expected_text = (
        "<|im_start|>user\nfirst question<|im_end|>\n"
        "<|im_start|>assistant\nfirst answer<|im_end|>\n"
        "<|im_start|>user\nsecond question<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    expected = tiny_tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert prompt_token_ids(tiny_tokenizer, conversation) == expected
    assert prompt_messages(conversation) == conversation[:3]


def test_empty_or_missing_prompts_name_their_source(tiny_tokenizer, model):
    with pytest.raises(ActivationError, match=r"harmful\.json, row 7: empty prompt"):
        prompt_token_ids(tiny_tokenizer, [{"role": "user", "content": "  \n"}],
                         source="harmful.json, row 7")
    with pytest.raises(ActivationError, match="row 2: no user turn"):
        prompt_token_ids(tiny_tokenizer, [{"role": "system", "content": "be nice"}],
                         source="row 2")
    extractor = TransformersActivationExtractor(model, tiny_tokenizer, ActivationSpec())
    with pytest.raises(ActivationError, match="prompt 1: empty"):
        extractor.extract([[1, 2, 3], []])


def test_tokenizer_without_chat_template_is_refused(tiny_tokenizer):
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ActivationError, match="no chat template"):
        prompt_token_ids(plain, [{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_identifies_weights_not_dtype_or_path(model, tiny_tokenizer):
    base = fingerprint_transformers_model(model, tiny_tokenizer, name="/a/path")
    as_bf16 = fingerprint_transformers_model(
        copy.deepcopy(model).to(torch.bfloat16), tiny_tokenizer, name="/another/path"
    )
    other_seed = fingerprint_transformers_model(
        build_tiny_llama(tiny_tokenizer, num_layers=NUM_LAYERS, seed=4), tiny_tokenizer,
        name="/a/path",
    )
    deeper = fingerprint_transformers_model(
        build_tiny_llama(tiny_tokenizer, num_layers=NUM_LAYERS + 1, seed=3), tiny_tokenizer,
    )
    assert base.num_layers == NUM_LAYERS and base.hidden_size == 64
    assert base.mismatch(as_bf16) is None
    assert "embedding_sha256" in base.mismatch(other_seed)
    assert "num_layers" in base.mismatch(deeper)
    # without a weight hash on one side, the name decides
    unhashed = replace(base, embedding_sha256=None)
    assert unhashed.mismatch(replace(as_bf16, name="/a/path")) is None
    assert "name" in unhashed.mismatch(as_bf16)


# --------------------------------------------------------------------------- vLLM


def test_an_engine_without_the_hook_settings_is_refused():
    compiled = SimpleNamespace(
        parallel_config=SimpleNamespace(worker_extension_cls="", world_size=1),
        model_config=SimpleNamespace(enforce_eager=False),
        cache_config=SimpleNamespace(enable_prefix_caching=True),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=False),
    )
    with pytest.raises(ActivationError) as err:
        VLLMActivationExtractor._check_engine(compiled)
    for needed in ("worker_extension_cls", "enforce_eager=True", "enable_prefix_caching=False"):
        assert needed in str(err.value)


@pytest.fixture(scope="module")
def vllm_engine(make_vllm_engine, model, tiny_tokenizer, tmp_path_factory):
    model_dir: Path = save_tiny_model(
        tmp_path_factory.mktemp("activations_llama"), tokenizer=tiny_tokenizer, model=model
    )
    # the engine module's activation role, with a small step budget (several steps below)
    kwargs = engine_kwargs(EngineSpec(model=str(model_dir), role="activations", dtype="float32",
                                      max_model_len=256, gpu_memory_utilization=0.1,
                                      extra={"max_num_batched_tokens": 256}), cpu=True)
    return make_vllm_engine(kwargs.pop("model"), **kwargs)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize(
    "spec",
    [ActivationSpec(layers=(0, -1), pooling="last"), ActivationSpec(layers=(1,), pooling="mean"),
     ActivationSpec(layers="all", pooling="mean")],
    ids=["last-0,-1", "mean-1", "mean-all"],
)
def test_vllm_agrees_with_transformers(vllm_engine, model, tiny_tokenizer, prompts, spec):
    reference = TransformersActivationExtractor(model, tiny_tokenizer, spec, batch_size=4)
    served = VLLMActivationExtractor(vllm_engine, spec)
    expected = reference.extract(prompts)
    # the engine batches all prompts in one step; order in the batch must not matter
    got = served.extract(prompts)
    reversed_got = served.extract(prompts[::-1])[::-1]
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < 1e-4
    assert np.abs(reversed_got - expected).max() / scale < 1e-4
    assert served.layers == reference.layers
    assert served.fingerprint.mismatch(reference.fingerprint) is None


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_refuses_prompts_it_cannot_run_whole(vllm_engine):
    served = VLLMActivationExtractor(vllm_engine, ActivationSpec(layers=(0,)))
    with pytest.raises(ActivationError, match="prompt 1: 300 tokens"):
        served.extract([[5, 6, 7], [5] * 300])
    with pytest.raises(ActivationError, match="prompt 0: empty"):
        served.extract([[]])
    with pytest.raises(ActivationError, match="out of range"):
        VLLMActivationExtractor(vllm_engine, ActivationSpec(layers=(7,)))


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_maps_requests_across_several_engine_steps(vllm_engine, model, tiny_tokenizer):
    # ~40 prompts of 15-30 tokens exceed the 256-token step budget: several forward passes,
    # each a flattened batch of whole prompts
    words = ("the", "river", "flows", "past", "the", "old", "mill", "and", "under", "the",
             "stone", "bridge")
    texts = [" ".join(words[: 2 + i % 10]) + f" {i}" for i in range(40)]
    prompts = [prompt_token_ids(tiny_tokenizer, [{"role": "user", "content": t}]) for t in texts]
    assert sum(map(len, prompts)) > 2 * 256
    spec = ActivationSpec(layers=(-1,), pooling="last")
    expected = TransformersActivationExtractor(model, tiny_tokenizer, spec).extract(prompts)
    got = VLLMActivationExtractor(vllm_engine, spec).extract(prompts)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
