"""Steps of a real-model recipe before and after the annotate -> train -> evaluate chain:
resumable step records, model builds by the project's own stages, their measurements.

A step is identified by a key: a hash of its settings and of its inputs' identities (file
digests, the keys of the steps it reads). `Steps.run` reuses a finished step whose key is
unchanged, clears the outputs of a step whose key changed and runs it again, and leaves the
outputs of a started but unfinished step with the same key in place (annotate and train
resume from them). Records live in `{output_dir}/steps/<name>.json`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safekeel.data.config import from_dict, option, to_dict

STEPS_DIR = "steps"


def step_key(parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def directory_digest(path: str | Path) -> str:
    """Content hash of a file or of every file under a directory (names and bytes)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


class Steps:
    """Resumable steps of one run, each printing one progress line."""

    def __init__(self, out_dir: str | Path, say: Callable[[str], None]) -> None:
        self.dir = Path(out_dir) / STEPS_DIR
        self.say = say
        self.keys: dict[str, str] = {}

    def run(self, name: str, parts: Any, outputs: Sequence[str | Path],
            action: Callable[[], Any], *, resumes_itself: bool = False) -> dict[str, Any]:
        """`action()` unless the step finished with the same key; returns its result (a
        dict, kept in the record; anything else is not kept). A stage that `resumes_itself`
        (annotate skips its finished shards) is called even when finished, and reports it."""
        key = step_key(parts)
        self.keys[name] = key
        record_path = self.dir / f"{name}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if (record and record.get("key") == key and record.get("done")
                and all(Path(o).exists() for o in outputs) and not resumes_itself):
            self.say(f"  {name}: reused (key {key})")
            return record.get("result") or {}
        if record and record.get("key") != key:  # changed settings or inputs: start over
            for output in outputs:
                path = Path(output)
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({"key": key, "done": False}) + "\n")
        started = time.perf_counter()
        result = action()
        result = result if isinstance(result, dict) else {}
        seconds = round(time.perf_counter() - started, 1)
        record_path.write_text(json.dumps(
            {"key": key, "done": True, "seconds": seconds, "result": result},
            indent=2, default=str) + "\n")
        self.say(f"  {name}: done in {seconds:.0f} s (key {key})")
        return result


# --------------------------------------------------------------------------------------
# Model builds: annotate (data pass) -> train sft -> models/<name>
# --------------------------------------------------------------------------------------


@dataclass
class ModelBuildConfig:
    name: str = option("", help="The model's name: it lands in {output_dir}/models/<name>.")
    corpus: str = option("", help="Its training set (a chat JSONL, e.g. a prepared set).")
    base: str = option("", help="The model it is trained from (name, dir or adapter dir).")
    train: dict[str, Any] = option({}, help="Train options over the run's defaults for "
                                   "builds (e.g. {lora: {enabled: true}, max_steps: 100}).")


def build_model(build: ModelBuildConfig, out_dir: Path, tokenization: dict[str, Any]
                ) -> dict[str, Any]:
    """Train one model by stages one and two; the final model (an adapter with LoRA) is
    copied to `out_dir/models/<name>`."""
    from safekeel.annotate.config import AnnotateConfig
    from safekeel.annotate.run import annotate
    from safekeel.train.config import TrainConfig
    from safekeel.train.run import train

    work = out_dir / "build" / build.name
    shards = work / "shards"
    annotate(from_dict(AnnotateConfig, {
        "corpus": {"path": build.corpus}, "policy": build.base, "output_dir": str(shards),
        "tokenization": tokenization}))
    settings = {"progress_bar": False, "save_every": 0, "tokenization": tokenization,
                **build.train, "method": "sft", "policy": build.base, "shards": str(shards),
                "output_dir": str(work / "train")}
    result = train(from_dict(TrainConfig, settings))
    last = json.loads(result.log_path.read_text().splitlines()[-1])
    destination = model_dir(out_dir, build.name)
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(result.final_dir, destination)
    return {"steps": result.steps, "final_loss": last.get("loss"),
            "tokenization_issues": result.tokenization_issues,
            "truncated_examples": result.truncated_examples}


def model_dir(out_dir: Path, name: str) -> Path:
    return out_dir / "models" / name


# --------------------------------------------------------------------------------------
# Measurements of the builds (training-side sets only)
# --------------------------------------------------------------------------------------


