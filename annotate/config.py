"""Options of stage one (annotate)."""

from __future__ import annotations

from dataclasses import dataclass

from safekeel.annotate.probe_stage import ProbeApplyConfig
from safekeel.annotate.reference_stage import ReferenceConfig
from safekeel.data.config import ConfigError, option
from safekeel.data.corpus import CorpusConfig
from safekeel.data.guard.settings import GuardSettings
from safekeel.data.tokenization import TokenizationConfig


@dataclass
class StarConfig:
    enabled: bool = option(False, help="Score partial responses with the critic (STAR); needs "
                           "critic.model.")
    segment_tokens: int = option(32, help="Segment length M in policy tokens: the guard scores "
                                 "the prompt plus each prefix response[:k*M].")

    def validate(self) -> None:
        if self.segment_tokens < 1:
            raise ConfigError(f"segment_tokens: must be at least 1, got {self.segment_tokens}")


@dataclass
class AnnotateConfig:
    corpus: CorpusConfig = option(CorpusConfig, help="The fine-tuning corpus to annotate.")
    policy: str = option("", help="The policy model (HF dir, hub name, or smollm2-135m-instruct): "
                         "its tokenizer defines response tokens and shard provenance.")
    trust_remote_code: bool = option(False, help="Allow model code from the hub (off unless "
                                     "you trust the repository).")
    tokenization: TokenizationConfig = option(TokenizationConfig, help="Chat tokenisation.")
    critic: GuardSettings = option(GuardSettings, help="The Safety Critic (guard LLM).")
    star: StarConfig = option(StarConfig, help="STAR trajectories over partial responses.")
    probe: ProbeApplyConfig = option(ProbeApplyConfig, help="The harmful-intent probe.")
    reference: ReferenceConfig = option(ReferenceConfig, help="The precomputed reference "
                                        "(the policy's log-probs) for training.")
    output_dir: str = option("runs/annotate", help="Where shards, manifest and report go.")
    rows_per_shard: int = option(4096, help="Rows per Parquet shard (the unit of resume).")
    row_group_size: int = option(2048, help="Rows per Parquet row group.")
    num_workers: int = option(1, help="Split the corpus into this many disjoint parts "
                              "(one per machine or process).")
    worker_index: int = option(0, help="Which part this process annotates, 0-based.")

    def validate(self) -> None:
        if self.star.enabled and not self.critic.enabled:
            raise ConfigError("star.enabled: STAR scores prefixes with the critic; set critic.model")
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard: must be at least 1, got {self.rows_per_shard}")
        if not 1 <= self.row_group_size:
            raise ConfigError(f"row_group_size: must be at least 1, got {self.row_group_size}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers: must be at least 1, got {self.num_workers}")
        if not 0 <= self.worker_index < self.num_workers:
            raise ConfigError(
                f"worker_index: must be in [0, {self.num_workers - 1}], got {self.worker_index}"
            )
