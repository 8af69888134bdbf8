"""The probe verb fits and saves a probe; annotate applies it and refuses one for another model."""

import json

import numpy as np
import polars as pl
import pytest

from safekeel import pipeline
from safekeel.annotate.activations import ActivationSpec, TransformersActivationExtractor
from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.probe import ProbeError, load_probe
from safekeel.annotate.probe_stage import ProbeApplyConfig
from safekeel.annotate.run import annotate
from safekeel.data.config import ConfigError, from_dict
from safekeel.data.embedded.tiny_models import save_tiny_model
from safekeel.data.embedded.world import make_world
from safekeel.data.shards import PROBE_COLUMN, ShardReader, file_sha256


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    world = make_world(0)
    harmful = [e["messages"][0]["content"] for e in world.eval_harmful[:40]]
    benign = [e["messages"][0]["content"] for e in world.eval_tasks[:40]]
    (root / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (root / "benign.txt").write_text("\n".join(benign) + "\n")
    return root


@pytest.fixture(scope="module")
def fitted(prompt_files, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    code = pipeline.main(["probe", "--policy", str(tiny_model_dir), "--harmful",
                          str(prompt_files / "harmful.txt"), "--benign",
                          str(prompt_files / "benign.txt"), "--layers", "[-1]",
                          "--output_dir", str(out)])
    assert code == 0
    return out


def test_probe_verb_writes_probe_report_and_config(fitted):
    report = json.loads((fitted / "probe_report.json").read_text())
    assert 0 <= report["auroc"] <= 1 and report["n_heldout"] == 20
    probe = load_probe(fitted)
    assert probe.layers == [1] and probe.pooling == "last"  # -1 of 2 layers, resolved
    assert (fitted / "probe_config.yaml").exists()


@pytest.mark.parametrize("backend", [
    "transformers", pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow])])
def test_annotate_applies_the_probe(fitted, tiny_model_dir, prompt_files, tmp_path, backend):
    if backend == "vllm":
        pytest.importorskip("vllm")
    corpus = tmp_path / "c.jsonl"
    rows = [{"prompt": p, "response": "ok"}
            for p in (prompt_files / "harmful.txt").read_text().splitlines()[:6]]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    annotate(from_dict(AnnotateConfig, {"corpus": {"path": str(corpus)},
                                        "policy": str(tiny_model_dir), "output_dir": str(out),
                                        "probe": {"path": str(fitted), "backend": backend}}))
    reader = ShardReader(out, required_columns=[PROBE_COLUMN])
    assert reader.provenance.probe_file_sha256 == file_sha256(fitted / "probe.safetensors")
    assert reader.provenance.probe_layers == [1]
    got = pl.read_parquet(str(out / "shard-*.parquet"))[PROBE_COLUMN].to_numpy()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    extractor = TransformersActivationExtractor(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer,
        ActivationSpec(layers=(1,), pooling="last"))
    features = extractor.extract_messages([[{"role": "user", "content": r["prompt"]}]
                                           for r in rows])
    np.testing.assert_allclose(got, load_probe(fitted).predict_proba(features), atol=1e-6)


def test_probe_for_another_model_is_refused(fitted, tmp_path):
    other = save_tiny_model(tmp_path / "other", seed=1)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"prompt": "hello", "response": "hi"}) + "\n")
    cfg = from_dict(AnnotateConfig, {"corpus": {"path": str(corpus)}, "policy": str(other),
                                     "output_dir": str(tmp_path / "out"),
                                     "probe": {"path": str(fitted),
                                               "backend": "transformers"}})
    with pytest.raises(ProbeError, match="model"):
        annotate(cfg)


def test_a_probe_follows_a_lora_adapter_policy(fitted, prompt_files, tiny_model_dir, tmp_path,
                                               monkeypatch):
    """--policy <adapter dir> fits and applies probes on the merged model; the base model's
    probe is refused for it although LoRA leaves the embeddings (the fingerprint's hash)."""
    pytest.importorskip("peft")
    from tests.data.test_adapters import save_random_adapter

    monkeypatch.setenv("SAFEKEEL_CACHE", str(tmp_path / "cache"))
    adapter = save_random_adapter(tiny_model_dir, tmp_path / "adapter",
                                  ["q_proj", "v_proj", "down_proj"], seed=2)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"prompt": "hello", "response": "hi"}) + "\n")

    def annotate_with(probe_dir, out):
        annotate(from_dict(AnnotateConfig, {
            "corpus": {"path": str(corpus)}, "policy": str(adapter), "output_dir": str(out),
            "probe": {"path": str(probe_dir), "backend": "transformers"}}))

    with pytest.raises(ProbeError, match="adapters_sha256"):
        annotate_with(fitted, tmp_path / "refused")
    own = tmp_path / "own-probe"
    assert pipeline.main(["probe", "--policy", str(adapter), "--harmful",
                          str(prompt_files / "harmful.txt"), "--benign",
                          str(prompt_files / "benign.txt"), "--layers", "[-1]",
                          "--output_dir", str(own)]) == 0
    assert load_probe(own).model.adapters_sha256 is not None
    annotate_with(own, tmp_path / "out")
    scores = pl.read_parquet(str(tmp_path / "out" / "shard-*.parquet"))[PROBE_COLUMN]
    assert scores.len() == 1 and 0 <= scores[0] <= 1


