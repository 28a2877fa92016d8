"""What a finished run keeps on disk, before and after its checkpoint drops its CMA-ES states.

Each run folder's checkpoint (state.json and state.parts/, as the run left it) is loaded, marked
finished with the stop reason its metrics.json records, and saved by this checkout's
`bbt.checkpoint` into a scratch folder, as a finished run now writes it; the run folders are only
read. Prints per run the method, the checkpoint's MB as it is and as it becomes, and the whole
folder's MB both ways.

    python experiments/finished_checkpoint.py runs/bf16-accuracy-2/sst2-100-float32 runs/bench-precision-200/agnews-bbt-float32
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bbt import checkpoint, rundir

MB = 1024 * 1024


def checkpoint_bytes(state: Path) -> int:
    parts = checkpoint.parts_dir(state)
    return state.stat().st_size + sum(f.stat().st_size for f in parts.iterdir() if f.is_file())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (metrics.json and state.json)")
    args = parser.parse_args()
    print("run | method | checkpoint MB before | after | after/before | folder MB before | after")
    for run in args.runs:
        state_file, metrics = run / rundir.STATE_FILE, rundir.read_metrics(run)
        if metrics is None or not state_file.exists():
            print(f"{run}: not a finished run with a checkpoint, skipped")
            continue
        state = checkpoint.load(state_file)
        state.tuning.stop_reason = metrics["stop_reason"]
        with tempfile.TemporaryDirectory() as scratch:
            final = Path(scratch) / rundir.STATE_FILE
            checkpoint.save(final, state)
            before, after = checkpoint_bytes(state_file), checkpoint_bytes(final)
        whole = folder_bytes(run)
        method = json.loads((run / rundir.CONFIG_FILE).read_text())["config"]["method"]
        print(f"{run} | {method} | {before / MB:.2f} | {after / MB:.3f} | {after / before:.4f} | "
              f"{whole / MB:.1f} | {(whole - before + after) / MB:.1f}", flush=True)


if __name__ == "__main__":
    main()
