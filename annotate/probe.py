"""A harmful-intent probe: a small classifier on a policy model's prompt activations.

Two kinds, both in torch:

* `logreg`: L2-regularised logistic regression with class-balanced weights, fitted full-batch
  with L-BFGS;
* `mlp`: one hidden ReLU layer, fitted full-batch with Adam and the same loss and penalty.

Features are standardised with the mean and standard deviation of the training split only.
A stratified held-out split gives the report: AUROC, and accuracy, precision and recall at
the decision threshold, which is the highest score that still reaches the target recall on
that split. A fitted probe is two files, never a pickle:

* `probe.safetensors`: the network weights and the standardisation tensors;
* `probe.json`: the model it belongs to (name, shape, weight hash), the layers, pooling and
  dtype of its features (`activation_dtype`: the policy's compute dtype while they were
  read), the prompt formats it was fitted on (`formats`, annotate.probe_formats), the
  threshold, the metrics (with the held-out AUROC per format), and the training settings.

`load_probe` refuses a probe made for another model, other layers, another pooling or
another activation dtype: the standardisation and the threshold were fitted on features
read in one dtype, and features read in another (bfloat16 against float32) shift the scores
near the threshold. A probe file without `activation_dtype` is not checked for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from safekeel.annotate.activations import ActivationSpec, ModelFingerprint, prompt_messages
from safekeel.annotate.probe_formats import PLAIN_FORMAT, PromptFormat
from safekeel.data.auroc import auroc, checked_scores_labels
from safekeel.data.files import file_sha256

ProbeKind = Literal["logreg", "mlp"]
PROBE_KINDS: tuple[str, ...] = ("logreg", "mlp")
FORMAT_NAME = "safekeel-probe"
FORMAT_VERSION = 1
WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"
PROMPT_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")

# A feature that never varies in the training split is left unscaled instead of divided by ~0.
_MIN_STD = 1e-6


class ProbeError(ValueError):
    """A bad probe input or file: wrong shapes, too few examples, mismatched model or layers."""


# --------------------------------------------------------------------------- metrics


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        return checked_scores_labels(scores, labels)
    except ValueError as error:
        raise ProbeError(str(error)) from None


def threshold_for_recall(scores: np.ndarray, labels: np.ndarray, target_recall: float) -> float:
    """The highest threshold t with recall(score >= t) >= target_recall."""
    scores, labels = _check_scores_labels(scores, labels)
    if not 0.0 < target_recall <= 1.0:
        raise ProbeError(f"target_recall must be in (0, 1], got {target_recall}")
    positives = np.sort(scores[labels])[::-1]
    if positives.size == 0:
        raise ProbeError("a recall threshold needs at least one positive example")
    needed = math.ceil(target_recall * positives.size - 1e-9)
    return float(positives[max(needed, 1) - 1])


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision and recall of `score >= threshold` (precision 0 if nothing flagged)."""
    scores, labels = _check_scores_labels(scores, labels)
    flagged = scores >= threshold
    tp = int((flagged & labels).sum())
    fp = int((flagged & ~labels).sum())
    fn = int((~flagged & labels).sum())
    tn = int((~flagged & ~labels).sum())
    return {
        "accuracy": (tp + tn) / max(len(labels), 1),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "true_positives": tp,
        "false_positives": fp,
        "true_negatives": tn,
        "false_negatives": fn,
    }


@dataclass
class ProbeReport:
    """Held-out quality of a probe; `threshold` is the decision threshold it uses."""

    auroc: float
    accuracy: float
    precision: float
    recall: float
    threshold: float
    target_recall: float
    train_auroc: float
    n_train: int
    n_heldout: int
    n_heldout_harmful: int
    n_heldout_benign: int
    confusion: dict[str, int] = field(default_factory=dict)
    # held-out AUROC and size of each prompt format (format augmentation), by format name
    per_format: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeReport:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


# --------------------------------------------------------------------------- the probe


def build_network(kind: str, feature_dim: int, hidden_size: int = 64) -> nn.Sequential:
    """The classifier that maps standardised features to one logit."""
    if kind == "logreg":
        return nn.Sequential(nn.Linear(feature_dim, 1))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(feature_dim, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1)
        )
    raise ProbeError(f"kind={kind!r}: expected one of {list(PROBE_KINDS)}")


