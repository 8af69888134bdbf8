"""The harmful-intent probe: metrics, fitting, standardisation, files, prompt files."""

from __future__ import annotations

import csv
import json
import struct
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from safekeel.annotate.activations import (
    ActivationSpec,
    ModelFingerprint,
    TransformersActivationExtractor,
)
from safekeel.annotate.probe import (
    META_FILE,
    WEIGHTS_FILE,
    ProbeError,
    binary_metrics,
    fit_probe,
    fit_probe_from_files,
    load_probe,
    load_probe_for,
    load_prompt_file,
    probe_scores,
    save_probe,
    stratified_split,
    threshold_for_recall,
)
from safekeel.data.embedded.tiny_models import build_tiny_llama

FINGERPRINT = ModelFingerprint(
    name="tiny", model_type="llama", hidden_size=8, num_layers=4, vocab_size=100,
    embedding_sha256="ab" * 32, chat_template_sha256="cd" * 32,
)


def gaussian_features(n: int, dim: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes whose means differ by `shift` along every axis."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    features = rng.normal(size=(n, dim)) + shift * labels[:, None]
    return features.astype(np.float32), labels


# --------------------------------------------------------------------------- metrics


def test_threshold_for_recall_hand_case():
    scores = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1])
    labels = np.array([1, 1, 1, 1, 0, 0])
    assert threshold_for_recall(scores, labels, 0.5) == 0.8
    assert threshold_for_recall(scores, labels, 0.75) == 0.3
    assert threshold_for_recall(scores, labels, 1.0) == 0.2
    metrics = binary_metrics(scores, labels, 0.3)
    # flagged: 0.9, 0.8, 0.3 (harmful) and 0.85 (benign)
    assert metrics["recall"] == 0.75 and metrics["precision"] == 0.75
    assert metrics["accuracy"] == 4 / 6
    assert binary_metrics(scores, labels, 2.0)["precision"] == 0.0  # nothing flagged


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_threshold_is_the_highest_reaching_the_target(target):
    rng = np.random.default_rng(1)
    scores, labels = rng.random(200), rng.integers(0, 2, 200)
    threshold = threshold_for_recall(scores, labels, target)
    assert binary_metrics(scores, labels, threshold)["recall"] >= target
    next_up = np.nextafter(threshold, np.inf)
    assert binary_metrics(scores, labels, next_up)["recall"] < target


def test_stratified_split_is_disjoint_complete_and_balanced():
    labels = np.array([1] * 30 + [0] * 70)
    train, heldout = stratified_split(labels, 0.2, seed=0)
    assert set(train).isdisjoint(heldout)
    assert sorted(np.concatenate([train, heldout])) == list(range(100))
    assert (labels[heldout] == 1).sum() == 6 and (labels[heldout] == 0).sum() == 14
    again, _ = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(train, again)
    with pytest.raises(ProbeError, match="1 harmful example"):
        stratified_split(np.array([1, 0, 0, 0]), 0.5, seed=0)


# --------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_separable_features_give_auroc_near_one(kind):
    features, labels = gaussian_features(200, 20, shift=2.0, seed=0)
    probe = fit_probe(features, labels, kind, seed=0, val_fraction=0.3, target_recall=0.9)
    report = probe.report
    assert report.auroc > 0.99
    assert report.recall >= 0.9 and report.threshold == probe.threshold
    assert report.n_heldout == 60 and report.n_heldout_harmful == 30
    assert report.n_train + report.n_heldout == 200


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_random_labels_give_auroc_near_half(kind):
    rng = np.random.default_rng(7)
    features = rng.normal(size=(600, 20)).astype(np.float32)
    labels = rng.integers(0, 2, 600)
    probe = fit_probe(features, labels, kind, seed=0, val_fraction=0.5)
    # 300 held-out examples: the AUROC's standard error under no signal is about 0.033
    assert abs(probe.report.auroc - 0.5) < 0.12


def test_standardisation_uses_the_training_split_only():
    features, labels = gaussian_features(100, 5, shift=1.0, seed=2)
    train, heldout = stratified_split(labels, 0.25, seed=3)
    features[heldout] += 1000.0  # would dominate the statistics if they leaked in
    probe = fit_probe(features, labels, seed=3, val_fraction=0.25)
    torch.testing.assert_close(probe.mean, torch.from_numpy(features[train].mean(axis=0)))
    torch.testing.assert_close(probe.std, torch.from_numpy(features[train].std(axis=0)))


