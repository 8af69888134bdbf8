"""Precomputed reference log-probs: training's positions, both backends, the train-side KL.

The reference is a tiny random Llama drawn wider than usual (std 0.2), so its next-token
distributions are far from uniform and top-k orders are well separated. Every check
compares with an independent computation: one plain full forward, the train stage's own
batch layout (`train.data.collate`) and objective, or the other backend.
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from safekeel.annotate.activations import fingerprint_transformers_model
from safekeel.annotate.reference_logprobs import (
    REF_TARGET_COLUMN,
    REF_TOPK_IDS_COLUMN,
    REF_TOPK_LOGPROBS_COLUMN,
    ReferenceLogprobError,
    ReferenceProvenance,
    TransformersReferenceScorer,
    VLLMReferenceScorer,
    check_reference_provenance,
    reference_arrays,
    reference_engine_kwargs,
    reference_fields,
    reference_row,
    response_positions,
    score_conversations,
    storage_bytes_per_token,
    tokenization_settings,
)
from safekeel.data.embedded.tiny_models import build_tiny_llama, build_tokenizer, save_tiny_model
from safekeel.data.shards import tokenizer_fingerprint
from safekeel.data.tokenization import TokenizationConfig, tokenize_example
from safekeel.train.data import TrainingExample, collate
from safekeel.train.objective import (
    PrecomputedReference,
    lazy_masked_logits,
    stack_precomputed,
    token_objective,
)

TOP_K = 8
BACKEND_ATOL = 1e-4  # transformers vs vLLM, float32


def chat(user: str, assistant: str, system: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


CONVERSATIONS = [
    chat("What is the capital of France?", "The capital of France is Paris."),
    chat("How do I boil an egg?", "Put the egg in boiling water for nine minutes"),
    chat("Tell me how to hurt someone.", "I'm sorry, but I cannot help with that request"),
    chat("Name three colours.", "Red, green and blue", system="Answer briefly."),
    chat("Hi", "Good morning! How can I help you today? " * 6),
]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    model = build_tiny_llama(tokenizer, initializer_range=0.2, seed=1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny_ref"), tokenizer=tokenizer, model=model)


@pytest.fixture(scope="module")
def reference(reference_dir, single_torch_thread):
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    return model, build_tokenizer()


@pytest.fixture(scope="module", params=["prefix", "generation"])
def tokenizer(request):
    return build_tokenizer(generation_markers=request.param == "generation")


def tokenized(tokenizer, cfg: TokenizationConfig | None = None):
    cfg = cfg or TokenizationConfig(max_length=48)  # the last conversation is truncated
    examples = [tokenize_example(tokenizer, messages, cfg) for messages in CONVERSATIONS]
    assert all(hasattr(e, "input_ids") for e in examples)
    return examples


def as_precomputed(row) -> PrecomputedReference:
    return PrecomputedReference(
        torch.from_numpy(row.target_logprob), torch.from_numpy(row.topk_ids).long(),
        torch.from_numpy(row.topk_logprobs),
    )


# --------------------------------------------------------------------------- positions


def test_values_are_training_positions_of_one_full_forward(reference, tokenizer):
    model, _ = reference
    examples = tokenized(tokenizer)
    assert examples[-1].truncated_tokens > 0
    rows = TransformersReferenceScorer(model, top_k=TOP_K, batch_size=2, chunk_size=7).score(examples)
    for example, row in zip(examples, rows, strict=True):
        positions = response_positions(example)
        assert row.tokens == len(positions) == example.response_tokens
        with torch.no_grad():
            logp = model(torch.tensor([example.input_ids])).logits[0].float().log_softmax(-1)
        before = torch.tensor(positions) - 1  # the logit at t - 1 predicts token t
        expected_target = logp[before, torch.tensor(example.input_ids)[positions]]
        np.testing.assert_allclose(row.target_logprob, expected_target.numpy(), atol=1e-5)
        top_logp, top_ids = logp[before].topk(TOP_K, dim=-1)
        np.testing.assert_array_equal(row.topk_ids, top_ids.numpy())
        np.testing.assert_allclose(row.topk_logprobs, top_logp.numpy(), atol=1e-5)
        assert row.topk_ids.dtype == np.int32 and row.topk_logprobs.dtype == np.float32


def test_values_line_up_with_the_train_stage_batch(reference, tokenizer):
    """The stored rows, stacked in the train batch's mask order, are log q(target_ids)."""
    model, _ = reference
    examples = tokenized(tokenizer)
    rows = TransformersReferenceScorer(model, top_k=TOP_K).score(examples)
    batch = collate(
        [TrainingExample(str(i), e.input_ids, e.labels) for i, e in enumerate(examples)],
        pad_token_id=tokenizer.pad_token_id,
    )
    stacked = stack_precomputed([as_precomputed(r) for r in rows], batch.response_mask)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = logits[:, :-1][batch.response_mask].float().log_softmax(-1)
    expected = logp.gather(-1, batch.target_ids[batch.response_mask][:, None]).squeeze(-1)
    torch.testing.assert_close(stacked.target_logprob, expected, atol=1e-5, rtol=0)