@dataclass(eq=False)  # holds tensors and a module: compare predictions, not objects
class Probe:
    """A fitted probe: standardisation, network, threshold, and what its features are."""

    kind: str
    network: nn.Sequential
    mean: torch.Tensor
    std: torch.Tensor
    threshold: float
    report: ProbeReport | None = None
    model: ModelFingerprint | None = None
    layers: list[int] | str | None = None  # resolved layer indices, or "all"
    pooling: str | None = None
    hidden_size: int = 0  # of the MLP; 0 for logreg
    training: dict[str, Any] = field(default_factory=dict)
    activation_dtype: str | None = None  # the policy's dtype while features were read
    # the prompt formats it was fitted on (`PromptFormat.to_dict`); plain chat by default
    formats: list[dict[str, str]] = field(default_factory=lambda: [PLAIN_FORMAT.to_dict()])

    @property
    def feature_dim(self) -> int:
        return int(self.mean.numel())

    def _logits(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ProbeError(
                f"features of shape {tuple(x.shape)}: this probe takes [N, {self.feature_dim}] "
                f"(layers {self.layers}, pooling {self.pooling})"
            )
        if not torch.isfinite(x).all():
            raise ProbeError("features contain NaN or infinite values")
        with torch.no_grad():
            return self.network((x - self.mean) / self.std).squeeze(-1)

    def predict_proba(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Probability that each prompt is harmful, [N] float32."""
        return torch.sigmoid(self._logits(features)).numpy()

    def predict(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Whether each prompt is flagged harmful at the probe's threshold, [N] bool."""
        return self.predict_proba(features) >= self.threshold


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out indices, each class split in the same proportion.

    With `groups` (one id per row, e.g. the prompt a rendering came from) whole groups are
    split, so the renderings of one prompt never straddle the split; without, every row is
    its own group.
    """
    if groups is not None:
        groups = np.asarray(groups).reshape(-1)
        if groups.shape != np.asarray(labels).reshape(-1).shape:
            raise ProbeError(f"{groups.size} groups but {np.asarray(labels).size} labels")
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        group_labels = np.asarray(labels)[first]
        if not np.array_equal(group_labels[inverse], np.asarray(labels)):
            raise ProbeError("the rows of one prompt carry different labels")
        train_groups, heldout_groups = stratified_split(group_labels, val_fraction, seed)
        return (np.flatnonzero(np.isin(inverse, train_groups)),
                np.flatnonzero(np.isin(inverse, heldout_groups)))
    if not 0.0 < val_fraction < 1.0:
        raise ProbeError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        name = "harmful" if cls else "benign"
        if members.size < 2:
            raise ProbeError(
                f"{members.size} {name} example(s): need at least 2 per class (train + held-out)"
            )
        members = rng.permutation(members)
        n_heldout = min(max(1, round(members.size * val_fraction)), members.size - 1)
        heldout.append(members[:n_heldout])
        train.append(members[n_heldout:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(heldout))


def _balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-example weights n / (2 n_class): both classes weigh the same in total."""
    n = labels.numel()
    n_pos = labels.sum()
    return torch.where(labels > 0.5, n / (2 * n_pos), n / (2 * (n - n_pos)))


def _penalised_loss(
    network: nn.Sequential, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, l2: float
) -> torch.Tensor:
    logits = network(x).squeeze(-1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weights)
    # Biases are not penalised: the class prior should not be pulled towards zero.
    penalty = sum(m.weight.pow(2).sum() for m in network if isinstance(m, nn.Linear))
    return loss + 0.5 * l2 * penalty


def _train(
    network: nn.Sequential, x: torch.Tensor, y: torch.Tensor, kind: str, l2: float,
    max_steps: int, learning_rate: float,
) -> None:
    weights = _balanced_weights(y)
    if kind == "logreg":
        # Convex and small: L-BFGS converges in tens of iterations on the full batch.
        optimizer = torch.optim.LBFGS(
            network.parameters(), max_iter=max_steps, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-10, history_size=20,
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = _penalised_loss(network, x, y, weights, l2)
            loss.backward()
            return loss

        optimizer.step(closure)
        return
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    for _ in range(max_steps):
        optimizer.zero_grad()
        _penalised_loss(network, x, y, weights, l2).backward()
        optimizer.step()


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run with `num_threads` intra-op threads, restoring the setting afterwards.

    Full-batch probe training is hundreds of small ops; on a 2-core machine shared with
    other work, two threads made an MLP fit 6-20x slower than one (thread hand-offs
    dominate), so the default is one.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous)


def fit_probe(
    features: np.ndarray,
    labels: np.ndarray,
    kind: str = "logreg",
    *,
    l2: float = 1e-2,
    hidden_size: int = 64,
    max_steps: int | None = None,
    learning_rate: float = 1e-3,
    seed: int = 0,
    val_fraction: float = 0.25,
    target_recall: float = 0.9,
    model: ModelFingerprint | None = None,
    layers: Sequence[int] | str | None = None,
    pooling: str | None = None,
    num_threads: int | None = 1,
    groups: np.ndarray | None = None,
    formats: Sequence[str] | None = None,
) -> Probe:
    """Fit a probe on `features` [N, D] and `labels` [N] (1 harmful, 0 benign).

    A stratified `val_fraction` of each class is held out (by `groups` when given: the
    prompt each row renders, so a prompt's renderings stay on one side); the standardisation
    and the network see only the rest. `formats` names each row's prompt format; the report
    then gives the held-out AUROC of each. The threshold reaches `target_recall` on the held-out part,
    where all reported metrics are measured. `max_steps` defaults to 200 L-BFGS iterations
    (logreg) or 500 Adam steps (mlp). `model`, `layers` (resolved indices) and `pooling`
    describe where the features came from; they are saved with the probe. Training runs on
    `num_threads` torch threads (None: leave the setting alone).
    """
    if kind not in PROBE_KINDS:
        raise ProbeError(f"kind={kind!r}: expected one of {list(PROBE_KINDS)}")
    x_all = np.asarray(features, dtype=np.float32)
    y_all = np.asarray(labels).reshape(-1)
    if x_all.ndim != 2 or x_all.shape[0] != y_all.size:
        raise ProbeError(
            f"features must be [N, D] with N = number of labels; got {x_all.shape} and "
            f"{y_all.size} labels"
        )
    if not np.isin(y_all, (0, 1)).all():
        raise ProbeError("labels must be 0 (benign) or 1 (harmful)")
    if not np.isfinite(x_all).all():
        raise ProbeError("features contain NaN or infinite values")
    if l2 < 0:
        raise ProbeError(f"l2 must be >= 0, got {l2}")
    if kind == "mlp" and hidden_size < 1:
        raise ProbeError(f"hidden_size must be >= 1 for the mlp, got {hidden_size}")
    max_steps = max_steps if max_steps is not None else (200 if kind == "logreg" else 500)

    if formats is not None and len(formats) != y_all.size:
        raise ProbeError(f"{len(formats)} format names but {y_all.size} labels")
    train_idx, heldout_idx = stratified_split(y_all.astype(int), val_fraction, seed, groups)
    x_train = torch.from_numpy(x_all[train_idx])
    y_train = torch.from_numpy(y_all[train_idx].astype(np.float32))
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False)
    std = torch.where(std < _MIN_STD, torch.ones_like(std), std)

    with torch.random.fork_rng(devices=[]), _torch_threads(num_threads):
        torch.manual_seed(seed)
        network = build_network(kind, x_all.shape[1], hidden_size)
        _train(network, (x_train - mean) / std, y_train, kind, l2, max_steps, learning_rate)
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)

    probe = Probe(
        kind=kind, network=network, mean=mean, std=std, threshold=0.5, model=model,
        layers=layers if isinstance(layers, str) or layers is None else [int(i) for i in layers],
        pooling=pooling, hidden_size=hidden_size if kind == "mlp" else 0,
        training={"l2": l2, "max_steps": max_steps, "learning_rate": learning_rate,
                  "seed": seed, "val_fraction": val_fraction, "n_examples": int(y_all.size)},
    )
    heldout_scores = probe.predict_proba(x_all[heldout_idx])
    heldout_labels = y_all[heldout_idx]
    probe.threshold = threshold_for_recall(heldout_scores, heldout_labels, target_recall)
    at_threshold = binary_metrics(heldout_scores, heldout_labels, probe.threshold)
    probe.report = ProbeReport(
        auroc=auroc(heldout_scores, heldout_labels),
        accuracy=at_threshold["accuracy"],
        precision=at_threshold["precision"],
        recall=at_threshold["recall"],
        threshold=probe.threshold,
        target_recall=target_recall,
        train_auroc=auroc(probe.predict_proba(x_all[train_idx]), y_all[train_idx]),
        n_train=int(train_idx.size),
        n_heldout=int(heldout_idx.size),
        n_heldout_harmful=int((heldout_labels == 1).sum()),
        n_heldout_benign=int((heldout_labels == 0).sum()),
        confusion={
            k: v for k, v in at_threshold.items() if k.endswith(("positives", "negatives"))
        },
        per_format=_per_format_auroc(heldout_scores, heldout_labels,
                                     np.asarray(formats, dtype=object)[heldout_idx])
        if formats is not None else {},
    )
    return probe


