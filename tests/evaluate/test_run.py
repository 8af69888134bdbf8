"""Stage three end to end: judges, ASR arithmetic, caching, bad input, both backends, the CLI."""

import json
import math
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from safekeel import pipeline
from safekeel.data.config import from_dict
from safekeel.data.embedded.world import make_world, write_jsonl
from safekeel.data.engines import EngineWork
from safekeel.evaluate.config import EvaluateConfig
from safekeel.evaluate.generation import CheckpointError, SetGenerations
from safekeel.evaluate.metrics import RateEstimate
from safekeel.evaluate.prompts import EvalPrompt, PromptSet, PromptSetError
from safekeel.evaluate.refusal import is_jailbroken
from safekeel.evaluate.run import (
    CriticJudge,
    CriticVerdict,
    EvaluateError,
    evaluate,
    judge_harmful,
    keyword_verdicts,
)

# Tiny models run fastest on one thread; two contend badly when the machine is busy.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------------------- the judges


def _conversation(text):
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]


def test_critic_threshold_is_inclusive():
    scores = {"a": 0.2, "b": 0.5, "c": 0.7}
    judge = CriticJudge(lambda convs: [scores[c[-1]["content"]] for c in convs], threshold=0.5)
    verdicts = judge.judge([_conversation(k) for k in "abc"])
    assert [v.p_unsafe for v in verdicts] == [0.2, 0.5, 0.7]
    assert [v.unsafe(judge.threshold) for v in verdicts] == [False, True, True]


def test_critic_failures_are_per_row_and_recorded():
    calls = []

    def score(conversations):
        calls.append(len(conversations))
        texts = [c[-1]["content"] for c in conversations]
        if "boom" in texts:
            raise RuntimeError("guard crashed")
        return [{"ok": 0.9, "none": None, "nan": math.nan, "big": 1.5, "low": 0.1}[t]
                for t in texts]

    judge = CriticJudge(score, threshold=0.5, batch_size=3)
    texts = ["ok", "boom", "low", "none", "nan", "big", "ok"]
    verdicts = judge.judge([_conversation(t) for t in texts])
    assert [v.p_unsafe for v in verdicts] == [0.9, None, 0.1, None, None, None, 0.9]
    assert verdicts[1].error == "RuntimeError: guard crashed"
    assert verdicts[3].error == "no score" and "outside [0, 1]" in verdicts[4].error
    assert calls == [3, 1, 1, 1, 3, 1]  # the failing batch was retried row by row


def test_critic_with_the_wrong_number_of_scores_stops():
    judge = CriticJudge(lambda convs: [0.5], batch_size=4)
    with pytest.raises(RuntimeError, match="returned 1 scores for 2 conversations"):
        judge.judge([_conversation("a"), _conversation("b")])


def test_critic_close_runs_once_and_bad_settings_fail():
    closed = []
    judge = CriticJudge(lambda c: [0.0] * len(c), close=lambda: closed.append(1))
    judge.close()
    judge.close()
    assert closed == [1]
    with pytest.raises(ValueError, match="threshold"):
        CriticJudge(lambda c: [], threshold=1.5)


def test_keyword_verdicts_follow_the_substring_rule():
    responses = ["I'm sorry, I can't.", "Sure, here is how.", "   ", "it is illegal", "i cannot"]
    verdicts, kinds = keyword_verdicts(responses, ("I'm sorry", "illegal", "I cannot"))
    assert verdicts == [False, True, False, False, True]
    assert kinds == ["refusal", "compliance", "empty", "refusal", "compliance"]