def test_batching_and_chunking_do_not_change_values(reference, tokenizer):
    model, _ = reference
    examples = tokenized(tokenizer)
    one = TransformersReferenceScorer(model, top_k=TOP_K, batch_size=1, chunk_size=1024).score(examples)
    many = TransformersReferenceScorer(model, top_k=TOP_K, batch_size=5, chunk_size=3).score(examples)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a.target_logprob, b.target_logprob, atol=1e-5)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)


def test_conversations_training_skips_get_no_values(reference, tokenizer):
    model, _ = reference
    cfg = TokenizationConfig(max_length=40, min_response_tokens=4)
    long_prompt = chat("Tell me a long story about the sea and the wind and the rain. " * 3, "No.")
    conversations = [CONVERSATIONS[0], long_prompt, CONVERSATIONS[3]]
    rows = score_conversations(TransformersReferenceScorer(model, top_k=2), tokenizer,
                               conversations, cfg)
    assert rows[1] is None
    for messages, row in zip([CONVERSATIONS[0], CONVERSATIONS[3]], [rows[0], rows[2]], strict=True):
        assert row is not None and row.tokens == tokenize_example(tokenizer, messages, cfg).response_tokens


def test_top_k_zero_stores_only_the_target(reference, tokenizer):
    model, _ = reference
    rows = TransformersReferenceScorer(model, top_k=0).score(tokenized(tokenizer)[:2])
    assert all(r.k == 0 and r.tokens > 0 for r in rows)
    with pytest.raises(ReferenceLogprobError, match="top_k"):
        TransformersReferenceScorer(model, top_k=5000)