def _per_format_auroc(scores: np.ndarray, labels: np.ndarray,
                      names: np.ndarray) -> dict[str, dict[str, Any]]:
    """Held-out AUROC of each format's rows (None where a format lacks a class there)."""
    report = {}
    for name in dict.fromkeys(names.tolist()):  # first-seen order
        mask = names == name
        both = 0 < int(labels[mask].sum()) < int(mask.sum())
        report[name] = {"auroc": auroc(scores[mask], labels[mask]) if both else None,
                        "n_heldout": int(mask.sum())}
    return report


# --------------------------------------------------------------------------- files


def save_probe(probe: Probe, directory: str | Path) -> Path:
    """Write `probe.safetensors` and `probe.json` into `directory`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"standardize.mean": probe.mean, "standardize.std": probe.std}
    tensors.update({f"network.{k}": v for k, v in probe.network.state_dict().items()})
    weights_path = directory / WEIGHTS_FILE
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(weights_path))
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": probe.kind,
        "feature_dim": probe.feature_dim,
        "hidden_size": probe.hidden_size,
        "model": probe.model.to_dict() if probe.model is not None else None,
        "layers": probe.layers,
        "pooling": probe.pooling,
        "activation_dtype": probe.activation_dtype,
        "formats": probe.formats,
        "threshold": probe.threshold,
        "metrics": probe.report.to_dict() if probe.report is not None else None,
        "training": probe.training,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": file_sha256(weights_path),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return directory


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ProbeError(f"{path}: no such file (a probe directory holds {META_FILE} and "
                         f"{WEIGHTS_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProbeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ProbeError(f"{path}: field 'format' is not {FORMAT_NAME!r}; not a probe file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ProbeError(
            f"{path}: field 'format_version' is {meta.get('format_version')!r}; this version "
            f"of safekeel reads {FORMAT_VERSION}"
        )
    for key in ("kind", "feature_dim", "threshold", "layers", "pooling", "model"):
        if key not in meta:
            raise ProbeError(f"{path}: field {key!r} is missing")
    if meta["kind"] not in PROBE_KINDS:
        raise ProbeError(f"{path}: field 'kind' is {meta['kind']!r}; expected {list(PROBE_KINDS)}")
    return meta


def _check_expected(
    path: Path,
    meta: dict[str, Any],
    expected_model: ModelFingerprint | None,
    expected_layers: Sequence[int] | str | None,
    expected_pooling: str | None,
    expected_dtype: str | None = None,
) -> None:
    """Refuse a probe fitted on another model, other layers, pooling or activation dtype."""
    stored = ModelFingerprint.from_dict(meta["model"]) if meta["model"] else None
    if expected_model is not None:
        if stored is None:
            raise ProbeError(
                f"{path}: field 'model' is empty: the probe does not say which model it was "
                f"fitted on, so it cannot be checked against {expected_model.name!r}"
            )
        reason = stored.mismatch(expected_model)
        if reason is not None:
            raise ProbeError(
                f"{path}: field 'model' does not match: the probe was fitted on "
                f"{stored.name!r}, not on {expected_model.name!r} ({reason})"
            )
    if expected_layers is not None:
        reference = expected_model or stored
        wanted = _resolve_expected_layers(
            expected_layers, reference.num_layers if reference else None
        )
        if wanted != meta["layers"]:
            raise ProbeError(
                f"{path}: field 'layers' is {meta['layers']!r}, but the activations come from "
                f"layers {wanted!r}"
            )
    if expected_pooling is not None and expected_pooling != meta["pooling"]:
        raise ProbeError(
            f"{path}: field 'pooling' is {meta['pooling']!r}, but the activations are pooled "
            f"with {expected_pooling!r}"
        )
    stored_dtype = meta.get("activation_dtype")
    if expected_dtype is not None and stored_dtype is not None and expected_dtype != stored_dtype:
        raise ProbeError(
            f"{path}: field 'activation_dtype' is {stored_dtype!r}, but the activations are "
            f"read in {expected_dtype}; read them in the dtype the probe was fitted in"
        )


def _resolve_expected_layers(
    layers: Sequence[int] | str, num_layers: int | None
) -> list[int] | str:
    if isinstance(layers, str):
        return layers
    if num_layers is None:
        return [int(i) for i in layers]
    return ActivationSpec(layers=tuple(layers)).resolve_layers(num_layers)


def load_probe(
    directory: str | Path,
    *,
    expected_model: ModelFingerprint | None = None,
    expected_layers: Sequence[int] | str | None = None,
    expected_pooling: str | None = None,
    expected_dtype: str | None = None,
) -> Probe:
    """Read a probe saved by `save_probe`, refusing one made for other activations.

    Negative `expected_layers` count from the end of the model (the expected one, else the
    probe's own). Every refusal names the file and the field that differs.
    """
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    meta = _read_meta(meta_path)
    _check_expected(meta_path, meta, expected_model, expected_layers, expected_pooling,
                    expected_dtype)
    if not weights_path.is_file():
        raise ProbeError(f"{weights_path}: no such file (named by {meta_path})")
    if meta.get("weights_sha256") and file_sha256(weights_path) != meta["weights_sha256"]:
        raise ProbeError(
            f"{weights_path}: its sha256 differs from field 'weights_sha256' in {meta_path}; "
            "the two files do not belong together"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise ProbeError(f"{weights_path}: not a readable safetensors file ({err})") from None
    feature_dim = int(meta["feature_dim"])
    network = build_network(meta["kind"], feature_dim, int(meta.get("hidden_size") or 64))
    state = {k.removeprefix("network."): v for k, v in tensors.items() if k.startswith("network.")}
    try:
        network.load_state_dict(state, strict=True)
        mean, std = tensors["standardize.mean"], tensors["standardize.std"]
    except (RuntimeError, KeyError) as err:
        raise ProbeError(f"{weights_path}: tensors do not match {meta_path} ({err})") from None
    if mean.shape != (feature_dim,) or std.shape != (feature_dim,):
        raise ProbeError(
            f"{weights_path}: standardisation has shape {tuple(mean.shape)}, field "
            f"'feature_dim' in {meta_path} says {feature_dim}"
        )
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return Probe(
        kind=meta["kind"], network=network, mean=mean, std=std,
        threshold=float(meta["threshold"]),
        report=ProbeReport.from_dict(meta["metrics"]) if meta.get("metrics") else None,
        model=ModelFingerprint.from_dict(meta["model"]) if meta["model"] else None,
        layers=meta["layers"], pooling=meta["pooling"],
        hidden_size=int(meta.get("hidden_size") or 0), training=dict(meta.get("training") or {}),
        activation_dtype=meta.get("activation_dtype"),
        formats=meta.get("formats") or [PLAIN_FORMAT.to_dict()],
    )


def load_probe_for(directory: str | Path, extractor: Any) -> Probe:
    """`load_probe` checked against an activation extractor's model, layers, pooling and
    dtype."""
    return load_probe(
        directory,
        expected_model=extractor.fingerprint,
        expected_layers=extractor.layers if not extractor.spec.averages_layers else "all",
        expected_pooling=extractor.spec.pooling,
        expected_dtype=getattr(extractor, "dtype", None),
    )


# --------------------------------------------------------------------------- prompt files


def load_prompt_file(path: str | Path) -> list[tuple[str, list[dict[str, str]]]]:
    """Prompts of a labelled file as (where, messages) pairs, responses left out.

    `.txt`: one prompt per line (blank lines are skipped). `.json` holding a list of
    strings: one prompt per string. Otherwise (json/jsonl/csv/parquet rows with
    instruction / prompt / goal / messages columns) the corpus loader reads it, with rows
    that need no response. Empty prompts are refused, naming file and row.
    """
    from safekeel.data.corpus import CorpusConfig, load_examples

    path = Path(path)
    if path.suffix.lower() not in PROMPT_FILE_SUFFIXES:
        raise ProbeError(
            f"{path}: unknown prompt file type {path.suffix or '(none)'!r}; expected one of "
            f"{list(PROMPT_FILE_SUFFIXES)}"
        )
    if not path.is_file():
        raise ProbeError(f"{path}: no such file")
    texts = _plain_prompts(path)
    if texts is not None:
        prompts = []
        for row, text in texts:
            if not text.strip():
                raise ProbeError(f"{path}, row {row}: empty prompt")
            prompts.append((f"{path}, row {row}", [{"role": "user", "content": text}]))
    else:
        examples = load_examples(CorpusConfig(path=str(path), require_response=False))
        prompts = [
            (where, prompt_messages(ex["messages"], source=where))
            for where, ex in ((f"{path}, row {row}", ex) for row, ex in enumerate(examples))
        ]
    if not prompts:
        raise ProbeError(f"{path}: no prompts in the file")
    return prompts


def _plain_prompts(path: Path) -> list[tuple[int, str]] | None:
    """Rows of a .txt file or a JSON list of strings; None for files of records."""
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [(row, line) for row, line in enumerate(lines) if line != ""]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # the corpus loader reports the problem with its position
        if isinstance(data, list) and data and all(isinstance(item, str) for item in data):
            return list(enumerate(data))
    return None


def normalized_prompt(text: str) -> str:
    """A prompt's text for matching against an exclusion list: case and spacing ignored."""
    return " ".join(text.casefold().split())


def fit_probe_from_files(
    extractor: Any,
    harmful_path: str | Path,
    benign_path: str | Path,
    kind: str = "logreg",
    *,
    max_prompts_per_file: int | None = None,
    formats: Sequence[PromptFormat] = (PLAIN_FORMAT,),
    exclude_path: str | Path | None = None,
    **fit_kwargs: Any,
) -> Probe:
    """Fit a probe on the activations of labelled prompt files (harmful = 1, benign = 0).

    Each prompt is rendered once per format in `formats` (plain chat by default); the
    held-out split keeps a prompt's renderings together. Prompts whose text is in the
    prompt file `exclude_path` (an evaluation set, say) are dropped first, before
    `max_prompts_per_file`. `extractor` is a `TransformersActivationExtractor` or
    `VLLMActivationExtractor`; its model fingerprint, layers and pooling are stored with the
    probe. `fit_kwargs` go to `fit_probe`.
    """
    if not formats:
        raise ProbeError("formats: at least one prompt format is needed")
    excluded = ({normalized_prompt(m[-1]["content"]) for _, m in load_prompt_file(exclude_path)}
                if exclude_path else set())
    prompts, labels, groups, names = [], [], [], []
    n_excluded = n_prompts = 0
    for path, label in ((harmful_path, 1), (benign_path, 0)):
        rows = load_prompt_file(path)
        kept = [r for r in rows if normalized_prompt(r[1][-1]["content"]) not in excluded]
        n_excluded += len(rows) - len(kept)
        for where, messages in kept[:max_prompts_per_file]:
            group, n_prompts = n_prompts, n_prompts + 1
            for fmt in formats:
                prompts.append(extractor.prompt_ids(fmt.render(messages, source=where),
                                                    source=where))
                labels.append(label)
                groups.append(group)
                names.append(fmt.name)
    features = extractor.extract(prompts)
    layers = "all" if extractor.spec.averages_layers else extractor.layers
    probe = fit_probe(
        features, np.array(labels), kind, model=extractor.fingerprint, layers=layers,
        pooling=extractor.spec.pooling, groups=np.array(groups),
        formats=names if len(formats) > 1 else None, **fit_kwargs,
    )
    probe.activation_dtype = getattr(extractor, "dtype", None)
    probe.formats = [fmt.to_dict() for fmt in formats]
    probe.training.update(n_prompts=n_prompts, n_excluded=n_excluded,
                          exclude=str(exclude_path) if exclude_path else None)
    return probe


def probe_scores(probe: Probe, extractor: Any, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Harmful-intent probabilities of token-id prompts, after checking the probe fits."""
    layers = "all" if extractor.spec.averages_layers else extractor.layers
    stored = probe.model
    reason = stored.mismatch(extractor.fingerprint) if stored is not None else None
    if reason is not None or probe.layers != layers or probe.pooling != extractor.spec.pooling:
        raise ProbeError(
            f"the probe (model {stored.name if stored else None!r}, layers {probe.layers}, "
            f"pooling {probe.pooling!r}) does not fit these activations (model "
            f"{extractor.fingerprint.name!r}, layers {layers}, pooling "
            f"{extractor.spec.pooling!r})" + (f": {reason}" if reason else "")
        )
    dtype = getattr(extractor, "dtype", None)
    if None not in (probe.activation_dtype, dtype) and probe.activation_dtype != dtype:
        raise ProbeError(f"the probe was fitted on activations read in "
                         f"{probe.activation_dtype}; these are read in {dtype}")
    return probe.predict_proba(extractor.extract(prompts))
