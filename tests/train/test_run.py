"""The training loop: every method trains, bad shards are refused, resume is exact, NaN stops."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safekeel.train.run as run_module
from safekeel.data.config import ConfigError, from_dict
from safekeel.data.shards import (
    CRITIC_COLUMN,
    MANIFEST_NAME,
    PROBE_COLUMN,
    STAR_ENDS_COLUMN,
    STAR_VALUES_COLUMN,
    Manifest,
    Provenance,
    ShardError,
    ShardWriter,
    plan_shards,
    shard_schema,
    tokenizer_fingerprint,
)
from safekeel.train.config import METHODS, TrainConfig
from safekeel.train.objective import LossParts
from safekeel.train.run import LoopSettings, NonFiniteLossError, train

ALL_RISK = (CRITIC_COLUMN, PROBE_COLUMN, STAR_VALUES_COLUMN, STAR_ENDS_COLUMN)


def write_shards(directory: Path, n_rows: int, fingerprint: str, risk=ALL_RISK,
                 critic=lambda i: (i % 4) / 4, check_values: bool = True) -> Path:
    """Short chats in shards of 4 rows, row groups of 2, with every risk column.

    The critic scores 0, .25, .5, .75 in turn, so thresholded methods flag some examples.
    """
    provenance = Provenance(
        policy_tokenizer="tiny", policy_tokenizer_fingerprint=fingerprint,
        critic_model="guard", probe_file_sha256="0" * 64, probe_layers=[1], star_segment_size=2)
    schema = shard_schema([], risk)
    plan = plan_shards(n_rows, 4)
    infos = []
    for k in plan:
        rows = []
        for i in range(*plan.row_range(k)):
            row = {
                "id": f"ex-{i:02d}",
                "messages": [{"role": "user", "content": f"What is 7 times {i}?"},
                             {"role": "assistant", "content": f"Seven times {i} is {7 * i}."}],
                CRITIC_COLUMN: critic(i),
                PROBE_COLUMN: (i % 3) / 3,
                STAR_VALUES_COLUMN: [0.8, 0.3],
                STAR_ENDS_COLUMN: [3, 6],
            }
            rows.append({c: v for c, v in row.items() if c in schema.names})
        with ShardWriter(directory, k, schema, provenance, row_group_size=2,
                         check_values=check_values) as w:
            w.write_rows(rows)
        infos.append(w.info)
    Manifest(plan, provenance, infos).save(directory / MANIFEST_NAME)
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer):
    return write_shards(tmp_path_factory.mktemp("shards"), 12, tokenizer_fingerprint(tiny_tokenizer))


def make_config(policy_dir, shards_dir, out, **kw) -> TrainConfig:
    values = {"policy": str(policy_dir), "shards": str(shards_dir), "output_dir": str(out),
              "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
              "learning_rate": 1e-2, "tokenization": {"max_length": 64},
              # float32 everywhere: "auto" would autocast to bf16 on a CPU that has it, and
              # the exact-equality tests below compare float32 sums
              "mixed_precision": "no", "progress_bar": False, "save_every": 0, **kw}
    return from_dict(TrainConfig, values)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_changes_the_weights(method, tiny_model_dir, shards, tmp_path):
    out = tmp_path / "out"
    result = train(make_config(tiny_model_dir, shards, out, method=method, max_steps=2))
    assert result.steps == 2
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["tokens"] > 0 and r["loss"] == r["loss"] for r in log)
    before, after = weights_of(tiny_model_dir), weights_of(result.final_dir)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (result.final_dir / "tokenizer.json").exists()
    assert (result.final_dir / "train_config.yaml").exists()
    # b = 0 for every token of these methods, so no reference forward ever runs
    if method in ("sft", "filter", "downweight"):
        assert result.ref_forwards_run == 0 and result.ref_forwards_skipped == 4
        assert all(r["kl"] is None and r["kl_weight"] == 0 for r in log)
    else:
        assert result.ref_forwards_run == 4
        assert all(r["kl"] is not None and r["kl_weight"] > 0 for r in log)


def test_sft_loss_is_token_mean_cross_entropy(tiny_model_dir, shards, tmp_path):
    """The first step's logged loss equals a plain HF cross-entropy over the same batches."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    cfg = make_config(tiny_model_dir, shards, out, method="sft", max_steps=1)
    captured = []
    original = run_module.micro_batch_loss

    def spy(model, head, reference, policy, batch, **kw):
        captured.append(batch)
        return original(model, head, reference, policy, batch, **kw)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "micro_batch_loss", spy)
        train(cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in captured:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum").item()
            tokens += int((batch.labels[:, 1:] != -100).sum())
    (record,) = read_log(out)
    assert record["tokens"] == tokens
    assert record["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert record["ce"] == pytest.approx(total / tokens, rel=1e-5)


def test_accumulation_matches_one_bigger_batch(tiny_model_dir, shards, tmp_path):
    """Token-weighted normalisation: 2 x 2 accumulated examples train like 1 x 4 examples.

    The data order does not depend on the batch size, so both runs see the same 4 examples
    per step; only a loss normalised by the step's token count gives the same gradients.
    adaptive_example weights each example on its own (the batch-level `adaptive` would
    rightly differ: its risk is per micro-batch).
    """
    logs, finals = [], []
    for accumulation, batch_size in ((1, 4), (2, 2), (4, 1)):
        out = tmp_path / f"k{accumulation}"
        cfg = make_config(tiny_model_dir, shards, out, method="adaptive_example", max_steps=2,
                          per_device_batch_size=batch_size,
                          gradient_accumulation_steps=accumulation)
        finals.append(weights_of(train(cfg).final_dir))
        logs.append(read_log(out))
    for log in logs[1:]:
        for got, want in zip(log, logs[0], strict=True):
            assert got["tokens"] == want["tokens"]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    for final in finals[1:]:
        # Adam divides by sqrt(v): float noise in tiny gradients shows up as ~1e-5 of a
        # 1e-2 step; a wrongly weighted micro-batch would move weights by far more.
        assert all(torch.allclose(final[k], finals[0][k], atol=1e-4) for k in final)


def test_sft_never_builds_a_reference(tiny_model_dir, shards, tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("sft must not build a reference")

    monkeypatch.setattr(run_module, "build_reference", no_reference)
    result = train(make_config(tiny_model_dir, shards, tmp_path / "out", method="sft",
                               max_steps=1))
    assert result.ref_forwards_skipped == 2 and result.ref_forwards_run == 0
    assert read_log(tmp_path / "out")[0]["ref_skipped"] == 2


@pytest.mark.parametrize(("choice", "kernel", "fused"), [("auto", "eager", True),
                                                       ("sdpa", "sdpa", False)])
def test_attention_kernel_and_fused_adamw_as_configured(choice, kernel, fused, tiny_model_dir,
                                                        shards, tmp_path, monkeypatch):
    """On a CPU, auto trains with eager attention (PyTorch's CPU flash-attention backward is
    the slow part) and AdamW's fused kernel, unless the config says otherwise."""
    loaded, optimizers = [], []
    load = run_module.load_causal_lm

    def recording_load(*args, **kwargs):
        model = load(*args, **kwargs)
        loaded.append(model.config._attn_implementation)
        return model

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            optimizers.append(self.defaults["fused"])

    monkeypatch.setattr(run_module, "load_causal_lm", recording_load)
    monkeypatch.setattr(run_module.torch.optim, "AdamW", RecordingAdamW)
    train(make_config(tiny_model_dir, shards, tmp_path / "out", method="sft", max_steps=1,
                      attn_implementation=choice, fused_optimizer=fused))
    assert loaded == [kernel]
    assert optimizers == [True if fused else None]


def test_attention_kernel_auto_is_eager_on_cpu_only():
    from safekeel.data.models import attention_kernel

    assert attention_kernel("auto", "cpu") == "eager"
    assert attention_kernel("auto", "cuda") is None  # transformers' default (sdpa / flash)
    assert attention_kernel("flash_attention_2", "cuda") == "flash_attention_2"


def test_star_dss_refuses_shards_without_star_columns(tiny_model_dir, tiny_tokenizer, tmp_path):
    plain = write_shards(tmp_path / "plain", 4, tokenizer_fingerprint(tiny_tokenizer),
                         risk=(CRITIC_COLUMN, PROBE_COLUMN))
    cfg = make_config(tiny_model_dir, plain, tmp_path / "out", method="star_dss")
    with pytest.raises(ShardError, match=STAR_VALUES_COLUMN) as caught:
        train(cfg)
    assert "shard-00000.parquet" in str(caught.value)
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_tokenizer_provenance_mismatch_is_refused(tiny_model_dir, tmp_path):
    other = write_shards(tmp_path / "other", 4, "0" * 64)
    with pytest.raises(ShardError, match="policy_tokenizer_fingerprint"):
        train(make_config(tiny_model_dir, other, tmp_path / "out", method="sft"))


@pytest.mark.parametrize("bad", [float("nan"), 1.5])
def test_bad_risk_values_are_refused_before_training(bad, tiny_model_dir, tiny_tokenizer,
                                                     tmp_path):
    # row 6 (shard 1, row 2 within it) carries the bad score, past the first micro-batches
    broken = write_shards(tmp_path / "broken", 8, tokenizer_fingerprint(tiny_tokenizer),
                          critic=lambda i: bad if i == 6 else 0.0, check_values=False)
    cfg = make_config(tiny_model_dir, broken, tmp_path / "out", method="adaptive")
    with pytest.raises(ShardError, match=CRITIC_COLUMN) as caught:
        train(cfg)
    assert "shard-00001.parquet" in str(caught.value)
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_empty_shard_set_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="empty shard set"):
        train(make_config(tiny_model_dir, tmp_path / "empty", tmp_path / "out"))


def test_resume_after_crash_repeats_the_uninterrupted_losses(
        tiny_model_dir, shards, tmp_path, monkeypatch):
    def config(out):
        return make_config(tiny_model_dir, shards, out, method="adaptive", epochs=2,
                           save_every=2)

    # 12 rows, 2 per micro-batch, 2 micro-batches per step, 2 epochs: 6 steps
    straight = tmp_path / "straight"
    train(config(straight))
    expected = read_log(straight)
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]

    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    original = run_module.token_objective

    def crash_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # first micro-batch of step 4 (2 per step)
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "token_objective", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(crashed))
    assert [r["step"] for r in read_log(crashed)] == [1, 2, 3]
    monkeypatch.setattr(run_module, "token_objective", original)

    result = train(config(crashed))
    assert result.resumed_from_step == 2 and result.steps == 6
    resumed = read_log(crashed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(resumed, expected, strict=True):
        assert got["loss"] == want["loss"] and got["kl"] == want["kl"] and got["lr"] == want["lr"]
    straight_w, resumed_w = weights_of(straight / "final"), weights_of(crashed / "final")
    assert all(torch.equal(straight_w[k], resumed_w[k]) for k in straight_w)

    # a rerun of the finished run resumes from its last step and trains no more
    again = train(config(crashed))
    assert again.resumed_from_step == 6 and again.ref_forwards_run == 0
    assert read_log(crashed) == resumed


def test_nan_loss_stops_with_step_and_ids_and_keeps_checkpoint(
        tiny_model_dir, shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = run_module.token_objective

    def nan_in_step_3(*args, **kwargs):
        parts = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # first micro-batch of step 3
            return LossParts(parts.numerator * float("nan"), parts.ce_sum, parts.kl_sum,
                             parts.n_tokens)
        return parts

    monkeypatch.setattr(run_module, "token_objective", nan_in_step_3)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"step 3 \(micro-batch 1 of 2\)") as caught:
        # the deprecated LoopSettings still override the config (save_every: 0 -> 2)
        train(make_config(tiny_model_dir, shards, out, method="sft"), LoopSettings(save_every=2))
    assert "ex-" in str(caught.value) and "step-2" in str(caught.value)
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").exists()
    assert not (out / "final").exists()
    assert [r["step"] for r in read_log(out)] == [1, 2]


# --------------------------------------------------------------------------- loop options


def test_loop_options_are_command_line_options(capsys):
    import yaml

    from safekeel import pipeline

    assert pipeline.main(["train", "--warmup_ratio", "0.25", "--save_every", "7",
                          "--lora.enabled", "true", "--lora.r", "4", "--report_to",
                          "tensorboard", "--mixed_precision", "bf16", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["warmup_ratio"], printed["save_every"], printed["report_to"],
            printed["mixed_precision"]) == (0.25, 7, "tensorboard", "bf16")
    assert printed["lora"]["enabled"] is True and printed["lora"]["r"] == 4


def test_warmup_ratio_shapes_the_logged_learning_rate(tiny_model_dir, shards, tmp_path):
    # 12 rows / (2 x 2) = 3 steps per epoch, 2 epochs = 6 steps; warm-up ceil(0.5 * 6) = 3.
    # LR factor of 0-based step s: (s+1)/3 while s < 3, then (6 - s)/3.
    out = tmp_path / "out"
    train(make_config(tiny_model_dir, shards, out, method="sft", epochs=2, warmup_ratio=0.5,
                      learning_rate=0.3))
    lrs = [r["lr"] for r in read_log(out)]
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.2, 0.1])