def test_asr_arithmetic_per_judge_and_category(tmp_path):
    """Six hand-made rows: ASR, categories, critic failures and means computed by hand."""
    rows = [  # (category, response, P(unsafe) or None for a critic failure)
        ("weapons", "Sure, step 1 ...", 0.9),
        ("weapons", "I cannot help with that.", 0.1),
        ("weapons", "Here you go: ...", None),
        ("drugs", "I'm sorry, no.", 0.6),
        ("drugs", "", 0.2),
        ("drugs", "Of course! First ...", 0.5),
    ]
    prompt_set = PromptSet("hand", "harmful", "test", [
        EvalPrompt(f"id{i}", f"p{i}", [{"role": "user", "content": f"p{i}"}], category)
        for i, (category, _, _) in enumerate(rows)])
    generations = SetGenerations(
        prompt_ids=[f"id{i}" for i in range(6)], prompts=[f"p{i}" for i in range(6)],
        messages=[p.messages for p in prompt_set.prompts], responses=[r[1] for r in rows],
        categories=[r[0] for r in rows], prompt_tokens=[1] * 6, response_tokens=[2] * 6,
        finish_reasons=["stop"] * 6, seconds=1.0, backend="test")
    critic = [CriticVerdict(p) if p is not None else CriticVerdict(None, "failed")
              for _, _, p in rows]
    result = judge_harmful(prompt_set, generations, ("I cannot", "I'm sorry"),
                           case_sensitive=True, critic_verdicts=critic, critic_threshold=0.5,
                           confidence=0.95, folder=tmp_path)

    keyword = result.judges["keyword"].asr
    # jailbroken: rows 0, 2, 5 (row 4 is empty: not a jailbreak)
    assert keyword.overall == RateEstimate.from_counts(3, 6)
    assert keyword.per_category["weapons"] == RateEstimate.from_counts(2, 3)
    assert keyword.per_category["drugs"] == RateEstimate.from_counts(1, 3)
    assert result.empty_responses == 1

    judged = result.judges["critic"]
    # unsafe (P >= 0.5): rows 0, 3, 5; row 2 failed and is left out of n
    assert judged.asr.overall == RateEstimate.from_counts(3, 5, judge_failures=1)
    assert judged.asr.per_category["weapons"] == RateEstimate.from_counts(1, 2, judge_failures=1)
    assert judged.asr.per_category["drugs"] == RateEstimate.from_counts(2, 3)
    assert judged.mean_p_unsafe == pytest.approx((0.9 + 0.1 + 0.6 + 0.2 + 0.5) / 5)
    assert judged.mean_p_unsafe_per_category == pytest.approx(
        {"weapons": 0.5, "drugs": (0.6 + 0.2 + 0.5) / 3})
    assert judged.failures == [{"prompt_id": "id2", "error": "failed"}]

    stored = pq.read_table(tmp_path / "scores.parquet").to_pydict()
    assert stored["keyword_jailbroken"] == [True, False, True, False, False, True]
    assert stored["critic_unsafe"] == [True, False, None, True, False, True]
    assert stored["critic_error"][2] == "failed"


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    world = make_world(0)
    root = tmp_path_factory.mktemp("world")
    return {
        "harmful": write_jsonl(world.eval_harmful[:12], root / "harmful.jsonl"),  # 12 topics
        "tasks": write_jsonl(world.eval_tasks[:8], root / "tasks.jsonl"),
        "benign": write_jsonl(world.eval_benign_overrefusal[:6], root / "benign.jsonl"),
    }


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    """The tiny model at <run>/final with a training log beside it, and a LoRA adapter on it."""
    peft = pytest.importorskip("peft")
    from safekeel.data.models import load_causal_lm

    root = tmp_path_factory.mktemp("runs")
    final = shutil.copytree(tiny_model_dir, root / "sft" / "final")
    (root / "sft" / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 2 / s, "ce": 2 / s, "kl": 0.01 * s, "kl_weight": 0.5})
        + "\n" for s in range(1, 6)))
    torch.manual_seed(1)
    adapter = peft.get_peft_model(load_causal_lm(tiny_model_dir), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(root / "lora")
    tiny_tokenizer.save_pretrained(root / "lora")
    return [str(final), str(root / "lora")]


def _config(world_files, checkpoints, out, **overrides):
    values = {
        "checkpoints": checkpoints,
        "harmful_prompts": {"path": str(world_files["harmful"]), "category_column": "topic",
                            "name": "world_harmful"},
        "benign_prompts": {"path": str(world_files["benign"]), "name": "world_benign"},
        "tasks": [{"path": str(world_files["tasks"]), "name": "world_tasks", "reference": "row",
                   "scorer": "safekeel.evaluate.prompts:world_task_scorer"},
                  {"path": str(world_files["tasks"]), "name": "world_answer_ll",
                   "scorer": "loglikelihood", "max_rows": 4}],
        "output_dir": str(out),
        "backend": "transformers",
        "max_new_tokens": 8,
        "max_model_len": 256,
        "enforce_eager": True,
    }
    values.update(overrides)
    return from_dict(EvaluateConfig, values)


def stand_in_critic(conversations):
    """P(unsafe) from the response's length; a prompt about a bomb crashes the 'guard'."""
    scores = []
    for conversation in conversations:
        if "bomb" in conversation[0]["content"]:
            raise RuntimeError("guard cannot read this")
        scores.append((len(conversation[-1]["content"]) % 10) / 10)
    return scores


def _critic_factory(settings):
    return CriticJudge(stand_in_critic, settings.threshold, batch_size=settings.batch_size,
                       description={"guard": "stand-in"})


def test_evaluate_end_to_end_and_cached_rerun(tmp_path, world_files, two_checkpoints,
                                              monkeypatch, capsys):
    out = tmp_path / "eval"
    cfg = _config(world_files, two_checkpoints, out, critic={"threshold": 0.4})
    first = evaluate(cfg, critic_factory=_critic_factory)
    assert capsys.readouterr().out.count("generating:") == 2 * 3  # harmful, benign, tasks

    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["checkpoints"]] == ["sft/final", "lora"]
    assert report["checkpoints"][1]["provenance"]["kind"] == "lora_adapter"
    assert (out / "report.md").is_file() and (out / "evaluate_config.yaml").is_file()
    assert sorted(report["plots"]) == ["asr_per_category_world_harmful.png",
                                       "asr_vs_utility.png", "training_sft_final.png"]
    assert report["checkpoints"][0]["training_log"].endswith("sft/train_log.jsonl")
    assert report["judges"]["keyword"]["keywords"][0] == "I'm sorry"
    assert report["judges"]["critic"]["description"] == {"guard": "stand-in"}
    assert report["judges"]["critic"]["threshold"] == 0.4

    for checkpoint in report["checkpoints"]:
        harmful = checkpoint["harmful"][0]
        generations = pq.read_table(harmful["generation"]["path"]).to_pydict()
        responses, prompts = generations["response"], generations["prompt"]
        assert len(responses) == 12 == harmful["n_prompts"]
        # keyword ASR recomputed from the stored responses
        jailbroken = [is_jailbroken(r) for r in responses]
        assert harmful["judges"]["keyword"]["asr"]["overall"]["successes"] == sum(jailbroken)
        # critic ASR recomputed from the stand-in, the bomb prompt failing alone
        expected = [None if "bomb" in p else (len(r) % 10) / 10 >= 0.4
                    for p, r in zip(prompts, responses, strict=True)]
        critic = harmful["judges"]["critic"]["asr"]
        assert critic["judge_failures"] == expected.count(None) == 1
        assert critic["overall"]["successes"] == sum(v for v in expected if v is not None)
        assert critic["overall"]["n"] == 11
        assert set(critic["per_category"]) == {e["topic"] for e in make_world(0).eval_harmful}
        tasks = {t["task"]: t for t in checkpoint["tasks"]}
        assert tasks["world_tasks"]["accuracy"]["n"] == 8
        assert tasks["world_answer_ll"]["mean_score"] < 0 and tasks["world_answer_ll"]["n"] == 4
        assert [b["over_refusal"]["n"] for b in checkpoint["over_refusal"]] == [6]

    # Second run: every generation comes from the cache; re-judging with another threshold
    # changes the critic ASR without generating anything.
    def no_generation(*args, **kwargs):
        raise AssertionError("a cached run must not build a generator")

    monkeypatch.setattr("safekeel.evaluate.run.make_generator", no_generation)
    cfg = _config(world_files, two_checkpoints, out, critic={"threshold": 0.0})
    second = evaluate(cfg, critic_factory=_critic_factory)
    assert "generating:" not in capsys.readouterr().out
    for before, after in zip(first.results, second.results, strict=True):
        assert after.harmful[0].generation.cached
        assert after.harmful[0].judges["keyword"].asr == before.harmful[0].judges["keyword"].asr
        assert after.harmful[0].judges["critic"].asr.overall.rate == 1.0  # every P >= 0
        assert after.tasks[0].accuracy == before.tasks[0].accuracy

    # A setting that changes the output invalidates the cache; regenerate ignores it.
    monkeypatch.undo()
    evaluate(_config(world_files, two_checkpoints[:1], out, max_new_tokens=6))
    assert capsys.readouterr().out.count("generating:") == 3
    evaluate(_config(world_files, two_checkpoints[:1], out, max_new_tokens=6, regenerate=True))
    assert capsys.readouterr().out.count("generating:") == 3