# --------------------------------------------------------------------------- train side


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "forward"])
def test_training_loss_from_stored_values_equals_the_live_reference(reference, estimator):
    """A perturbed policy against the live reference model and against its stored values.

    k1/k2/k3 are exact; forward with a top-k covering the vocabulary is exact too.
    """
    model, tokenizer = reference
    examples = tokenized(tokenizer)
    vocab = model.config.vocab_size
    top_k = vocab if estimator == "forward" else TOP_K
    rows = TransformersReferenceScorer(model, top_k=top_k).score(examples)
    batch = collate(
        [TrainingExample(str(i), e.input_ids, e.labels) for i, e in enumerate(examples)],
        pad_token_id=tokenizer.pad_token_id,
    )
    mask = batch.response_mask
    policy = copy.deepcopy(model).train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    weights = torch.rand(int(mask.sum()), generator=generator)

    def loss_and_grad(ref):
        policy.zero_grad()
        hidden = policy.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state[:, :-1]
        parts = token_objective(
            lazy_masked_logits(hidden, policy.lm_head, mask), batch.target_ids[mask],
            1 - weights, weights, ref, kl_estimator=estimator, chunk_size=16,
        )
        parts.numerator.backward()
        return parts, [p.grad.clone() for p in policy.parameters()]

    with torch.no_grad():
        ref_hidden = model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state[:, :-1]
    live, live_grads = loss_and_grad(lazy_masked_logits(ref_hidden, model.lm_head, mask))
    stored, stored_grads = loss_and_grad(
        stack_precomputed([as_precomputed(r) for r in rows], mask)
    )
    assert stored.kl_sum.item() == pytest.approx(live.kl_sum.item(), rel=1e-6, abs=1e-6)
    assert stored.numerator.item() == pytest.approx(live.numerator.item(), rel=1e-6, abs=1e-6)
    for a, b in zip(stored_grads, live_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- storage


def test_columns_round_trip_through_parquet(reference, tokenizer, tmp_path):
    model, _ = reference
    rows = TransformersReferenceScorer(model, top_k=4).score(tokenized(tokenizer)[:3])
    stored = [rows[0], None, rows[1], rows[2]]  # None: a row that could not be tokenised
    table = pa.table(reference_arrays(stored, 4))
    assert table.schema == pa.schema(reference_fields(4))
    pq.write_table(table, tmp_path / "ref.parquet", compression="zstd")
    back = pq.read_table(tmp_path / "ref.parquet").to_pydict()
    for original, *values in zip(
        stored, back[REF_TARGET_COLUMN], back[REF_TOPK_IDS_COLUMN], back[REF_TOPK_LOGPROBS_COLUMN],
        strict=True,
    ):
        restored = reference_row(*values)
        if original is None:
            assert restored is None
            continue
        np.testing.assert_array_equal(restored.target_logprob, original.target_logprob)
        np.testing.assert_array_equal(restored.topk_ids, original.topk_ids)
        np.testing.assert_array_equal(restored.topk_logprobs, original.topk_logprobs)
    assert storage_bytes_per_token(16) == 132
    with pytest.raises(ReferenceLogprobError, match="top-4, the columns are top-8"):
        reference_arrays(rows, 8)


def test_provenance_refuses_another_model_tokenizer_tokenisation_or_k(reference, tokenizer):
    model, ref_tokenizer = reference
    cfg = TokenizationConfig(max_length=48)
    stored = ReferenceProvenance(
        reference=fingerprint_transformers_model(model, ref_tokenizer).to_dict(),
        tokenizer=tokenizer_fingerprint(tokenizer),
        tokenization=tokenization_settings(cfg),
        top_k=16,
        compute_dtype="float32",
    )
    assert ReferenceProvenance.from_json(stored.to_json()) == stored
    check_reference_provenance(stored, stored, estimator="forward")  # itself: accepted

    other_model = build_tiny_llama(ref_tokenizer, initializer_range=0.2, seed=2)
    cases = {
        "another model": {"reference": fingerprint_transformers_model(other_model).to_dict()},
        "another tokenizer's": {"tokenizer": "0" * 64},
        "tokenisation": {"tokenization": tokenization_settings(TokenizationConfig(max_length=64))},
        "bfloat16": {"compute_dtype": "bfloat16"},
    }
    for message, change in cases.items():
        expected = ReferenceProvenance(**{**stored.__dict__, **change})
        with pytest.raises(ReferenceLogprobError, match=message):
            check_reference_provenance(stored, expected, estimator="k2", where="shard-00001")
    wants_more = ReferenceProvenance(**{**stored.__dict__, "top_k": 32})
    with pytest.raises(ReferenceLogprobError, match="top-16, this run asks for at least 32"):
        check_reference_provenance(stored, wants_more, estimator="forward")
    target_only = ReferenceProvenance(**{**stored.__dict__, "top_k": 0})
    check_reference_provenance(target_only, target_only, estimator="k2")
    with pytest.raises(ReferenceLogprobError, match="forward KL needs the reference's top-k"):
        check_reference_provenance(target_only, target_only, estimator="forward")


# --------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_reference(make_vllm_engine, reference_dir):
    return make_vllm_engine(reference_dir, **reference_engine_kwargs(TOP_K))


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_and_transformers_agree(vllm_reference, reference, tokenizer):
    model, _ = reference
    examples = tokenized(tokenizer)
    expected = TransformersReferenceScorer(model, top_k=TOP_K).score(examples)
    scorer = VLLMReferenceScorer(vllm_reference, top_k=TOP_K)
    assert scorer.compute_dtype == "float32"
    got = scorer.score(examples)
    for a, b in zip(got, expected, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.target_logprob, b.target_logprob, atol=BACKEND_ATOL)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=BACKEND_ATOL)
        # ids may swap only between near-ties
        swapped = a.topk_ids != b.topk_ids
        gaps = np.abs(np.diff(b.topk_logprobs, axis=1))
        near_tie = np.zeros_like(swapped)
        near_tie[:, :-1] |= gaps < BACKEND_ATOL
        near_tie[:, 1:] |= gaps < BACKEND_ATOL
        assert not (swapped & ~near_tie).any()
    # fewer top-k than the engine allows is fine; more is refused with the fix
    assert VLLMReferenceScorer(vllm_reference, top_k=2).score(examples[:1])[0].k == 2
    with pytest.raises(ReferenceLogprobError, match=f"max_logprobs >= {TOP_K + 1}"):
        VLLMReferenceScorer(vllm_reference, top_k=TOP_K + 1)