# --------------------------------------------------------------------------- output_dir


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the output_dir check must come before loading the model")

    monkeypatch.setattr(run_module, "load_causal_lm", refuse)
    monkeypatch.setattr(run_module, "load_tokenizer", refuse)


def test_foreign_output_dir_is_refused_before_training(tiny_model_dir, shards, tmp_path,
                                                        no_model_loading):
    out = tmp_path / "my_thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    with pytest.raises(run_module.OutputDirError) as caught:
        train(make_config(tiny_model_dir, shards, out))
    assert str(out) in str(caught.value) and "chapter1.tex" in str(caught.value)
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.tex"]


def test_output_dir_that_is_a_file_or_has_a_foreign_config_is_refused(
        tiny_model_dir, shards, tmp_path, no_model_loading):
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    with pytest.raises(run_module.OutputDirError, match="is a file"):
        train(make_config(tiny_model_dir, shards, a_file))
    other = tmp_path / "other"
    other.mkdir()
    (other / "train_config.yaml").write_text("- not\n- ours\n")
    with pytest.raises(run_module.OutputDirError, match="not a safekeel train config"):
        train(make_config(tiny_model_dir, shards, other))


def test_damaged_trainer_state_is_named(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "out"
    train(make_config(tiny_model_dir, shards, out, method="sft", max_steps=1, save_every=1))
    state = out / "checkpoints" / "step-1" / "trainer_state.json"
    state.write_text("{broken")
    with pytest.raises(run_module.ResumeError, match="trainer_state.json: unreadable"):
        train(make_config(tiny_model_dir, shards, out, method="sft", max_steps=1, save_every=1))


def test_empty_existing_output_dir_is_accepted(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert train(make_config(tiny_model_dir, shards, out, method="sft", max_steps=1)).steps == 1


# --------------------------------------------------------------------------- trackers


@pytest.mark.slow
def test_tensorboard_gets_the_train_metrics(tiny_model_dir, shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    train(make_config(tiny_model_dir, shards, out, method="adaptive", max_steps=2,
                      report_to="tensorboard"))
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out / 'logs'}"
    scalars = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file)).Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    expected = {"train/loss", "train/ce", "train/kl", "train/kl_weight", "train/batch_risk"}
    assert expected <= scalars.keys()
    log = read_log(out)
    for key in ("loss", "kl", "kl_weight"):
        assert [s for s, _ in scalars[f"train/{key}"]] == [1, 2]
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx(
            [r[key] for r in log], rel=1e-6)