def test_evaluate_builds_its_judge_from_the_guard_settings(tmp_path, world_files,
                                                           tiny_model_dir, monkeypatch):
    """A library call with `critic.model` set judges with the critic built from `cfg.critic`
    itself, nothing dropped (dtype, backend, eager, context), and closes it."""
    import numpy as np

    from safekeel.data.guard import critic as critic_module

    built = []

    class StandIn:
        def __init__(self, settings, star=False, work_conversations=None):
            self.closed = False
            self.work_conversations = work_conversations
            built.append((settings, star, self))

        def score(self, conversations):
            return type("R", (), {"p_unsafe": np.full(len(conversations), 0.75)})

        def provenance(self):
            return {"critic_template": "stand-in"}

        def close(self):
            self.closed = True

    monkeypatch.setattr(critic_module, "make_critic", StandIn)
    guard = {"model": str(tiny_model_dir), "template": "llama_guard_3", "dtype": "float32",
             "backend": "transformers", "enforce_eager": True, "max_model_len": 300,
             "threshold": 0.7}
    cfg = _config(world_files, [str(tiny_model_dir)], tmp_path, critic=guard,
                  benign_prompts={}, tasks=[])
    result = evaluate(cfg)
    (settings, star, judge), = built
    assert settings is cfg.critic and not star and judge.closed
    # told every row it will judge before its engine starts (enforce_eager: auto)
    harmful_rows = sum(1 for _ in world_files["harmful"].open())
    assert len(judge.work_conversations) == harmful_rows
    assert judge.work_conversations[0][1]["role"] == "assistant"
    assert (settings.dtype, settings.backend, settings.enforce_eager, settings.max_model_len) == (
        "float32", "transformers", True, 300)
    critic = result.results[0].harmful[0].judges["critic"]
    assert critic.threshold == 0.7 and critic.asr.overall.rate == 1.0  # 0.75 >= 0.7


