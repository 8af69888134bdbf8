"""The training step computes logits at response positions only (the decoder body's hidden
states, gathered where a loss is taken, then the head). Checked against the plain route:
the model's full [B, T, V] logits, losses taken in float64, for full fine-tuning and LoRA."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from safekeel.data.config import from_dict
from safekeel.data.tokenization import IGNORE_INDEX
from safekeel.train.config import TrainConfig
from safekeel.train.data import TrainingExample, collate
from safekeel.train.reference import AdapterDisabledReference, SkippingReference, build_reference
from safekeel.train.run import apply_lora, micro_batch_loss
from safekeel.train.weights import make_weight_policy

BETA = 0.5


def a_batch():
    """Three right-padded rows of unequal length with responses of 1 to 5 tokens."""
    rows = [(list(range(5, 21)), 3), (list(range(40, 49)), 1), (list(range(60, 72)), 5)]
    examples = [
        TrainingExample(id=f"r{i}", input_ids=ids,
                        labels=[IGNORE_INDEX] * (len(ids) - k) + ids[len(ids) - k:])
        for i, (ids, k) in enumerate(rows)
    ]
    return collate(examples, pad_token_id=0)


def full_logits_loss(model, ref_logits_of, batch):
    """sum CE + BETA * forward KL over response tokens, from the full logits, in float64."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad():
        ref = ref_logits_of(batch)
    mask = batch.response_mask
    logp = logits[:, :-1][mask].double().log_softmax(-1)
    ref_logp = ref[:, :-1][mask].double().log_softmax(-1)
    ce = -logp.gather(-1, batch.target_ids[mask][:, None]).squeeze(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (ce + BETA * kl).sum()


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True])
def test_response_position_logits_match_full_logits(lora, tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if lora:
        cfg = from_dict(TrainConfig, {"lora": {"enabled": True, "r": 4, "dropout": 0.0}})
        model = apply_lora(model, cfg)
        with torch.no_grad():  # a fresh adapter is a no-op: give it weight
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
        reference = AdapterDisabledReference(model)

        def ref_logits_of(batch):
            base = model.get_base_model()
            base.eval()
            with model.disable_adapter():
                out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            base.train()
            return out.logits
    else:
        reference = build_reference(model, torch.device("cpu"))

        def ref_logits_of(batch):
            return reference.model(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask).logits
        with torch.no_grad():  # move the policy away from its reference copy
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    model.train()
    batch = a_batch()
    head = model.get_output_embeddings()
    assert head is not None and head.out_features == model.config.vocab_size

    result = micro_batch_loss(
        model, head, SkippingReference(reference, "constant_kl"),
        make_weight_policy("constant_kl", beta=BETA), batch,
        kl_estimator="forward", chunk_size=4,  # several chunks
    )
    result.parts.numerator.backward()
    ours = gradients(model)
    model.zero_grad()
    expected = full_logits_loss(model, ref_logits_of, batch)
    expected.backward()
    naive = gradients(model)

    assert result.parts.n_tokens == 9
    assert result.parts.kl_sum > 1e-4  # the reference differs from the policy
    torch.testing.assert_close(result.parts.numerator.double(), expected, rtol=1e-5, atol=1e-5)
    assert ours.keys() == naive.keys() and ours
    for name in ours:  # float32 sums in another order: compare with the gradient's size
        error = (ours[name] - naive[name]).norm() / naive[name].norm()
        assert error < 1e-4, (name, float(error), float(naive[name].norm()))
