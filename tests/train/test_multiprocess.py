"""Two real CPU processes (gloo): one model on both ranks, every row trained on exactly once.
Also: the example accelerate configs for GPU users are ones accelerate accepts.

The run goes through the user's entry point (`-m safekeel.pipeline train`) under a launcher, with
`record_ranks` on: each process writes the example ids it trained on and a checksum of its
final parameters. `accelerate launch --cpu --num_processes 2` would silently run a single
process, so the world size each process saw is checked too.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from safekeel.data.shards import tokenizer_fingerprint
from safekeel.train.run import parameter_checksum
from tests.train.test_run import write_shards

REPO = Path(__file__).resolve().parents[2]
N_ROWS = 11  # odd: the two ranks get different row counts, one ends with a short batch
EPOCHS = 2

LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", "0"],
}


def launch(launcher: str, args: list[str], cwd: Path,
           timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    # The installed package, run as a module (as the README shows), from outside the repo.
    command = [*LAUNCHERS[launcher], "-m", "safekeel.pipeline", "train", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, (
        f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("launcher, lora", [("torchrun", False), ("accelerate", True)])
def test_two_processes_agree_and_see_every_row_once(launcher, lora, tiny_model_dir,
                                                    tiny_tokenizer, tmp_path):
    shards = write_shards(tmp_path / "shards", N_ROWS, tokenizer_fingerprint(tiny_tokenizer))
    out = tmp_path / "out"
    launch(launcher, [
        "--policy", str(tiny_model_dir), "--shards", str(shards), "--output_dir", str(out),
        "--method", "adaptive", "--epochs", str(EPOCHS), "--per_device_batch_size", "2",
        "--learning_rate", "1e-2", "--tokenization.max_length", "64", "--save_every", "0",
        "--progress_bar", "false", "--record_ranks", "true", "--lora.enabled", str(lora).lower(),
    ], cwd=tmp_path)

    summaries = [json.loads((out / "ranks" / f"rank-{r}" / "summary.json").read_text())
                 for r in (0, 1)]
    print("world sizes seen:", [s["world_size"] for s in summaries])
    assert [s["world_size"] for s in summaries] == [2, 2]
    assert [s["rank"] for s in summaries] == [0, 1]
    # DDP keeps the replicas identical: bitwise-equal parameters on both ranks ...
    assert summaries[0]["parameter_sha256"] == summaries[1]["parameter_sha256"]
    # ... and they did train (full fine-tuning: the checksum covers the changed weights;
    # LoRA: it covers the adapter, which starts as a no-op)
    if not lora:
        initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert summaries[0]["parameter_sha256"] != parameter_checksum(initial)

    all_ids = {f"ex-{i:02d}" for i in range(N_ROWS)}
    per_rank = [
        [json.loads(line) for line in (out / "ranks" / f"rank-{r}" / "example_ids.jsonl")
         .read_text().splitlines()]
        for r in (0, 1)
    ]
    # both ranks ran the same number of micro-batches (otherwise DDP would have hung)
    assert len(per_rank[0]) == len(per_rank[1])
    for epoch in range(EPOCHS):
        seen = Counter(
            i for records in per_rank for rec in records if rec["epoch"] == epoch
            for i in rec["ids"]
        )
        assert set(seen) == all_ids and set(seen.values()) == {1}, (epoch, seen)
        rank_sets = [{i for rec in records if rec["epoch"] == epoch for i in rec["ids"]}
                     for records in per_rank]
        assert rank_sets[0] and rank_sets[1] and not rank_sets[0] & rank_sets[1]

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # one log line per step, written once (main process), tokens summed over both ranks
    steps = len(per_rank[0])
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert all(r["loss"] == r["loss"] for r in log)
    final = out / "final"
    assert (final / ("adapter_model.safetensors" if lora else "model.safetensors")).exists()


CONFIGS = REPO / "configs" / "accelerate"
EXPECTED_CONFIGS = {
    "multi_gpu.yaml": "MULTI_GPU",
    "fsdp_llama.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize("name, distributed_type", sorted(EXPECTED_CONFIGS.items()))
def test_example_accelerate_configs_are_accepted(name, distributed_type):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    path = CONFIGS / name
    text = path.read_text()
    # the header says how to run it
    assert f"accelerate launch --config_file configs/accelerate/{name}" in text
    config = ClusterConfig.from_yaml_file(str(path))  # refuses unknown top-level keys
    assert config.distributed_type.value == distributed_type
    # accelerate launch copies the plugin sections' keys onto its own options and ignores
    # the ones it does not know: a misspelt key would silently do nothing
    known = {action.dest for action in launch_command_parser()._actions}
    for section in (config.fsdp_config, config.deepspeed_config):
        unknown = set(section or {}) - known
        assert not unknown, f"{name}: keys accelerate launch does not know: {unknown}"
    if config.fsdp_config:
        import transformers

        layer = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert hasattr(transformers.models.llama.modeling_llama, layer)
    if config.deepspeed_config:
        assert config.deepspeed_config["zero_stage"] == int(name[-6])