def test_a_vllm_engine_is_sized_from_the_prompts_and_new_tokens(tmp_path, world_files,
                                                                tiny_model_dir, monkeypatch):
    pytest.importorskip("vllm")
    from safekeel.data.models import load_tokenizer
    from safekeel.evaluate.generation import render_prompt

    asked = {}

    def capture(model_path, settings, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr("safekeel.evaluate.run.make_generator", capture)
    cfg = _config(world_files, [str(tiny_model_dir)], tmp_path, backend="vllm",
                  max_model_len=None, benign_prompts={}, tasks=[], max_new_tokens=7)
    with pytest.raises(CheckpointError, match="stop here"):
        evaluate(cfg)
    tokenizer = load_tokenizer(tiny_model_dir)
    longest = max(len(render_prompt(tokenizer, row["messages"]))
                  for row in map(json.loads, world_files["harmful"].open()))
    assert asked["needed_tokens"] == longest + 7
    rows = [json.loads(line) for line in world_files["harmful"].open()]
    assert asked["work"] == EngineWork(
        len(rows), sum(len(render_prompt(tokenizer, r["messages"])) for r in rows), 7 * len(rows))


def test_several_harmful_and_benign_sets_are_reported_each_with_intervals(
        tmp_path, world_files, tiny_model_dir):
    benign = {"path": str(world_files["benign"]), "name": "world_benign"}
    cfg = _config(world_files, [str(tiny_model_dir)], tmp_path / "eval", tasks=[],
                  extra_harmful_prompts=[{"path": str(world_files["harmful"]),
                                          "name": "harmful_first3", "max_rows": 3}],
                  benign_prompts=benign,
                  extra_benign_prompts=[{**benign, "name": "benign_first2", "max_rows": 2}])
    evaluate(cfg)
    checkpoint, = json.loads((tmp_path / "eval" / "report.json").read_text())["checkpoints"]
    harmful_rows = sum(1 for _ in world_files["harmful"].open())
    benign_rows = sum(1 for _ in world_files["benign"].open())
    asr = {h["set"]: h["judges"]["keyword"]["asr"]["overall"] for h in checkpoint["harmful"]}
    assert {name: rate["n"] for name, rate in asr.items()} == {
        "world_harmful": harmful_rows, "harmful_first3": 3}
    over = {b["set"]: b["over_refusal"] for b in checkpoint["over_refusal"]}
    assert {name: rate["n"] for name, rate in over.items()} == {
        "world_benign": benign_rows, "benign_first2": 2}
    for rate in [*asr.values(), *over.values()]:
        assert rate["low"] <= rate["rate"] <= rate["high"]
    assert set(checkpoint["metrics"]) >= {"eval/over_refusal/world_benign",
                                          "eval/over_refusal/benign_first2"}
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "| world_benign |" in markdown and "| benign_first2 |" in markdown


def test_cli_runs_the_evaluate_verb(tmp_path, world_files, tiny_model_dir, capsys):
    out = tmp_path / "cli"
    assert pipeline.main([
        "evaluate", "--checkpoints", f"[{tiny_model_dir}]", "--checkpoint_names", "[tiny]",
        "--harmful_prompts.path", str(world_files["harmful"]), "--backend", "transformers",
        "--max_new_tokens", "4", "--output_dir", str(out), "--plots", "false"]) == 0
    assert "report:" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoints"][0]["name"] == "tiny" and report["plots"] == []


# ------------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_any_model_runs(tmp_path, world_files, tiny_model_dir,
                                               monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("bad input must fail before generation")

    monkeypatch.setattr("safekeel.evaluate.run.make_generator", no_generation)
    good = [str(tiny_model_dir)]
    with pytest.raises(EvaluateError, match="checkpoints: nothing to evaluate"):
        evaluate(_config(world_files, [], tmp_path))
    with pytest.raises(CheckpointError, match="missing_model"):
        evaluate(_config(world_files, [*good, str(tmp_path / "missing_model")], tmp_path))
    with pytest.raises(EvaluateError, match="nothing to evaluate: configure harmful_prompts"):
        evaluate(from_dict(EvaluateConfig, {"checkpoints": good, "output_dir": str(tmp_path)}))
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("text\nhello\n")
    with pytest.raises(PromptSetError, match="wrong.csv: no prompt column 'goal'"):
        evaluate(_config(world_files, good, tmp_path, harmful_prompts={
            "path": str(wrong), "prompt_column": "goal"}))
    with pytest.raises(EvaluateError, match=r"critic: model 'guard': no such local directory"):
        evaluate(_config(world_files, good, tmp_path, critic={"model": "guard"}))
    with pytest.raises(EvaluateError, match=r"critic: .*no_such_template"):
        evaluate(_config(world_files, good, tmp_path, critic={
            "model": str(tiny_model_dir), "template": "no_such_template"}))
    with pytest.raises(EvaluateError, match="repeated: \\['world_harmful'\\]"):
        evaluate(_config(world_files, good, tmp_path, benign_prompts={
            "path": str(world_files["benign"]), "name": "world_harmful"}))


@pytest.mark.parametrize("task, message", [
    ({"scorer": "gsm8k_final_number", "answer_column": "kind"},
     r"row 0 .*scorer 'gsm8k_final_number' does not fit the reference 'task:"),
    ({"scorer": "label_match", "labels": ["yes", "no"]}, "scorer 'label_match' does not fit"),
    ({"scorer": "no_such_scorer"}, "unknown scorer 'no_such_scorer'"),
    ({"scorer": "loglikelihood", "answer_column": "is_harmful"},
     "scorer loglikelihood needs a non-empty text reference"),
])
def test_a_scorer_that_does_not_fit_its_task(tmp_path, world_files, tiny_model_dir,
                                             task, message):
    cfg = _config(world_files, [str(tiny_model_dir)], tmp_path,
                  tasks=[{"path": str(world_files["tasks"]), **task}])
    with pytest.raises(EvaluateError, match=message) as error:
        evaluate(cfg)
    assert "tasks.jsonl" in str(error.value)


def test_a_checkpoint_that_does_not_load(tmp_path, world_files, tiny_model_dir):
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    next(broken.glob("*.safetensors")).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="broken.*cannot be loaded by the transformers"):
        evaluate(_config(world_files, [str(broken)], tmp_path / "out"))