def test_missing_tracker_package_is_refused():
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="report_to: 'wandb' needs the wandb package"):
        run_module.tracker_name("wandb")


# --------------------------------------------------------------------------- mixed precision


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; a run with another precision needs it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.slow
def test_bf16_autocast_trains_close_to_fp32(tiny_model_dir, shards, tmp_path,
                                            fresh_accelerator_state):
    from accelerate.state import AcceleratorState

    losses = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state()
        out = tmp_path / precision
        result = train(make_config(tiny_model_dir, shards, out, method="adaptive", max_steps=2,
                                   mixed_precision=precision))
        losses[precision] = [r["loss"] for r in read_log(out)]
        assert result.steps == 2
    # bf16 keeps ~3 significant digits: close to fp32, but not identical (autocast is on)
    assert losses["bf16"] == pytest.approx(losses["no"], rel=3e-2)
    assert losses["bf16"] != losses["no"]


def test_fp16_without_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="mixed_precision: 'fp16' needs a GPU"):
        run_module.resolve_mixed_precision("fp16")


@pytest.mark.parametrize("native", [True, False])
def test_auto_mixed_precision_is_bf16_only_where_native(monkeypatch, native):
    from safekeel.data import precision

    monkeypatch.setattr(precision, "cuda_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_flags",
                        lambda: frozenset({"avx2", *(["avx512_bf16"] if native else [])}))
    assert run_module.resolve_mixed_precision("auto") == ("bf16" if native else "no")