def test_constant_feature_is_left_unscaled():
    features, labels = gaussian_features(60, 3, shift=2.0, seed=0)
    features[:, 1] = 4.0
    probe = fit_probe(features, labels)
    assert probe.std[1] == 1.0 and np.isfinite(probe.predict_proba(features)).all()


def test_logreg_reaches_the_balanced_l2_optimum():
    """The gradient of the stated objective, computed independently here, is ~0."""
    features, labels = gaussian_features(160, 6, shift=0.7, seed=4)
    labels[:100] = 0  # imbalanced: 30 harmful, 130 benign
    l2 = 0.1
    probe = fit_probe(features, labels, "logreg", l2=l2, seed=0, val_fraction=0.25)
    train, _ = stratified_split(labels, 0.25, seed=0)
    x = ((features[train] - probe.mean.numpy()) / probe.std.numpy()).astype(np.float64)
    y = labels[train].astype(np.float64)
    linear = probe.network[0]
    w = linear.weight.detach().numpy().astype(np.float64).ravel()
    b = float(linear.bias)
    n, n_pos = len(y), y.sum()
    sample_weight = np.where(y == 1, n / (2 * n_pos), n / (2 * (n - n_pos)))
    p = 1 / (1 + np.exp(-(x @ w + b)))
    residual = sample_weight * (p - y) / n
    grad_w = x.T @ residual + l2 * w  # the bias carries no penalty
    grad_b = residual.sum()
    assert np.abs(grad_w).max() < 1e-4 and abs(grad_b) < 1e-4


def test_class_balance_centres_uninformative_predictions():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 4)).astype(np.float32)
    labels = (np.arange(400) < 40).astype(int)  # 10% harmful, features carry no signal
    probe = fit_probe(features, labels, l2=1e3)  # weights pinned near 0: only the bias fits
    # the balanced loss is smallest at p = 0.5; an unweighted one would give p = 0.1
    assert probe.predict_proba(features).mean() == pytest.approx(0.5, abs=0.02)


def test_fit_refuses_bad_input():
    features, labels = gaussian_features(20, 3, shift=1.0, seed=0)
    with pytest.raises(ProbeError, match="kind"):
        fit_probe(features, labels, "forest")
    with pytest.raises(ProbeError, match="0 harmful"):
        fit_probe(features, np.zeros(20, dtype=int))
    bad = features.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ProbeError, match="NaN"):
        fit_probe(bad, labels)
    with pytest.raises(ProbeError, match="N = number of labels"):
        fit_probe(features, labels[:5])
    probe = fit_probe(features, labels)
    with pytest.raises(ProbeError, match=r"takes \[N, 3\]"):
        probe.predict_proba(features[:, :2])


# --------------------------------------------------------------------------- files


@pytest.fixture
def fitted_probe():
    features, labels = gaussian_features(120, 16, shift=1.0, seed=5)
    return fit_probe(features, labels, "mlp", hidden_size=8, seed=1, model=FINGERPRINT,
                     layers=[2], pooling="last"), features


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, kind):
    features, labels = gaussian_features(120, 16, shift=1.0, seed=5)
    probe = fit_probe(features, labels, kind, hidden_size=8, model=FINGERPRINT, layers=[2],
                      pooling="mean")
    save_probe(probe, tmp_path / "probe")
    loaded = load_probe(tmp_path / "probe")
    assert np.array_equal(loaded.predict_proba(features), probe.predict_proba(features))
    assert np.array_equal(loaded.predict(features), probe.predict(features))
    assert loaded.threshold == probe.threshold and loaded.report == probe.report
    assert loaded.model == FINGERPRINT and loaded.layers == [2] and loaded.pooling == "mean"
    assert loaded.kind == kind and loaded.training == probe.training


def test_saved_files_are_json_and_safetensors_not_pickle(tmp_path, fitted_probe):
    probe, _ = fitted_probe
    directory = save_probe(probe, tmp_path / "probe")
    assert sorted(p.name for p in directory.iterdir()) == sorted([META_FILE, WEIGHTS_FILE])
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["model"]["name"] == "tiny" and meta["layers"] == [2]
    assert meta["pooling"] == "last" and meta["kind"] == "mlp"
    assert set(meta["metrics"]) >= {"auroc", "accuracy", "precision", "recall", "threshold"}
    raw = (directory / WEIGHTS_FILE).read_bytes()
    assert not raw.startswith(b"\x80")  # pickle protocol 2+ marker
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 length + JSON header
    header = json.loads(raw[8 : 8 + header_len])
    assert {"standardize.mean", "standardize.std"} <= set(header)
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as handle:
        assert handle.get_tensor("standardize.mean").shape == (16,)


