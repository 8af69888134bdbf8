"""annotate's `reference` section: the three token columns in the shards, with provenance."""

import json

import numpy as np
import polars as pl
import pytest

from safekeel.annotate import reference_stage
from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.reference_logprobs import (
    REF_TARGET_COLUMN,
    REF_TOPK_IDS_COLUMN,
    REF_TOPK_LOGPROBS_COLUMN,
    TransformersReferenceScorer,
)
from safekeel.annotate.reference_stage import reference_provenance_of
from safekeel.annotate.run import annotate
from safekeel.data.config import ConfigError, from_dict
from safekeel.data.models import load_causal_lm
from safekeel.data.shards import ManifestError, ShardReader, read_shard_metadata
from safekeel.data.tokenization import TokenizationConfig, TokenizationIssue, tokenize_example

TOP_K = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = [{"prompt": f"What is 7 times {i}?", "response": f"Seven times {i} is {7 * i}."}
            for i in range(9)]
    rows[4] = {"prompt": "a prompt " * 40, "response": "too long to train on"}  # no values
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(corpus, policy, out, **reference):
    return from_dict(AnnotateConfig, {
        "corpus": {"path": str(corpus)}, "policy": str(policy), "output_dir": str(out),
        "rows_per_shard": 4, "row_group_size": 2, "tokenization": {"max_length": 48},
        "reference": {"enabled": True, "backend": "transformers", "top_k": TOP_K,
                      **reference}})


def read_rows(out):
    return pl.read_parquet(str(out / "shard-*.parquet")).sort("id")


