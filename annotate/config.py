"""Options of stage one (annotate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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


# --- engine ray: the cluster and its actor pools (annotate.ray_engine) -------------------
@dataclass
class RayConfig:
    address: str | None = option(None, help="Ray cluster to join (ray://host:10001 or "
                                 "host:6379); None: RAY_ADDRESS if set, else a local Ray "
                                 "started for the run.")
    num_cpus: int | None = option(None, help="CPUs of the local Ray started when no cluster is "
                                  "given; None: all of this machine's.")
    actors: int | None = option(None, help="Guard actors (critic + STAR), one engine each; "
                                "None: the cluster's GPUs / gpus_per_actor, or 1 without GPUs.")
    gpus_per_actor: float | None = option(None, help="GPUs per guard actor; None: "
                                          "critic.tensor_parallel_size on a cluster with GPUs, "
                                          "else 0.")
    cpus_per_actor: float = option(1.0, help="CPUs reserved per guard or probe actor.")
    batch_size: int = option(256, help="Rows Ray Data hands an actor per call (the critic "
                             "splits them into engine calls of critic.batch_size).")
    probe_actors: int = option(1, help="Probe actors (each holds the policy model).")
    probe_gpus_per_actor: float = option(0.0, help="GPUs per probe actor.")

    def validate(self) -> None:
        for name in ("actors", "num_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1 or None, got {value}")
        if self.batch_size < 1 or self.probe_actors < 1:
            raise ConfigError("batch_size and probe_actors: must be at least 1")
        for name in ("gpus_per_actor", "cpus_per_actor", "probe_gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name}: must not be negative, got {value}")
# --- end engine ray ---------------------------------------------------------------------


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
    engine: Literal["local", "ray"] = option("local", help="local: this process scores "
                                             "everything; ray: Ray Data actor pools on a Ray "
                                             "cluster (see `ray`).")
    ray: RayConfig = option(RayConfig, help="engine=ray: the cluster and its actor pools.")
    num_workers: int = option(1, help="Single-machine fallback without Ray: split the corpus "
                              "into this many parts, one process each (e.g. one per GPU), "
                              "all writing to one output_dir; prefer engine=ray.")
    worker_index: int = option(0, help="Which part this process annotates, 0-based.")

    def validate(self) -> None:
        if self.star.enabled and not self.critic.enabled:
            raise ConfigError("star.enabled: STAR scores prefixes with the critic; set critic.model")
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard: must be at least 1, got {self.rows_per_shard}")
        if not 1 <= self.row_group_size:
            raise ConfigError(f"row_group_size: must be at least 1, got {self.row_group_size}")
        if self.critic.data_parallel_size != 1:
            # vLLM's data-parallel ranks would each annotate (and write) the whole corpus
            raise ConfigError(
                "critic.data_parallel_size: annotate does not split rows between vLLM ranks; "
                "for data parallelism use engine=ray (ray.actors guard engines, one per "
                f"ray.gpus_per_actor GPUs), got {self.critic.data_parallel_size}")
        if self.engine == "ray" and self.num_workers != 1:
            raise ConfigError("num_workers: engine=ray schedules the work itself; leave "
                              f"num_workers at 1, got {self.num_workers}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers: must be at least 1, got {self.num_workers}")
        if not 0 <= self.worker_index < self.num_workers:
            raise ConfigError(
                f"worker_index: must be in [0, {self.num_workers - 1}], got {self.worker_index}"
            )
