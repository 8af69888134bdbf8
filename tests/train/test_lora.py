"""LoRA: the adapter-disabled reference is the base model, only the adapter trains, merging."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import safekeel.train.run as run_module
from safekeel.data.config import ConfigError, from_dict
from safekeel.data.tokenization import IGNORE_INDEX
from safekeel.train.config import METHODS, TrainConfig
from safekeel.train.data import TrainingExample, collate
from safekeel.train.run import AdapterDisabledReference, apply_lora, train
from tests.train.test_run import make_config, read_log, weights_of

pytest.importorskip("peft")

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}


def lora_config(model_dir, shards_dir, out, **kw):
    values = {"lora": LORA, "progress_bar": False, "save_every": 0, **kw}
    return make_config(model_dir, shards_dir, out, **values)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    from safekeel.data.shards import tokenizer_fingerprint
    from tests.train.test_run import write_shards

    return write_shards(tmp_path_factory.mktemp("shards"), 8, tokenizer_fingerprint(tiny_tokenizer))


def a_batch(pad_id: int):
    """Two right-padded rows whose last tokens are the 'response'."""
    rows = [list(range(5, 17)), list(range(40, 49))]
    examples = [
        TrainingExample(id=f"r{i}", input_ids=ids,
                        labels=[IGNORE_INDEX] * 4 + ids[4:])
        for i, ids in enumerate(rows)
    ]
    return collate(examples, pad_id)


def test_adapter_disabled_reference_gives_the_base_models_logits(tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = from_dict(TrainConfig, {"lora": LORA})
    peft_model = apply_lora(policy, cfg)
    # A fresh adapter is a no-op (B = 0); give it weight so that "disabled" means something.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    peft_model.train()
    batch = a_batch(pad_id=0)
    mask = batch.response_mask

    lazy = AdapterDisabledReference(peft_model).response_logits(batch)
    ref_logits = lazy.head(lazy.hidden)
    with torch.no_grad():
        want = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        adapted = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want, adapted = want[:, :-1][mask], adapted[:, :-1][mask]
    assert ref_logits.shape == want.shape == (int(mask.sum()), base.config.vocab_size)
    torch.testing.assert_close(ref_logits, want, rtol=1e-5, atol=1e-5)
    assert (adapted - want).abs().max() > 1e-2  # the adapter does change the policy
    assert peft_model.get_base_model().training  # train mode restored after the reference


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_the_adapter_only(method, tiny_model_dir, shards, tmp_path,
                                              monkeypatch):
    def no_copy(*args, **kwargs):
        raise AssertionError("LoRA must not copy the model for the reference")

    monkeypatch.setattr(run_module, "build_reference", no_copy)
    out = tmp_path / "out"
    result = train(lora_config(tiny_model_dir, shards, out, method=method, max_steps=2))
    assert result.steps == 2
    adapter = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert (result.final_dir / "adapter_config.json").exists()
    assert (result.final_dir / "tokenizer.json").exists()
    assert (result.final_dir / "train_config.yaml").exists()
    assert not (result.final_dir / "model.safetensors").exists()  # no full copy of the base
    assert adapter and all("lora_" in key for key in adapter)
    # lora_B starts at zero: every one of them must have moved
    b_weights = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert b_weights and all(v.abs().max() > 0 for v in b_weights.values())
    log = read_log(out)
    if method in ("sft", "filter", "downweight"):
        assert result.ref_forwards_run == 0
    else:
        assert result.ref_forwards_run == 4
        # Step 1 runs both micro-batches before the optimizer moves: the adapter is still
        # zero, so the policy *is* the base model and KL to the reference must vanish.
        assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert log[1]["kl"] > 1e-9


def test_merged_checkpoint_is_base_plus_scaled_adapter(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "out"
    result = train(lora_config(tiny_model_dir, shards, out, method="adaptive", max_steps=2,
                               merge_lora=True))
    base = weights_of(tiny_model_dir)
    merged = weights_of(result.merged_dir)
    adapter = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert merged.keys() == base.keys()
    scale = LORA["alpha"] / LORA["r"]
    targeted = 0
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in adapter:
            delta = scale * adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key]
            torch.testing.assert_close(merged[name], weight + delta, rtol=1e-5, atol=1e-6)
            targeted += 1
        else:  # the base weights themselves never train
            assert torch.equal(merged[name], weight), name
    assert targeted == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    model = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert (result.merged_dir / "tokenizer.json").exists()


@pytest.mark.parametrize("values, message", [
    ({"lora": {"enabled": True, "target_modules": ["q_proj", "lm_head"]}},
     "lora.target_modules: 'lm_head' is the output head"),
    ({"merge_lora": True}, "merge_lora: needs lora.enabled"),
    ({"lora": {"r": 0}}, "lora.r: must be at least 1"),
    ({"lora": {"dropout": 1.0}}, r"lora.dropout: must be in \[0, 1\)"),
])
def test_bad_lora_options_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, values)


def test_unknown_target_module_names_the_option(tiny_model_dir):
    cfg = from_dict(TrainConfig, {"lora": {"enabled": True, "target_modules": ["no_such_proj"]}})
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