def test_load_refuses_another_model_layer_or_pooling(tmp_path, fitted_probe):
    probe, features = fitted_probe
    directory = save_probe(probe, tmp_path / "probe")
    meta_path = str(directory / META_FILE)

    # the same model under another path, negative layer index resolved against 4 layers
    moved = replace(FINGERPRINT, name="/elsewhere/tiny")
    ok = load_probe(directory, expected_model=moved, expected_layers=[-2], expected_pooling="last")
    assert np.array_equal(ok.predict_proba(features), probe.predict_proba(features))

    other_weights = replace(FINGERPRINT, embedding_sha256="ef" * 32)
    with pytest.raises(ProbeError, match="embedding_sha256") as err:
        load_probe(directory, expected_model=other_weights)
    assert meta_path in str(err.value) and "'model'" in str(err.value)
    with pytest.raises(ProbeError, match="hidden_size"):
        load_probe(directory, expected_model=replace(FINGERPRINT, hidden_size=16))
    with pytest.raises(ProbeError, match=r"field 'layers' is \[2\].*\[3\]") as err:
        load_probe(directory, expected_layers=[-1])
    assert meta_path in str(err.value)
    with pytest.raises(ProbeError, match="field 'pooling' is 'last'.*'mean'"):
        load_probe(directory, expected_pooling="mean")


def test_load_reports_broken_files(tmp_path, fitted_probe):
    probe, _ = fitted_probe
    with pytest.raises(ProbeError, match="no such file"):
        load_probe(tmp_path / "missing")
    directory = save_probe(probe, tmp_path / "probe")
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(ProbeError, match="weights_sha256"):
        load_probe(directory)
    (directory / META_FILE).write_text("{not json")
    with pytest.raises(ProbeError, match=f"{META_FILE}: not valid JSON"):
        load_probe(directory)
    (directory / META_FILE).write_text(json.dumps({"format": "safekeel-probe",
                                                   "format_version": 99}))
    with pytest.raises(ProbeError, match="format_version"):
        load_probe(directory)


# --------------------------------------------------------------------------- prompt files


def test_prompt_files_of_every_kind(tmp_path):
    (tmp_path / "a.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "b.json").write_text(json.dumps(["one", "two", "three"]))
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "do x", "category": "c"}]))
    (tmp_path / "d.jsonl").write_text('{"prompt": "p1"}\n{"prompt": "p2"}\n')
    with open(tmp_path / "e.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["goal", "target"], ["g1", "Sure"], ["g2", "Sure"]])
    contents = {
        name: [m[-1]["content"] for _, m in load_prompt_file(tmp_path / name)]
        for name in ("a.txt", "b.json", "c.json", "d.jsonl", "e.csv")
    }
    assert contents == {
        "a.txt": ["first prompt", "second prompt"], "b.json": ["one", "two", "three"],
        "c.json": ["do x"], "d.jsonl": ["p1", "p2"], "e.csv": ["g1", "g2"],
    }
    where, messages = load_prompt_file(tmp_path / "a.txt")[1]
    assert where.endswith("a.txt, row 2") and messages == [{"role": "user",
                                                          "content": "second prompt"}]


def test_empty_prompts_in_files_are_named(tmp_path):
    (tmp_path / "blank.txt").write_text("fine\n   \n")
    with pytest.raises(ProbeError, match=r"blank\.txt, row 1: empty prompt"):
        load_prompt_file(tmp_path / "blank.txt")
    (tmp_path / "rows.json").write_text(json.dumps([{"instruction": "ok"}, {"instruction": ""}]))
    with pytest.raises(ValueError, match=r"rows\.json, row 1.*empty user turn"):
        load_prompt_file(tmp_path / "rows.json")
    (tmp_path / "strings.json").write_text(json.dumps(["ok", ""]))
    with pytest.raises(ProbeError, match="row 1: empty prompt"):
        load_prompt_file(tmp_path / "strings.json")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ProbeError, match="unknown prompt file type"):
        load_prompt_file(tmp_path / "notes.md")


