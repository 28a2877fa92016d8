"""What the held-out chance check of `bbt tune` says about finished runs, and what heeding it buys.

    cd /work/main && . .venv/bin/activate
    bbt sweep --model minilm --tasks sst2 agnews rte --data-root ../shared/data --seeds 13 42 87 \\
        --budgets 500 --test-limit 500 --out runs/chk-minilm
    python experiments/chance_check.py runs/chk-minilm [more sweep folders]

Every run's metrics.json holds `held_out_check`: how many standard errors the returned prompt's
cross-entropy on its held-out split (dev, 32 inputs on a two-class task) sits below that of a
guess that ignores the input (ln C on a balanced split), and whether that clears 1.645 (one-sided 5%). A run that fails it warns that its
gain is not to be trusted. This prints, per model and task, mean test accuracy over the seeds of
the tuned prompt and of the plain model, which runs failed the check, and the mean a user would
get by keeping the plain model where the check failed (the tuned prompt elsewhere). Nothing here
looks at test scores to decide: the check reads the held-out split only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def cells(sweeps: list[Path]) -> list[dict]:
    out = []
    for sweep in sweeps:
        for metrics_file in sorted(sweep.glob("cells/*/metrics.json")):
            m = json.loads(metrics_file.read_text())
            config = json.loads((metrics_file.parent / "config.json").read_text())
            check = m.get("held_out_check")
            if check is None:
                raise SystemExit(f"{metrics_file}: no held_out_check (a run from before the check); run the sweep again")
            out.append({"model": config["config"]["model"], "task": config["task"]["name"],
                        "seed": config["config"]["seed"], "test": 100 * m["test_acc"],
                        "plain": 100 * m["no_prompt_test_acc"], "t": check["above_chance"], "passed": check["passed"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="bbt sweep folders")
    args = p.parse_args()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in cells(args.sweeps):
        groups[(c["model"], c["task"])].append(c)
    print("| model | task | plain model | tuned | failed the check (seed: t) | heeding the check | its gap to the plain model |")
    print("|---|---|---|---|---|---|---|")
    for (model, task), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["seed"])
        plain = statistics.mean(r["plain"] for r in rows)
        tuned = statistics.mean(r["test"] for r in rows)
        heeded = statistics.mean(r["test"] if r["passed"] else r["plain"] for r in rows)
        failed = ", ".join(f"{r['seed']}: {r['t']:.2f}" for r in rows if not r["passed"]) or "none"
        seeds = "" if len(rows) == 3 else f" ({len(rows)} seeds)"
        print(f"| {model} | {task}{seeds} | {plain:.1f} | {tuned:.1f} ({tuned - plain:+.1f}) | {failed} | "
              f"{heeded:.1f} | {heeded - plain:+.1f} |")


if __name__ == "__main__":
    main()
