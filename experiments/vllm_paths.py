"""The same `bbt tune` run on three paths: in process, directly through vLLM, through `bbt serve --upstream`.

    cd /work/main && . .venv/bin/activate
    python -m servers.vllm_launch --port 8001 &           # or any vLLM serving smollm2 (float32, prompt embeds)
    python experiments/vllm_paths.py --vllm http://127.0.0.1:8001 --out runs/paths

Each path is the command a user types (SmolLM2, SST-2 split 42, BBT, 100 queries, L = 10, the
other settings the causal-LM defaults), run one after the other into OUT/PATH; a path whose
metrics.json exists is not run again (resumable). Printed: each path's metrics side by side, with
tuning seconds and queries/s (the machine should be otherwise idle).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serverproc import running_server  # noqa: E402

KEYS = ("no_prompt_test_acc", "zero_prompt_test_acc", "test_acc", "dev_acc", "train_acc", "test_loss", "queries_used",
        "queries_paid", "tuning_seconds", "queries_per_second", "wall_seconds")


def tune(out: Path, budget: int, *extra: str) -> dict:
    if not (out / "metrics.json").exists():
        cmd = ["bbt", "tune", "--model", "smollm2", "--method", "bbt", "--task", "sst2", "--data",
               str(REPO.parent / "shared" / "data" / "sst2"), "--seed", "42", "--budget", str(budget),
               "--prompt-length", "10", "--no-cache", "--quiet", "--out", str(out), *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm", required=True, metavar="URL")
    ap.add_argument("--out", type=Path, default=Path("runs/paths"))
    ap.add_argument("--budget", type=int, default=100)
    args = ap.parse_args()
    rows = {"in-process": tune(args.out / "local", args.budget),
            "vllm": tune(args.out / "vllm", args.budget, "--endpoint", args.vllm)}
    if not (args.out / "upstream" / "metrics.json").exists():
        with running_server("--upstream", args.vllm, "--model", "smollm2", timeout=300) as server:
            rows["upstream"] = tune(args.out / "upstream", args.budget, "--endpoint", server.url)
    else:
        rows["upstream"] = tune(args.out / "upstream", args.budget)
    print(f"{'':24}" + "".join(f"{p:>14}" for p in rows))
    for key in KEYS:
        print(f"{key:24}" + "".join(f"{m[key]:>14.4g}" for m in rows.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
