"""`scripts/gpu_check.sh --cpu-smoke` runs end to end (GPU tests on the CPU, every figure
section at tiny sizes) and writes the JSON and the markdown table: the GPU script cannot rot
while no GPU is around. Figures are not checked against speeds (none is asserted), only that
each section produced positive numbers and every GPU test ran and passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from llada_train import REPO_ROOT


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHON": sys.executable}  # this venv's python
    proc = subprocess.run(
        [os.path.join(REPO_ROOT, "scripts", "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and not report["errors"]
    tests = report["tests"]
    assert len(tests) >= 3 and all(v == "passed" for v in tests.values()), tests
    (attention,) = report["attention"]
    assert attention["sdpa_ms"] > 0 and attention["flex_ms"] > 0
    assert report["train"]["flex_tokens_per_s"] > 0 and report["train"]["sdpa_tokens_per_s"] > 0
    assert report["moe"]["grouped_ms"] > 0 and report["moe"]["loop_ms"] > 0
    assert [r["batch"] for r in report["sampler"]] == [1, 2]
    assert all(r["block_forward_ms"] > 0 and r["tpf"] > 0 for r in report["sampler"])
    assert set(report["goals"]) == {"mfu_pct", "sampler_bound_ratio", "attention_speedup_4k"}
    table = (out / "gpu_check.md").read_text()
    assert "| attention, 2L tokens |" in table and "| sampler batch |" in table