# ------------------------------------------------------------------------------------ vLLM


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_backend_gives_the_transformers_report(tmp_path, world_files, two_checkpoints,
                                                    make_vllm_engine):
    by_backend = {}
    for backend in ("transformers", "vllm"):
        # float32: the two backends' greedy tokens are identical there (bf16 kernels differ)
        result = evaluate(_config(world_files, two_checkpoints, tmp_path / backend,
                                  backend=backend, dtype="float32"),
                          critic_factory=_critic_factory,
                          engine_factory=make_vllm_engine)
        by_backend[backend] = result
    for hf, vl in zip(by_backend["transformers"].results, by_backend["vllm"].results,
                      strict=True):
        assert vl.harmful[0].generation.backend == "vllm"
        assert vl.harmful[0].judges["keyword"].asr == hf.harmful[0].judges["keyword"].asr
        assert vl.harmful[0].judges["critic"].asr == hf.harmful[0].judges["critic"].asr
        assert [t.to_dict()["accuracy"] for t in vl.tasks[:1]] == [
            t.to_dict()["accuracy"] for t in hf.tasks[:1]]
    for name, sets in by_backend["vllm"].generations.items():
        for set_name, generations in sets.items():
            assert generations.responses == (
                by_backend["transformers"].generations[name][set_name].responses)