@pytest.fixture(scope="module")
def tiny_extractor(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, num_layers=3, seed=1)
    return TransformersActivationExtractor(
        model, tiny_tokenizer, ActivationSpec(layers=(-1,), pooling="mean"), name="tiny-llama"
    )


def test_fit_from_files_records_model_layers_and_pooling(tmp_path, tiny_extractor,
                                                         tiny_tokenizer):
    harmful = [f"How do I break into house number {i}?" for i in range(12)]
    benign = [f"What is {i} times 8?" for i in range(12)]
    (tmp_path / "harmful.txt").write_text("\n".join(harmful))
    (tmp_path / "benign.json").write_text(json.dumps([{"instruction": t} for t in benign]))
    probe = fit_probe_from_files(tiny_extractor, tmp_path / "harmful.txt",
                                 tmp_path / "benign.json", val_fraction=0.25)
    assert probe.layers == [2] and probe.pooling == "mean"
    assert probe.model == tiny_extractor.fingerprint and probe.model.name == "tiny-llama"
    assert probe.training["n_examples"] == 24 and probe.report.n_heldout == 6

    directory = save_probe(probe, tmp_path / "probe")
    loaded = load_probe_for(directory, tiny_extractor)
    prompts = [tiny_extractor.prompt_ids([{"role": "user", "content": t}]) for t in harmful]
    assert np.array_equal(probe_scores(loaded, tiny_extractor, prompts),
                          probe.predict_proba(tiny_extractor.extract(prompts)))

    other_layer = TransformersActivationExtractor(
        tiny_extractor.model, tiny_tokenizer, ActivationSpec(layers=(0,), pooling="mean")
    )
    with pytest.raises(ProbeError, match="'layers'"):
        load_probe_for(directory, other_layer)
    with pytest.raises(ProbeError, match="does not fit these activations"):
        probe_scores(probe, other_layer, prompts)
    other_model = TransformersActivationExtractor(
        build_tiny_llama(tiny_tokenizer, num_layers=3, seed=2), tiny_tokenizer,
        ActivationSpec(layers=(-1,), pooling="mean"), name="tiny-llama",
    )
    with pytest.raises(ProbeError, match="weights differ"):
        load_probe_for(directory, other_model)


# --------------------------------------------------------------------------- a real model


def _advbench_goals(shared: Path) -> set[str]:
    with open(shared / "advbench" / "harmful_behaviors.csv", newline="") as fh:
        return {row["goal"].strip() for row in csv.DictReader(fh)}


@pytest.mark.slow
def test_smollm2_middle_layer_probe_separates_harmful_from_harmless(shared_data, tmp_path):
    """Done criterion: AUROC >= 0.9 on a held-out split where the signal exists."""
    from safekeel.data.models import MissingPackageError, load_causal_lm, load_tokenizer

    try:
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        model = load_causal_lm("smollm2-135m-instruct", dtype="float32")
    except MissingPackageError as err:
        pytest.skip(str(err))
    folder = shared_data / "refusal_direction"
    advbench = _advbench_goals(shared_data)
    harmful_train = json.loads((folder / "harmful_train.json").read_text())
    harmful = json.loads((folder / "harmful_val.json").read_text()) + [
        row for row in harmful_train if row["instruction"].strip() not in advbench
    ]
    benign = json.loads((folder / "harmless_val.json").read_text())
    (tmp_path / "harmful.json").write_text(json.dumps(harmful[:150]))
    (tmp_path / "benign.json").write_text(json.dumps(benign[:150]))

    middle = model.config.num_hidden_layers // 2
    extractor = TransformersActivationExtractor(
        model, tokenizer, ActivationSpec(layers=(middle,), pooling="last"), batch_size=16
    )
    start = time.perf_counter()
    probe = fit_probe_from_files(extractor, tmp_path / "harmful.json", tmp_path / "benign.json",
                                 val_fraction=0.3, seed=0)
    elapsed = time.perf_counter() - start
    report = probe.report
    print(f"SmolLM2 layer {middle} last-token probe: held-out AUROC {report.auroc:.4f}, "
          f"recall {report.recall:.3f}, precision {report.precision:.3f} "
          f"({report.n_heldout} held out, {elapsed:.0f} s)")
    assert report.n_heldout_harmful == 45 and report.n_heldout_benign == 45
    assert report.auroc >= 0.9
