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


def test_training_on_an_adapter_records_it_as_the_base(tiny_model_dir, shards, tmp_path,
                                                       monkeypatch):
    """--policy <adapter dir>: the policy (and so the KL reference) is the adapter merged
    into its base; the new adapter names the policy adapter as its base, by absolute path,
    and stays loadable after the merge cache is gone."""
    import json
    import shutil
    from pathlib import Path

    from safekeel.data.models import resolve_model_path
    from tests.data.test_adapters import apply_by_hand, save_random_adapter

    cache = tmp_path / "cache"
    monkeypatch.setenv("SAFEKEEL_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    policy = save_random_adapter(tiny_model_dir, tmp_path / "safe_ref", ["q_proj", "v_proj"],
                                 seed=1)
    result = train(lora_config("safe_ref", shards, tmp_path / "out", method="constant_kl",
                               max_steps=2, merge_lora=True))
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(policy)
    # step 1: the fresh adapter is zero, the policy is the reference (the policy adapter
    # merged), so KL vanishes; it would not against the bare base model
    assert read_log(tmp_path / "out")[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    shutil.rmtree(cache)
    merged = weights_of(Path(resolve_model_path(result.final_dir)))
    want = apply_by_hand(tiny_model_dir, [policy, result.final_dir])
    trained_merge = weights_of(result.merged_dir)
    for name, weight in want.items():
        torch.testing.assert_close(merged[name], weight, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(trained_merge[name], weight, rtol=1e-5, atol=1e-5, msg=name)


def test_the_adapter_can_be_saved_in_bfloat16(tiny_model_dir, shards, tmp_path, monkeypatch):
    from pathlib import Path

    from safekeel.data.models import resolve_model_path

    monkeypatch.setenv("SAFEKEEL_CACHE", str(tmp_path / "cache"))
    saved = {}
    for dtype in ("float32", "bfloat16"):
        result = train(lora_config(tiny_model_dir, shards, tmp_path / dtype, method="sft",
                                   max_steps=2, lora={**LORA, "save_dtype": dtype}))
        saved[dtype] = result.final_dir
    full = load_file(str(saved["float32"] / "adapter_model.safetensors"))
    half = load_file(str(saved["bfloat16"] / "adapter_model.safetensors"))
    assert {t.dtype for t in full.values()} == {torch.float32}
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    assert full.keys() == half.keys()
    for key in full:  # the same training, rounded once when saved
        assert torch.equal(half[key], full[key].to(torch.bfloat16)), key
    merged = {d: weights_of(Path(resolve_model_path(saved[d]))) for d in saved}
    assert {t.dtype for t in merged["bfloat16"].values()} == {torch.float32}
    for name, weight in merged["float32"].items():
        torch.testing.assert_close(merged["bfloat16"][name], weight, rtol=0, atol=1e-3, msg=name)