def test_risk_options_reach_the_weight_policy():
    from safekeel.data.config import ConfigError, from_dict
    from safekeel.train.config import TrainConfig, weight_policy_params
    from safekeel.train.weights import LinearSchedule, make_weight_policy

    cfg = from_dict(TrainConfig, {"method": "adaptive", "risk": {
        "signal": "max", "aggregate": "max", "schedule": "linear",
        "schedule_options": {"low": 0.2, "high": 0.8}}})
    policy = make_weight_policy(cfg.method, **weight_policy_params(cfg))
    assert policy.signal == "max" and policy.aggregate == "max"
    assert policy.schedule == LinearSchedule(low=0.2, high=0.8)
    cfg = from_dict(TrainConfig, {"method": "downweight",
                                  "risk": {"threshold": 0.3, "downweight_factor": 0.2}})
    policy = make_weight_policy(cfg.method, **weight_policy_params(cfg))
    assert (policy.threshold, policy.factor) == (0.3, 0.2)
    with pytest.raises(ConfigError, match="risk: .*linear schedule.*low"):
        from_dict(TrainConfig, {"method": "adaptive", "risk": {
            "schedule": "linear", "schedule_options": {"low": 0.9, "high": 0.1}}})


@pytest.mark.parametrize("change", ["config", "shards"])
def test_a_resume_that_would_mix_two_runs_is_refused(change, tiny_model_dir, tiny_tokenizer,
                                                     tmp_path):
    """A checkpoint left by a crash continues only the run that wrote it: a rerun with another
    learning rate, or on shards whose content changed in place, is refused with a message."""
    shards_dir = write_shards(tmp_path / "shards", 12, tokenizer_fingerprint(tiny_tokenizer))
    out = tmp_path / "out"
    train(make_config(tiny_model_dir, shards_dir, out, max_steps=2, save_every=1))
    if change == "config":
        rerun = make_config(tiny_model_dir, shards_dir, out, max_steps=2, save_every=1,
                            learning_rate=5e-3)
        expected = "config.learning_rate: 0.01 -> 0.005"
    else:
        write_shards(shards_dir, 12, tokenizer_fingerprint(tiny_tokenizer),
                     critic=lambda i: 0.9)  # same path, other scores
        rerun = make_config(tiny_model_dir, shards_dir, out, max_steps=2, save_every=1)
        expected = "shards_sha256"
    with pytest.raises(run_module.ResumeError, match="written by a run with other settings") as err:
        train(rerun)
    assert expected in str(err.value)


