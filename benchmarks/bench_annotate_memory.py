"""Peak memory of annotating a large corpus: it must stream, not grow with the corpus.

Each size runs in its own process (the peak resident set size of a process only grows);
the corpus is short chat rows written as JSONL. The annotate stage runs its data pass
(validation, ids, tokenisation check, shards); the scorers add a fixed-size model on top.

    python benchmarks/bench_annotate_memory.py                  # 100k, 300k, 1M rows
    python benchmarks/bench_annotate_memory.py --sizes 20000 50000
    python benchmarks/bench_annotate_memory.py --quick          # 2k and 5k rows

No model computes here (the tiny policy only tokenises), so there is no precision to pick.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import add_common_arguments, process_peak_mib, say

CHILD = """
import json, resource, sys, time
from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.run import annotate
from safekeel.data.config import from_dict
cfg = from_dict(AnnotateConfig, json.loads(sys.argv[1]))
started = time.perf_counter()
result = annotate(cfg)
print(json.dumps({"rows": result.rows_written, "seconds": time.perf_counter() - started,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_corpus(path: Path, rows: int) -> None:
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"prompt": f"Add {i} and {i % 97}.",
                                 "response": f"The sum is {i + i % 97}."}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="corpus rows, one process each (default 100k 300k 1M)")
    add_common_arguments(parser, dtype=False)
    args = parser.parse_args()
    args.sizes = args.sizes or ([2_000, 5_000] if args.quick else [100_000, 300_000, 1_000_000])
    from safekeel.data.embedded.tiny_models import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy = save_tiny_model(root / "policy")
        results = []
        for size in args.sizes:
            say(f"{size:,} rows: writing the corpus and annotating it")
            corpus = root / f"corpus-{size}.jsonl"
            write_corpus(corpus, size)
            settings = {"corpus": {"path": str(corpus)}, "policy": str(policy),
                        "output_dir": str(root / f"out-{size}"), "rows_per_shard": 50_000}
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            say(f"  {r['rows']:>9,} rows  peak {r['peak_mib']:7.1f} MiB  "
                f"{r['rows'] / r['seconds']:8.0f} rows/s")
    first, last = results[0], results[-1]
    slope = (last["peak_mib"] - first["peak_mib"]) * 1024 * 1024 / (last["rows"] - first["rows"])
    print(f"peak grows {last['peak_mib'] / first['peak_mib']:.2f}x for "
          f"{last['rows'] / first['rows']:.0f}x the rows ({slope:.0f} bytes per extra row)")
    print(f"(this process: {process_peak_mib():.0f} MiB)", time.strftime("%H:%M"))
    say("done")


if __name__ == "__main__":
    main()
