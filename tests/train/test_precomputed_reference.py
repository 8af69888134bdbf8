"""`safekeel train --reference precomputed`: the stored reference trains like the live one.

Shards are made by the real annotate driver (transformers backend) from the tiny policy;
the live runs use the same shards (they ignore the stored columns). k1/k2/k3 are exact,
so losses and final weights must agree to float noise; forward KL with top-k covering the
whole vocabulary is exact too.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch

import safekeel.train.run as run_module
from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.reference_logprobs import ReferenceKernelWarning, ReferenceLogprobError
from safekeel.annotate.reference_stage import reference_provenance_of
from safekeel.annotate.run import annotate
from safekeel.data.config import ConfigError, from_dict
from safekeel.data.embedded.tiny_models import save_tiny_model
from safekeel.data.shards import ShardReader
from safekeel.train.objective import ObjectiveInputError
from safekeel.train.reference import MissingReferenceError
from safekeel.train.run import train
from tests.train.test_run import make_config, read_log

VOCAB = 1024  # the tiny tokenizer's
N_ROWS = 12
MAX_LENGTH = 64


def write_corpus(path: Path) -> Path:
    rows = [{"prompt": f"What is 7 times {i}?", "response": f"Seven times {i} is {7 * i}."}
            for i in range(N_ROWS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def annotate_reference(out: Path, corpus: Path, policy: Path, top_k: int,
                       max_length: int = MAX_LENGTH, attention: str = "auto") -> Path:
    cfg = from_dict(AnnotateConfig, {
        "corpus": {"path": str(corpus)}, "policy": str(policy), "output_dir": str(out),
        "rows_per_shard": 4, "row_group_size": 2, "tokenization": {"max_length": max_length},
        "reference": {"enabled": True, "backend": "transformers", "top_k": top_k,
                      "attn_implementation": attention}})
    annotate(cfg)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def shards_k8(tmp_path_factory, corpus, tiny_model_dir):
    return annotate_reference(tmp_path_factory.mktemp("k8"), corpus, tiny_model_dir, 8)


@pytest.fixture(scope="module")
def shards_full(tmp_path_factory, corpus, tiny_model_dir):
    return annotate_reference(tmp_path_factory.mktemp("kV"), corpus, tiny_model_dir, VOCAB)


def run_both(policy, shards, tmp_path, **kw):
    results, logs = {}, {}
    for mode in ("live", "precomputed"):
        out = tmp_path / mode
        results[mode] = train(make_config(policy, shards, out, method="constant_kl",
                                          max_steps=3, reference=mode, **kw))
        logs[mode] = read_log(out)
    return results, logs


def assert_same_training(results, logs, weights_file="model.safetensors"):
    assert len(logs["live"]) == len(logs["precomputed"]) == 3
    # step 1: the policy is the reference; then it moves away from it
    assert logs["precomputed"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert logs["live"][-1]["kl"] > 1e-3
    for live, stored in zip(logs["live"], logs["precomputed"], strict=True):
        assert stored["tokens"] == live["tokens"]
        for key in ("loss", "ce", "kl"):
            assert stored[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), key
    from safetensors.torch import load_file

    live = load_file(str(results["live"].final_dir / weights_file))
    stored = load_file(str(results["precomputed"].final_dir / weights_file))
    assert live.keys() == stored.keys()
    for key in live:
        torch.testing.assert_close(stored[key], live[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_precomputed_k2_k3_train_like_the_live_frozen_copy(
        estimator, tiny_model_dir, shards_k8, tmp_path, monkeypatch):
    built = []
    original = run_module.build_reference
    monkeypatch.setattr(run_module, "build_reference",
                        lambda *a, **k: built.append(1) or original(*a, **k))
    results, logs = run_both(tiny_model_dir, shards_k8, tmp_path,
                             kl={"estimator": estimator, "beta": 0.5})
    assert_same_training(results, logs)
    assert built == [1]  # only the live run copied the model
    assert results["precomputed"].ref_forwards_run == results["live"].ref_forwards_run == 6


def test_precomputed_forward_with_the_whole_vocabulary_equals_live(
        tiny_model_dir, shards_full, tmp_path):
    results, logs = run_both(tiny_model_dir, shards_full, tmp_path,
                             kl={"estimator": "forward", "beta": 0.5},
                             per_device_batch_size=3, gradient_accumulation_steps=1)
    assert_same_training(results, logs)


def test_precomputed_with_lora_trains_like_the_disabled_adapter(
        tiny_model_dir, shards_k8, tmp_path):
    pytest.importorskip("peft")
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    results, logs = run_both(tiny_model_dir, shards_k8, tmp_path, lora=lora,
                             kl={"estimator": "k2", "beta": 0.5})
    assert_same_training(results, logs, "adapter_model.safetensors")


def test_stored_kernel_is_recorded_and_another_one_warns_once(tiny_model_dir, corpus,
                                                              tmp_path):
    """auto is eager (training's auto on a CPU); an sdpa-made reference trains an sdpa
    policy like its live sdpa reference (to float noise), and an eager policy with one
    warning."""
    eager = annotate_reference(tmp_path / "eager", corpus, tiny_model_dir, 8)
    sdpa = annotate_reference(tmp_path / "sdpa", corpus, tiny_model_dir, 8, attention="sdpa")
    assert reference_provenance_of(ShardReader(eager).provenance).attn_implementation == "eager"
    assert reference_provenance_of(ShardReader(sdpa).provenance).attn_implementation == "sdpa"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results, logs = run_both(tiny_model_dir, sdpa, tmp_path / "same",
                                 attn_implementation="sdpa", kl={"estimator": "k2"})
    assert not [w for w in caught if w.category is ReferenceKernelWarning]
    assert_same_training(results, logs)

    with pytest.warns(ReferenceKernelWarning) as caught:
        train(make_config(tiny_model_dir, sdpa, tmp_path / "other", method="constant_kl",
                          max_steps=1, reference="precomputed", attn_implementation="eager"))
    kernel_warnings = [w for w in caught if w.category is ReferenceKernelWarning]
    assert len(kernel_warnings) == 1  # once, though every shard differs
    assert str(kernel_warnings[0].message).startswith(
        "shard-00000.parquet: the precomputed reference was computed with sdpa attention, "
        "this run's policy uses eager")


def test_a_gpu_run_is_not_warned_about_the_cpu_kernel(tiny_model_dir, tiny_tokenizer, corpus,
                                                      tmp_path):
    """annotate scores on the CPU: a GPU run matches it only to float noise whatever the
    kernel, like a vLLM-made shard, so no kernel advice is given there."""
    from safekeel.data.models import load_causal_lm
    from safekeel.data.tokenization import TokenizationConfig
    from safekeel.train.reference import check_stored_reference, expected_reference_provenance

    sdpa = annotate_reference(tmp_path / "sdpa", corpus, tiny_model_dir, 8, attention="sdpa")
    model = load_causal_lm(tiny_model_dir, attn_implementation="eager")
    files = ShardReader(sdpa).files
    for on_cpu, warned in ((False, 0), (True, 1)):
        expected = expected_reference_provenance(
            model, tiny_tokenizer, TokenizationConfig(max_length=MAX_LENGTH), str(tiny_model_dir),
            min_top_k=0, on_cpu=on_cpu)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_stored_reference(files, expected, estimator="k2")
        assert len([w for w in caught if w.category is ReferenceKernelWarning]) == warned


def test_forward_kl_refuses_too_small_a_top_k(tiny_model_dir, shards_k8, tmp_path):
    cfg = make_config(tiny_model_dir, shards_k8, tmp_path / "o", method="constant_kl",
                      max_steps=1, reference="precomputed", reference_min_top_k=16)
    with pytest.raises(ReferenceLogprobError, match=r"shard-00000\.parquet: forward KL needs.*"
                       r"top-8, this run asks for at least 16"):
        train(cfg)


def test_reverse_kl_is_refused_by_the_config(tiny_model_dir, shards_k8, tmp_path):
    with pytest.raises(ConfigError, match="reverse KL needs its whole distribution"):
        make_config(tiny_model_dir, shards_k8, tmp_path / "o", method="constant_kl",
                    reference="precomputed", kl={"estimator": "reverse"})


def test_shards_of_another_reference_model_are_refused(
        tiny_model_dir, tiny_tokenizer, corpus, shards_k8, tmp_path):
    other = save_tiny_model(tmp_path / "other", tokenizer=tiny_tokenizer, seed=1)
    cfg = make_config(other, shards_k8, tmp_path / "o", method="constant_kl", max_steps=1,
                      reference="precomputed", kl={"estimator": "k2"})
    with pytest.raises(ReferenceLogprobError,
                       match=r"shard-00000\.parquet: the precomputed reference comes from "
                       r"another model \(embedding_sha256"):
        train(cfg)


def test_shards_of_another_tokenisation_are_refused(tiny_model_dir, shards_k8, tmp_path):
    cfg = make_config(tiny_model_dir, shards_k8, tmp_path / "o", method="constant_kl",
                      max_steps=1, reference="precomputed", kl={"estimator": "k2"},
                      tokenization={"max_length": 48})
    with pytest.raises(ReferenceLogprobError, match=r"shard-00000\.parquet: .*tokenisation "
                       r".*'max_length': 64.*this run uses .*'max_length': 48"):
        train(cfg)


def test_shards_of_another_dtype_are_refused(tiny_model_dir, corpus, tmp_path):
    cfg = from_dict(AnnotateConfig, {
        "corpus": {"path": str(corpus)}, "policy": str(tiny_model_dir),
        "output_dir": str(tmp_path / "bf16"), "rows_per_shard": 4,
        "tokenization": {"max_length": MAX_LENGTH},
        "reference": {"enabled": True, "backend": "transformers", "top_k": 4,
                      "dtype": "bfloat16"}})
    with warnings.catch_warnings():  # bf16 on a CPU that emulates it warns; not the point
        warnings.simplefilter("ignore")
        annotate(cfg)
    train_cfg = make_config(tiny_model_dir, tmp_path / "bf16", tmp_path / "o",
                            method="constant_kl", max_steps=1, reference="precomputed",
                            kl={"estimator": "k2"})
    with pytest.raises(ReferenceLogprobError, match=r"shard-00000\.parquet: .*computed in "
                       r"bfloat16.*this run expects float32"):
        train(train_cfg)


def test_shards_without_the_reference_are_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    from safekeel.data.shards import ShardError, tokenizer_fingerprint
    from tests.train.test_run import write_shards

    shards = write_shards(tmp_path / "plain", 4, tokenizer_fingerprint(tiny_tokenizer))
    cfg = make_config(tiny_model_dir, shards, tmp_path / "o", method="constant_kl",
                      max_steps=1, reference="precomputed", kl={"estimator": "k2"})
    with pytest.raises(ShardError, match="column 'ref_target_logprob' is missing"):
        train(cfg)


def test_a_row_whose_token_count_differs_is_refused():
    from safekeel.train.data import TrainingExample, collate

    example = TrainingExample("a", [5, 6, 7, 8], [-100, 6, 7, 8],
                              ref_target_logprob=[-1.0, -2.0],
                              ref_topk_ids=[[1, 2], [3, 4]],
                              ref_topk_logprobs=[[-0.5, -1.0], [-0.5, -1.0]])
    with pytest.raises(ObjectiveInputError, match="covers 2 response tokens, this "
                       "tokenisation has 3"):
        collate([example], pad_token_id=0)


def test_sft_ignores_the_option(tiny_model_dir, shards_k8, tmp_path):
    result = train(make_config(tiny_model_dir, shards_k8, tmp_path / "o", method="sft",
                               max_steps=1, reference="precomputed"))
    assert result.ref_forwards_run == 0


def test_a_batch_without_stored_values_is_refused(tiny_model_dir, shards_k8):
    from safekeel.train.data import TrainingExample, collate
    from safekeel.train.reference import StoredReference

    batch = collate([TrainingExample("a", [5, 6, 7], [-100, 6, 7])], pad_token_id=0)
    with pytest.raises(MissingReferenceError, match="without precomputed reference values"):
        StoredReference().response_logits(batch)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_with_the_stored_reference_match_the_live_one(
        tiny_model_dir, shards_k8, tmp_path):
    """torchrun, 2 CPU processes (gloo), accumulation 2: same losses and weights as live."""
    from safetensors.torch import load_file

    from tests.train.test_multiprocess import launch

    logs, finals = {}, {}
    for mode in ("live", "precomputed"):
        out = tmp_path / mode
        launch("torchrun", [
            "--policy", str(tiny_model_dir), "--shards", str(shards_k8),
            "--output_dir", str(out), "--method", "constant_kl", "--kl.estimator", "k3",
            "--kl.beta", "0.5", "--reference", mode, "--per_device_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2",
            "--tokenization.max_length", str(MAX_LENGTH), "--mixed_precision", "no",
            "--save_every", "0", "--progress_bar", "false",
        ], cwd=tmp_path, timeout=300)
        logs[mode] = read_log(out)
        finals[mode] = load_file(str(out / "final" / "model.safetensors"))
    assert len(logs["live"]) == len(logs["precomputed"]) >= 2
    for live, stored in zip(logs["live"], logs["precomputed"], strict=True):
        assert stored["tokens"] == live["tokens"]
        assert stored["loss"] == pytest.approx(live["loss"], rel=1e-5)
        assert stored["kl"] == pytest.approx(live["kl"], rel=1e-5, abs=1e-6)
    for key, value in finals["live"].items():
        torch.testing.assert_close(finals["precomputed"][key], value, atol=1e-5, rtol=0)