@dataclass
class MeasureConfig:
    policy: str = option("", help="The model whose refusal is measured (the safe reference).")
    harmful: str = option("", help="Held-out harmful training-side instructions (JSONL chat).")
    benign: str = option("", help="Held-out benign training-side instructions (JSONL chat).")
    max_new_tokens: int = option(64, help="Greedy tokens per answer.")
    batch_size: int = option(16, help="Prompts per generate call (transformers).")
    guard_heldout: str = option("", help="Guard rows held out (chat with the verdict last).")
    labelled_corpus: str = option("", help="A corpus with a label column, scored by the guard "
                                  "as annotate would (the attack mix's `flag`).")
    label_column: str = option("flag", help="The label column of labelled_corpus.")
    unsafe_values: list[str] = option(["unsafe"], help="Label values that count as unsafe.")
    output: str = option("{output_dir}/build_metrics.json", help="Where the metrics go.")


def greedy_answers(model: str, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   dtype: str = "float32") -> list[str]:
    """Greedy replies by stage three's transformers generator (one user turn each)."""
    from safekeel.data.models import resolve_model_path
    from safekeel.evaluate.generation import (
        GenerationSettings,
        TransformersGenerator,
        render_prompt,
    )

    # a resolved folder: an alias is no hub id to ask for a generation config
    generator = TransformersGenerator(resolve_model_path(model), GenerationSettings(
        backend="transformers", dtype=dtype, max_new_tokens=max_new_tokens,
        batch_size=batch_size))
    try:
        ids = [render_prompt(generator.tokenizer, [{"role": "user", "content": p}])
               for p in prompts]
        return [g.text for g in generator.generate_tokens(ids, max_new_tokens)]
    finally:
        generator.close()


def _user_prompts(path: str) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows]


def measure_refusal(cfg: MeasureConfig) -> dict[str, Any]:
    """Refusal (keywords) on held-out harmful and benign training-side instructions."""
    from safekeel.evaluate.refusal import is_refusal

    result: dict[str, Any] = {"model": cfg.policy}
    for name, path in (("refusal_rate_harmful", cfg.harmful),
                       ("overrefusal_rate_benign", cfg.benign)):
        prompts = _user_prompts(path)
        answers = greedy_answers(cfg.policy, prompts, cfg.max_new_tokens, cfg.batch_size)
        refused = [is_refusal(a) for a in answers]
        result[name] = sum(refused) / len(refused) if refused else None
        result[name.replace("rate", "n")] = len(refused)
        result[name.replace("rate", "example")] = [prompts[0], answers[0]] if prompts else None
    return result


def measure_guard(cfg: MeasureConfig, critic_settings: Any) -> dict[str, Any]:
    """The guard's AUROC on its held-out rows and on a labelled corpus's label column."""
    from dataclasses import replace

    from safekeel.data.auroc import auroc
    from safekeel.data.corpus import CorpusConfig, load_examples
    from safekeel.data.guard.critic import make_critic

    critic = make_critic(replace(critic_settings, progress=False))
    result: dict[str, Any] = {"model": critic_settings.model}
    try:
        if cfg.guard_heldout:
            rows = [json.loads(line) for line in Path(cfg.guard_heldout).read_text().splitlines()
                    if line.strip()]
            pairs = [[{"role": "user", "content": row["source_prompt"]},
                      {"role": "assistant", "content": row["source_response"]}] for row in rows]
            scored = critic.score(pairs)
            unsafe = [row["messages"][-1]["content"] == "unsafe" for row in rows]
            p = [float(x) for x in scored.p_unsafe]
            whole = [i for i, row in enumerate(rows) if not row.get("is_prefix")]
            result["auroc_heldout"] = auroc(p, unsafe)
            result["auroc_heldout_whole_responses"] = auroc([p[i] for i in whole],
                                                            [unsafe[i] for i in whole])
            result["heldout_rows"] = len(rows)
        if cfg.labelled_corpus:
            examples = load_examples(CorpusConfig(path=cfg.labelled_corpus))
            scored = critic.score([ex["messages"] for ex in examples])
            labels = [str(ex.get(cfg.label_column)) in cfg.unsafe_values for ex in examples]
            result["auroc_labelled_corpus"] = auroc([float(x) for x in scored.p_unsafe], labels)
            result["labelled_corpus_rows"] = len(examples)
    finally:
        critic.close()
    return result


def adapter_sha256(directory: str | Path) -> str:
    """sha256 of the adapter weights file (adapter_model.safetensors), else of the folder."""
    directory = Path(directory)
    weights = directory / "adapter_model.safetensors"
    if weights.is_file():
        return hashlib.sha256(weights.read_bytes()).hexdigest()
    return directory_digest(directory)


def with_overrides(instance: Any, overrides: dict[str, Any]) -> Any:
    """A config dataclass with nested overrides applied (validated again)."""
    from safekeel.data.config import deep_merge

    return from_dict(type(instance), deep_merge(to_dict(instance), overrides))
