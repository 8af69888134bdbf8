"""The reference model: a frozen copy that stays put, and a forward that runs only when needed."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from safekeel.train.reference import MissingReferenceError, SkippingReference, build_reference
from safekeel.train.weights import make_weight_policy
from tests.train.test_lora import a_batch


class CountingReference:
    def __init__(self):
        self.calls = 0

    def response_logits(self, batch):
        self.calls += 1
        return "logits"


def weights_for(batch, method):
    policy = make_weight_policy(method)
    risk = torch.full((batch.input_ids.shape[0],), 0.5)
    return policy(batch.response_mask, critic_p_unsafe=risk, probe_p_harmful=risk)


def test_the_reference_runs_only_where_some_kl_weight_is_not_zero():
    batch = a_batch(pad_id=0)
    model = CountingReference()
    reference = SkippingReference(model, "adaptive")
    assert reference.logits_if_needed(batch, weights_for(batch, "sft")) is None
    assert reference.logits_if_needed(batch, weights_for(batch, "adaptive")) == "logits"
    assert reference.logits_if_needed(batch, weights_for(batch, "filter")) is None
    assert (reference.forwards_run, reference.forwards_skipped, model.calls) == (1, 2, 1)


def test_a_kl_weight_without_a_reference_model_is_an_error():
    batch = a_batch(pad_id=0)
    reference = SkippingReference(None, "adaptive")
    assert reference.logits_if_needed(batch, weights_for(batch, "sft")) is None
    with pytest.raises(MissingReferenceError, match="'adaptive' set a KL weight"):
        reference.logits_if_needed(batch, weights_for(batch, "adaptive"))


def test_frozen_copy_keeps_the_initial_models_logits(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    batch = a_batch(pad_id=0)
    with torch.no_grad():
        want = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    reference = build_reference(model, torch.device("cpu"))
    with torch.no_grad():  # training moves the model, not its frozen copy
        for param in model.parameters():
            param.add_(0.1)
    lazy = reference.response_logits(batch)
    got = lazy.head(lazy.hidden)
    torch.testing.assert_close(got, want[:, :-1][batch.response_mask], rtol=1e-5, atol=1e-5)
    assert not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
