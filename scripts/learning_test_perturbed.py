"""tests/test_learning.py's run under a float-rounding perturbation, with its figures and bounds.

The learning-regression test must hold on another machine (issue 26, item 6). This runs the
test's exact command plus one of the robustness harness's perturbations (scripts/robustness.py:
`split` = micro-batches of 16 instead of 32, `jitter` = `init_jitter=1e-6`, `none`) and prints
the figures the test asserts and the bounds they break. One run per call, one thread (as the test).

Usage: python scripts/learning_test_perturbed.py none|split|jitter [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), os.path.join(REPO, "scripts")]

import test_learning as T  # noqa: E402
from robustness import PERTURBATIONS, perturbation_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("perturbation", choices=PERTURBATIONS)
    p.add_argument("--out", help="run directory (default: a temporary one, removed after)")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="learning_test_")
    micro = int(next(a for a in T.RUN if a.startswith("micro_batch_size=")).split("=")[1])
    cmd, env = T.run_command(out, perturbation_args(args.perturbation, micro))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        sys.exit(f"training failed:\n{proc.stderr[-3000:]}")
    fig, broken = T.learning_figures(out)
    for k, v in fig.items():
        print(f"{k:>13} {v:.3f}")
    print(json.dumps({"perturbation": args.perturbation, "passes": not broken,
                      "broken": broken, **fig}))  # fmt: skip
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
