"""tests/test_learning.py's run under a float-rounding perturbation, with its figures and bounds.

The learning-regression test must hold on another machine (issue 26, item 6). This runs the
test's exact command plus one of the robustness harness's perturbations (scripts/robustness.py:
`split` = micro-batches of 16 instead of 32, `jitter` = `init_jitter=1e-6`, `none`) and prints
the figures the test asserts, next to its bounds. One run per call, one thread (as the test).

Usage: python scripts/learning_test_perturbed.py split|jitter|none [--out DIR]
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
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import test_learning as T  # noqa: E402

from llada_train.checkpoint import resolve_model_dir  # noqa: E402
from llada_train.tracking import read_metrics  # noqa: E402

EXTRA = {"split": ["micro_batch_size=16"], "jitter": ["init_jitter=1e-6"], "none": []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("perturbation", choices=sorted(EXTRA))
    p.add_argument("--out", help="run directory (default: a temporary one, removed after)")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="learning_test_")
    cmd = [sys.executable, "-m", "llada_train.sft", *T.RUN, *EXTRA[args.perturbation],
           f"output_dir={out}"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        sys.exit(f"training failed:\n{proc.stderr[-3000:]}")
    rows = read_metrics(out)

    def mean(key: str, steps: range) -> float:
        return sum(m[key] for m in rows if m["step"] in steps) / len(steps)

    last = range(T.STEPS - 9, T.STEPS + 1)
    fig = {
        "first_acc": (mean("acc/m2t/response", range(1, 6)), f"<= {T.MAX_FIRST_ACC}"),
        "last_acc": (mean("acc/m2t/response", last), f">= {T.MIN_LAST_ACC}"),
        "last_ce": (mean("ce/m2t/response", last), f"<= {T.MAX_LAST_CE}"),
        "last_pad_acc": (mean("acc/m2t/pad", last), "> last_acc"),
        "copy_rate": (T.copy_rate(resolve_model_dir(out), n=50), f">= {T.MIN_COPY_RATE}"),
    }
    ok = (
        fig["first_acc"][0] <= T.MAX_FIRST_ACC
        and fig["last_acc"][0] >= T.MIN_LAST_ACC
        and fig["last_ce"][0] <= T.MAX_LAST_CE
        and fig["last_pad_acc"][0] > fig["last_acc"][0]
        and fig["copy_rate"][0] >= T.MIN_COPY_RATE
    )
    for k, (v, bound) in fig.items():
        print(f"{k:>13} {v:.3f}  (test: {bound})")
    print(json.dumps({"perturbation": args.perturbation, "passes": ok,
                      **{k: v for k, (v, _) in fig.items()}}))  # fmt: skip
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