def test_probe_reads_from_vllm_by_default_and_falls_back_to_transformers(
    fitted, tiny_model_dir, monkeypatch
):
    from safekeel.annotate import probe_stage
    from safekeel.data import engines

    started = []

    def fake_start(model, spec, **kwargs):
        started.append((model, spec, kwargs))
        return "vllm extractor"

    monkeypatch.setattr(probe_stage.VLLMActivationExtractor, "start", fake_start)
    spec = ActivationSpec(layers=(1,), pooling="last")
    cfg = ProbeApplyConfig(path=str(fitted))
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object())
    assert probe_stage.apply_extractor(cfg, str(tiny_model_dir), spec,
                                       max_prompt_tokens=100) == "vllm extractor"
    (model, got_spec, kwargs), = started
    assert model == str(tiny_model_dir) and got_spec == spec
    assert kwargs["dtype"] == "float32" and kwargs["needed_tokens"] == 101

    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)  # no vllm
    fallback = probe_stage.apply_extractor(cfg, str(tiny_model_dir), spec, max_prompt_tokens=100)
    assert isinstance(fallback, TransformersActivationExtractor) and len(started) == 1
    with pytest.raises(ConfigError, match="probe.backend: 'vllm' but vllm is not installed"):
        probe_stage.apply_extractor(ProbeApplyConfig(path=str(fitted), backend="vllm"),
                                    str(tiny_model_dir), spec, max_prompt_tokens=100)


# --------------------------------------------------------------------------- precision


def test_the_probe_records_the_dtype_its_features_were_read_in(fitted):
    """float32 by default, on any machine: the same probe scores the same everywhere."""
    assert json.loads((fitted / "probe.json").read_text())["activation_dtype"] == "float32"
    assert load_probe(fitted).activation_dtype == "float32"
    assert load_probe(fitted, expected_dtype="float32").activation_dtype == "float32"
    with pytest.raises(ProbeError, match="'activation_dtype' is 'float32'.*read in bfloat16"):
        load_probe(fitted, expected_dtype="bfloat16")


@pytest.mark.parametrize("native", [True, False])
def test_a_probe_fitted_in_auto_is_applied_in_its_own_dtype_only(
    prompt_files, tiny_model_dir, tmp_path, cpu_bf16, monkeypatch, native
):
    from safekeel.annotate import probe_stage
    from safekeel.data import engines

    cpu_bf16(native)
    out = tmp_path / "probe"
    assert pipeline.main(["probe", "--policy", str(tiny_model_dir), "--harmful",
                          str(prompt_files / "harmful.txt"), "--benign",
                          str(prompt_files / "benign.txt"), "--dtype", "auto",
                          "--output_dir", str(out)]) == 0
    fitted_in, other = ("bfloat16", "float32") if native else ("float32", "bfloat16")
    assert load_probe(out).activation_dtype == fitted_in
    # annotate reads the policy in the probe's dtype (transformers and vLLM alike) ...
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)  # no vllm
    annotator = probe_stage.ProbeAnnotator(ProbeApplyConfig(path=str(out), dtype=fitted_in),
                                           str(tiny_model_dir))
    assert annotator.extractor.dtype == fitted_in
    annotator.close()
    started = []
    monkeypatch.setattr(probe_stage.VLLMActivationExtractor, "start",
                        lambda model, spec, **kwargs: started.append(kwargs["dtype"]))
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object())
    probe_stage.apply_extractor(ProbeApplyConfig(path=str(out), dtype=fitted_in),
                                str(tiny_model_dir), ActivationSpec(layers=(1,)),
                                max_prompt_tokens=10, fitted_dtype=fitted_in)
    assert started == [fitted_in]
    # ... and refuses another one before loading the policy, saying what to set
    with pytest.raises(ProbeError, match=f"'activation_dtype' is '{fitted_in}'.*in {other}.*"
                       f"set probe.dtype: {fitted_in}"):
        probe_stage.ProbeAnnotator(ProbeApplyConfig(path=str(out), dtype=other),
                                   str(tiny_model_dir))
    assert started == [fitted_in]