def test_annotate_writes_the_reference_columns(corpus, tiny_model_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "out"
    annotate(config(corpus, tiny_model_dir, out))
    rows = read_rows(out)
    reader = ShardReader(out)
    assert {REF_TARGET_COLUMN, REF_TOPK_IDS_COLUMN, REF_TOPK_LOGPROBS_COLUMN} <= set(
        reader.schema.names)

    # the same numbers as the scorer run directly on training's tokenisation
    tokenization = TokenizationConfig(max_length=48)
    scorer = TransformersReferenceScorer(load_causal_lm(tiny_model_dir, dtype="float32"),
                                         top_k=TOP_K, pad_token_id=tiny_tokenizer.pad_token_id)
    skipped = 0
    for row in rows.iter_rows(named=True):
        example = tokenize_example(tiny_tokenizer, row["messages"], tokenization)
        if isinstance(example, TokenizationIssue):
            skipped += 1
            assert row[REF_TARGET_COLUMN] is None and row[REF_TOPK_IDS_COLUMN] is None
            continue
        (want,) = scorer.score([example])
        np.testing.assert_allclose(row[REF_TARGET_COLUMN], want.target_logprob, atol=1e-6)
        np.testing.assert_array_equal(np.array(row[REF_TOPK_IDS_COLUMN]), want.topk_ids)
        np.testing.assert_allclose(np.array(row[REF_TOPK_LOGPROBS_COLUMN]),
                                   want.topk_logprobs, atol=1e-6)
    assert skipped == 1

    # provenance: in every shard's footer and in the manifest
    for path in reader.files:
        stored = reference_provenance_of(read_shard_metadata(path)[1])
        assert stored is not None and stored.top_k == TOP_K
        assert (stored.compute_dtype, stored.backend) == ("float32", "transformers")
        assert stored.tokenization["max_length"] == 48
    assert reference_provenance_of(reader.provenance) == stored


def test_a_rerun_with_another_top_k_is_refused(corpus, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = reference_stage.ReferenceAnnotator.annotate
    calls = []

    def crash_on_second(self, examples):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(self, examples)

    with monkeypatch.context() as patch:
        patch.setattr(reference_stage.ReferenceAnnotator, "annotate", crash_on_second)
        with pytest.raises(RuntimeError, match="simulated crash"):
            annotate(config(corpus, tiny_model_dir, out))
    with pytest.raises(ManifestError, match="different provenance"):
        annotate(config(corpus, tiny_model_dir, out, top_k=TOP_K + 1))
    # the same settings resume, and give what one uninterrupted run gives
    annotate(config(corpus, tiny_model_dir, out))
    clean = tmp_path / "clean"
    annotate(config(corpus, tiny_model_dir, clean))
    assert read_rows(out).equals(read_rows(clean))


def test_a_rerun_with_another_attention_kernel_is_refused(corpus, tiny_model_dir, tmp_path):
    """The kernel decides the stored values: the provenance records the one that ran (auto
    is eager on a CPU, as in training), and a rerun with another is refused by it."""
    out = tmp_path / "out"
    annotate(config(corpus, tiny_model_dir, out))
    assert reference_provenance_of(ShardReader(out).provenance).attn_implementation == "eager"
    with pytest.raises(ManifestError, match="different provenance"):
        annotate(config(corpus, tiny_model_dir, out, attn_implementation="sdpa"))
    # eager is what auto ran: the same provenance, so the finished run is simply reused
    annotate(config(corpus, tiny_model_dir, out, attn_implementation="eager"))


def test_auto_backend_is_vllm_only_where_installed(monkeypatch):
    from safekeel.data import engines

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    assert reference_stage.resolve_reference_backend("auto") == "transformers"
    with pytest.raises(ConfigError, match="reference.backend: 'vllm' but vllm is not installed"):
        reference_stage.resolve_reference_backend("vllm")
    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    assert reference_stage.resolve_reference_backend("auto") == "vllm"


_RUN = """
import sys, yaml
from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.run import annotate
from safekeel.data.config import from_dict
annotate(from_dict(AnnotateConfig, yaml.safe_load(open(sys.argv[1]))))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_writes_the_transformers_values(corpus, tiny_model_dir, tmp_path):
    """In a subprocess: an in-process engine changes process-wide state."""
    import os
    import subprocess
    import sys

    import yaml

    pytest.importorskip("vllm")
    outputs = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / backend
        settings = {"corpus": {"path": str(corpus)}, "policy": str(tiny_model_dir),
                    "output_dir": str(out), "rows_per_shard": 4,
                    "tokenization": {"max_length": 48},
                    "reference": {"enabled": True, "backend": backend, "top_k": TOP_K}}
        path = tmp_path / f"{backend}.yaml"
        path.write_text(yaml.safe_dump(settings))
        script = tmp_path / "run.py"
        script.write_text(_RUN)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        done = subprocess.run([sys.executable, str(script), str(path)], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[backend] = read_rows(out)
        stored = reference_provenance_of(ShardReader(out).provenance)
        assert stored.backend == backend and stored.compute_dtype == "float32"
    ref, got = outputs["transformers"], outputs["vllm"]
    for a, b in zip(got[REF_TARGET_COLUMN].to_list(), ref[REF_TARGET_COLUMN].to_list(),
                    strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-4)
    for a, b in zip(got[REF_TOPK_LOGPROBS_COLUMN].to_list(),
                    ref[REF_TOPK_LOGPROBS_COLUMN].to_list(), strict=True):
        if a is not None:
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


@pytest.mark.parametrize("eager", ["auto", True, False])
def test_the_reference_engine_gets_enforce_eager_as_configured(eager, tiny_model_dir,
                                                               tiny_tokenizer, monkeypatch):
    """The recipe sets `reference.enforce_eager: true`: a compiled engine's ~5 min start-up
    does not pay for scoring one corpus on a CPU."""
    from safekeel.data import engines

    started = []

    class Stop(Exception):
        pass

    def fake_start(spec):
        started.append(spec)
        raise Stop

    monkeypatch.setattr(engines, "start_engine", fake_start)
    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    cfg = reference_stage.ReferenceConfig(enabled=True, backend="vllm", enforce_eager=eager)
    with pytest.raises(Stop):
        reference_stage.ReferenceAnnotator(cfg, str(tiny_model_dir), tiny_tokenizer,
                                           TokenizationConfig(max_length=64))
    assert started[0].enforce_eager == eager
    assert started[0].needed_tokens == 65
