"""`scripts/gpu_check.sh --cpu-smoke` runs end to end (GPU tests on the CPU, every figure
section at tiny sizes) and writes the JSON and the markdown table: the GPU script cannot rot
while no GPU is around. Figures are not checked against speeds (none is asserted), only that
each section produced positive numbers and every GPU test ran and passed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

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


@pytest.mark.slow
def test_gpu_check_cpu_smoke_scale_sections(tmp_path):
    """`scripts/gpu_check.sh --cpu-smoke --scale-only`: the issue-28 sections (f) layerwise
    rollout, (g) memory plan vs measured peak, (h) EP parity, at tiny sizes on the CPU, each
    ending with rc 0 and its log written. About 30 s on 2 busy cores, but the sections' own
    caps allow minutes, so it is `slow`: `python -m pytest -m slow tests/test_gpu_check.py -k
    scale`."""
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "PYTHON": sys.executable}  # this venv's python
    proc = subprocess.run(
        [os.path.join(REPO_ROOT, "scripts", "gpu_check.sh"), "--cpu-smoke", "--scale-only",
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=660,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    for name in ("layerwise", "plan", "ep"):
        assert f"  {name}: rc 0" in proc.stdout, name
        assert (out / f"scale_{name}.log").stat().st_size > 0, name
    # (f): both gathers timed at batch 1 and 2, and their ratio printed
    for gather in ("whole", "layerwise"):
        for batch in (1, 2):
            ms = re.search(rf"{gather}\s+batch\s+{batch}: +([0-9.]+) ms per forward", text)
            assert ms and float(ms.group(1)) > 0, (gather, batch)
    assert "batch 2: layerwise / whole = " in text
    # (g): the plan printed its verdict and the 3 CPT steps logged losses (no GPU to measure)
    assert re.search(r"memory plan: peak [0-9.]+ GB per GPU on 1 x 80 GB: fits", text)
    losses = re.search(r"plan vs measured: losses \[([^\]]*)\]", text)
    assert losses and len(losses.group(1).split(",")) == 3, losses
    assert "measured: n/a on the CPU" in text
    # (h): every routing case in fp32 and bf16, no FAIL
    assert text.count("expert loads equal") == 6 and "FAIL" not in text
    assert re.search(r"== done in \d+ s: tests rc 0, figures rc 0, scale rc 0", proc.stdout)