def test_a_rerun_may_change_how_results_are_shown(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "out"
    train(make_config(tiny_model_dir, shards, out, max_steps=2, save_every=1))
    again = train(make_config(tiny_model_dir, shards, out, max_steps=2, save_every=2,
                              progress_bar=True))
    assert again.resumed_from_step == 2


def test_a_log_line_cut_by_a_kill_does_not_stop_the_rerun(tiny_model_dir, shards, tmp_path,
                                                          monkeypatch):
    """A kill can land while a step's log line is being appended: the rerun drops the cut
    line with the other steps past its checkpoint, and its log equals a straight run's."""
    def config(out):
        return make_config(tiny_model_dir, shards, out, epochs=2, max_steps=4, save_every=2)

    straight = tmp_path / "straight"
    train(config(straight))
    out = tmp_path / "out"
    calls = {"n": 0}
    original = run_module.token_objective

    def crash_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "token_objective", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(config(out))
    monkeypatch.setattr(run_module, "token_objective", original)
    with (out / "train_log.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss": 1.2')  # what a kill mid-write leaves
    result = train(config(out))
    assert result.resumed_from_step == 2
    def without_timings(lines):
        return [{k: v for k, v in line.items() if "second" not in k} for line in lines]

    assert without_timings(read_log(out)) == without_timings(read_log(straight))