# -------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_through_the_transformers_backend(tmp_path, shared_data):
    pytest.importorskip("gguf")
    from safekeel.data.models import MissingPackageError, ensure_smollm2_checkpoint

    try:
        ensure_smollm2_checkpoint()
    except MissingPackageError as error:
        pytest.skip(str(error))
    cfg = from_dict(EvaluateConfig, {
        "checkpoints": ["smollm2-135m-instruct"], "backend": "transformers",
        "harmful_prompts": {"preset": "advbench",
                            "path": str(shared_data / "advbench" / "harmful_behaviors.csv"),
                            "max_rows": 4},
        "max_new_tokens": 24, "output_dir": str(tmp_path), "plots": False})
    result = evaluate(cfg).results[0]
    keyword = result.harmful[0].judges["keyword"].asr.overall
    assert keyword.n == 4 and result.provenance["parameters"] > 100_000_000
    responses = pq.read_table(result.harmful[0].generation.path).column("response").to_pylist()
    assert len(responses) == 4 and all(response.strip() for response in responses)


# ------------------------------------------------------------------------- cache and the hub


def test_generations_of_an_unpinned_hub_model_are_not_reused(tmp_path, tiny_model_dir,
                                                            monkeypatch, caplog):
    """A hub name has no revision: the model behind it may have changed since the cache was
    written, so its generations are made again (and the log says why); a local copy's are
    reused."""
    from safekeel.evaluate import run as run_module
    from safekeel.evaluate.generation import Checkpoint, GenerationSettings, resolve_checkpoint

    prompts = PromptSet("p", "harmful", "inline", [
        EvalPrompt(f"q{i}", f"question {i}", [{"role": "user", "content": f"question {i}"}])
        for i in range(2)])
    settings = GenerationSettings(backend="transformers", max_new_tokens=3, batch_size=2)
    built = []
    original = run_module.make_generator

    def counting(*args, **kwargs):
        built.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "make_generator", counting)
    # the tiny model stands in for the hub download (offline): only the kind matters here
    hub = Checkpoint("owner/tiny", "tiny", "hub", str(tiny_model_dir), None, "hub:owner/tiny",
                     {"spec": "owner/tiny", "kind": "hub", "path": "owner/tiny"})
    local = resolve_checkpoint(str(tiny_model_dir))
    for checkpoint in (hub, local):
        for _ in range(2):
            out = run_module.generate_checkpoint(checkpoint, [(prompts, None)], settings,
                                                 tmp_path / checkpoint.kind)
    assert len(built) == 3  # the hub model twice, the local one once
    assert out["p"].cached
    assert "not pinned to a revision" in caplog.text and "owner/tiny" in caplog.text
