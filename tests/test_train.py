"""CPT/SFT end to end on CPU with real DeepSpeed engines: equivalence, resume, crash safety.

Each test launches the real entry points (`python -m llada_train.sft`, `torchrun`) on a small
slice of the shipped data. Losses are compared through `metrics.jsonl`.
Tolerance of the 2-process comparison: losses within 1e-5 relative (measured: identical to 6
decimals), gradient norms within 1e-4 relative; the only differences are float32 summation
orders of the gradient all-reduce and of ZeRO's partitioned buffers.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from llada_train import DATA_DIR
from llada_train.checkpoint import complete_checkpoints
from llada_train.model.io import from_pretrained
from llada_train.tracking import read_metrics

SMALL = [
    "+recipe=tiny",
    # Width 128 (the recipe's is 256): faster, and with 2 processes the grad norm of the wider
    # model drifted 1.1e-4 relative from 1 process (fp32 reduction order; losses still 1e-5).
    "model.hidden_size=128",
    "model.intermediate_size=384",
    "model.moe_intermediate_size=64",
    "max_steps=4",
    "micro_batch_size=2",
    "global_batch_size=4",
    "checkpoint.save_every=2",
    "checkpoint.smoke_prompts=1",
    "checkpoint.smoke_gen_length=8",
    "tracking=disabled",
    "progress=false",
    "checkpoint.eval_every_saves=0",  # the background evaluation has a test of its own
    f"heldout.files=[{os.path.join(DATA_DIR, 'shipped', 'sft_eval.jsonl')}]",
    "heldout.every=2",  # the held-out check, also under ZeRO-3 with 2 processes (a collective)
    "heldout.num_questions=3",
    "heldout.gen_length=8",
]


def run_entry(
    entry: str, out, *overrides: str, nproc: int = 1, env: dict | None = None, check=True
):
    if nproc == 1:
        cmd = [sys.executable, "-m", f"llada_train.{entry}"]
    else:
        port = str(29500 + os.getpid() % 1000)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", port, "-m", f"llada_train.{entry}"]  # fmt: skip
    cmd += [*SMALL, f"output_dir={out}", *overrides]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir) -> list[float]:
    return [m["loss/total"] for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """1 process, ZeRO-0, 4 steps, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_entry("sft", out)
    return out


def test_reference_run_learns_and_checkpoints(reference_run):
    values = losses(reference_run)
    assert len(values) == 4 and values[-1] < values[0]
    metrics = read_metrics(reference_run)[-1]
    for key in ("loss/m2t", "loss/t2t", "loss/keep", "acc/m2t", "lr", "grad_norm", "tokens_per_s",
                "moe/max_load_ratio", "acc/m2t/response", "acc/m2t/pad", "ce/total/response",
                "heldout/exact_match", "heldout/tpf"):  # fmt: skip
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    # the split adds up: response + padding = every supervised token
    assert metrics["tokens/m2t/response"] + metrics["tokens/m2t/pad"] == metrics["tokens/m2t"]
    assert metrics["tokens/m2t/pad"] > 0  # the shipped chats are mostly EOS padding
    checked = [m["step"] for m in read_metrics(reference_run) if "heldout/exact_match" in m]
    assert checked == [2, 4]
    steps = [s for s, _ in complete_checkpoints(os.path.join(reference_run, "checkpoints"))]
    assert steps == [2, 4]
    smoke = json.load(
        open(os.path.join(reference_run, "checkpoints", "step_00000004", "smoke_generation.json"))
    )
    assert smoke["step"] == 4 and len(smoke["samples"]) == 1


@pytest.mark.parametrize("stage", ["2", "3", "3_offload"])
def test_two_processes_reproduce_one(reference_run, tmp_path, stage):
    """ZeRO-2, ZeRO-3 and ZeRO-3 with optimizer and parameters offloaded to host memory
    (DeepSpeed's CPU Adam, compiled on first use) against 1 process without ZeRO."""
    out = tmp_path / "run"
    run_entry("sft", out, f"deepspeed=zero{stage}", "checkpoint.save_every=100", nproc=2)
    ref, got = read_metrics(reference_run), read_metrics(out)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got, strict=True):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5)
        assert b["tokens/total"] == a["tokens/total"]  # the same corruption, token for token
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_zero3_init_from_and_export_equal_one_process(reference_run, tmp_path):
    """ZeRO-3 fills init_from and writes the HF export one decoder layer at a time: 2 ZeRO-3
    processes must train from the same weights and export the same weights as 1 process."""
    init = os.path.join(reference_run, "checkpoints", "step_00000004", "hf")
    one, two = tmp_path / "one", tmp_path / "two"
    run_entry("sft", one, f"init_from={init}", "max_steps=2")
    run_entry("sft", two, f"init_from={init}", "max_steps=2", "deepspeed=zero3", nproc=2)
    a, b = read_metrics(one), read_metrics(two)
    assert a[0]["loss/total"] < read_metrics(reference_run)[0]["loss/total"]  # trained weights
    for x, y in zip(a, b, strict=True):
        assert y["loss/total"] == pytest.approx(x["loss/total"], rel=1e-5)
    smoke = os.path.join(two, "checkpoints", "step_00000002", "smoke_generation.json")
    assert len(json.load(open(smoke))["samples"]) == 1  # decoded under ZeRO-3, no deadlock
    export = os.path.join("checkpoints", "step_00000002", "hf")
    want = from_pretrained(os.path.join(one, export)).state_dict()
    got = from_pretrained(os.path.join(two, export)).state_dict()
    assert want.keys() == got.keys()
    for name, t in want.items():  # Adam turns reduction-order noise in near-zero gradients
        # into lr-scale steps: measured at most 8.4e-6 apart (weights ~0.1; a bad load: ~0.1)
        torch.testing.assert_close(got[name], t, rtol=0, atol=5e-5, msg=name)


def test_sigkill_then_resume_equals_uninterrupted(reference_run, tmp_path):
    out = tmp_path / "run"
    proc = run_entry("sft", out, env={"LLADA_TRAIN_FAULT": "kill_after_step:3"}, check=False)
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), proc.stderr[-2000:]
    assert len(losses(out)) == 3  # step 3 ran after the step-2 checkpoint, then the kill
    run_entry("sft", out, "resume=auto")
    assert losses(out) == losses(reference_run)  # bit-identical, step 3 recomputed


def test_kill_during_save_keeps_previous_checkpoint(reference_run, tmp_path):
    out = tmp_path / "run"
    proc = run_entry("sft", out, env={"LLADA_TRAIN_FAULT": "kill_in_save:4"}, check=False)
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), proc.stderr[-2000:]
    ckpts = os.path.join(out, "checkpoints")
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2]
    assert os.path.isdir(os.path.join(ckpts, "step_00000004.partial"))  # the interrupted save
    from_pretrained(os.path.join(ckpts, "step_00000002", "hf"))  # previous export still loads
    run_entry("sft", out, "resume=auto")
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2, 4]
    assert not os.path.exists(os.path.join(ckpts, "step_00000004.partial"))
    assert losses(out) == losses(reference_run)


def test_hf_export_reloads_with_identical_logits(reference_run):
    ckpt = os.path.join(reference_run, "checkpoints", "step_00000004")
    exported = from_pretrained(os.path.join(ckpt, "hf"))
    ds_state = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), weights_only=False)[
        "module"
    ]
    trained = from_pretrained(os.path.join(ckpt, "hf"))
    trained.load_state_dict(ds_state)
    ids = torch.randint(5, 1000, (2, 40))
    with torch.no_grad():
        assert torch.equal(exported(ids), trained(ids))
    assert os.path.exists(os.path.join(ckpt, "hf", "tokenizer.json"))
    proc = subprocess.run(
        [sys.executable, "-m", "llada_train.generate", f"model_dir={ckpt}/hf", "stream=false",
         "prompt=What is 1 + 2?", "sampler.gen_length=32"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0 and ">>> What is 1 + 2?" in proc.stdout, proc.stderr[-2000:]


def test_cpt_runs_with_packed_documents(tmp_path):
    out = tmp_path / "cpt"
    run_entry(
        "cpt", out, "checkpoint.save_every=100", "checkpoint.smoke_prompts=0", "data.max_length=64"
    )
    values = losses(out)
    assert len(values) == 4 and values[-1] < values[0]


def test_mini_dry_run_prints_sizes_without_allocating():
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, "-m", "llada_train.sft", "+recipe=mini", "dry_run=true"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(16.26B)" in proc.stdout and "(1.43B)" in proc.stdout
    assert '"stage": 3' in proc.stdout and '"train_micro_batch_size_per_gpu": 1' in proc.stdout
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert max(peak_kb, before) < 3 * 1024 * 1024  # < 3 GiB: 16B fp32 weights would be 65 GB


def test_bad_record_names_file_and_line(tmp_path):
    data = tmp_path / "chats.jsonl"
    good = {
        "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    }
    data.write_text(json.dumps(good) + "\n" + json.dumps({"msgs": []}) + "\n")
    proc = run_entry("sft", tmp_path / "run", f"data.train_files=[{data}]", check=False)
    assert proc.returncode != 0
    assert f"{data}:2: missing field 'messages'" in proc.stderr


def test_mini_recipe_without_weights_says_what_to_pass():
    proc = subprocess.run(
        [sys.executable, "-m", "llada_train.sft", "+recipe=mini"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "init_from=/path/to/checkpoint_dir" in proc.stderr


def test_in_process_evaluation_of_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_entry(
        "sft", out, "max_steps=2",
        "checkpoint.eval_every_saves=1", "checkpoint.eval_mode=in_process",
        "checkpoint.eval={tasks: [llada_arith_gen], limit: 4, tracking: {mode: disabled}}",
    )  # fmt: skip
    results = json.load(
        open(os.path.join(out, "checkpoints", "step_00000002", "eval_results.json"))
    )
    assert results["step"] == 2 and "llada_arith_gen" in json.dumps(results)
    assert any("eval/" in k or "llada_arith_gen" in k for m in read_metrics(out) for k in m)


def test_every_checkpoint_is_evaluated_in_the_background_by_default(tmp_path):
    """The default (eval_every_saves=1, eval_mode auto = background on CPU): a watcher process
    started by the run evaluates each checkpoint, outlives the training process, evaluates the
    last save and exits by itself."""
    out = tmp_path / "run"
    proc = run_entry(
        "sft", out, "max_steps=2", "checkpoint.save_every=1", "checkpoint.eval_every_saves=1",
        "checkpoint.eval={tasks: [llada_arith_gen], limit: 2}",
    )  # fmt: skip
    assert "evaluating every checkpoint in the background" in proc.stdout
    pid = int(open(os.path.join(out, "eval", "watcher.pid")).read())
    deadline = time.monotonic() + 600
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.5)  # a bounded wait for a process, not a timing assertion
    assert not os.path.exists(f"/proc/{pid}"), "the watcher did not exit after training"
    log = open(os.path.join(out, "eval", "watcher.log")).read()
    for step in (1, 2):
        path = os.path.join(out, "checkpoints", f"step_{step:08d}", "eval_results.json")
        assert os.path.exists(path), log[-3000:]
        assert json.load(open(path))["step"] == step
    assert "2 evaluated, 0 failed" in log


@pytest.mark.parametrize(
    ("entry", "micro", "steps", "lr"), [("sft", 32, 1200, 3.0e-3), ("cpt", 16, 100, 1.0e-4)]
)
def test_cpt_recipe_is_merged_over_the_shared_one(entry, micro, steps, lr):
    """recipes/cpt/tiny.yaml overrides the batch, step counts, rate and schedule of
    recipes/tiny.yaml for the cpt entry only; everything else (model, block length) comes from
    the shared recipe."""
    from hydra import compose, initialize_config_dir

    import llada_train
    from llada_train.config import register_configs

    register_configs(entry)
    with initialize_config_dir(config_dir=llada_train.CONF_DIR, version_base="1.3"):
        cfg = compose(entry, overrides=["+recipe=tiny"])
    assert (cfg.micro_batch_size, cfg.max_steps) == (micro, steps)
    assert cfg.block_length == 32 and cfg.optim.lr == lr and cfg.model.hidden_size == 256


def test_mask_only_run_checks_held_out_with_editing_off(tmp_path):
    """A mask-only run (corruption=mask_only) never trains a visible position, so its T2T
    proposals are arbitrary: its held-out check must decode M2T only and say so."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from llada_train.run import Run

    def trains_t2t(**corruption) -> bool:
        zero = {"noise_max": 0.0, "keep_share": 0.0, "mtf_fraction": 0.0}
        cfg = {"corruption": {**zero, **corruption}}
        return Run.trains_t2t.fget(SimpleNamespace(cfg=OmegaConf.create(cfg)))

    assert not trains_t2t()
    assert trains_t2t(noise_max=0.2) and trains_t2t(keep_share=0.3) and trains_t2t(mtf_fraction=0.5)
    assert Run.trains_t2t.fget(SimpleNamespace(cfg=OmegaConf.create({})))  # RL: no corruption

    proc = run_entry("sft", tmp_path / "run", "corruption=mask_only", "max_steps=2",
                     "checkpoint.save_every=100")  # fmt: skip
    assert "[step 2] held-out exact match" in proc.stdout
    assert "editing off: the corruption trains no T2T" in proc.stdout
    assert "heldout/exact_match" in read_metrics(tmp_path / "run")[-1]

    # The fact travels with the export, and decoding it with editing on warns.
    import warnings

    from llada_train.model.io import load_training_facts, save_training_facts
    from llada_train.run import t2t_trained
    from llada_train.sampler import sampler_config

    export = next((tmp_path / "run" / "checkpoints").glob("step_*/hf"))
    assert load_training_facts(str(export))["t2t_trained"] is False
    with pytest.warns(UserWarning, match="trained without T2T supervision"):
        sampler_config({"editing_threshold": 0.5}, str(export))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampler_config({"editing_threshold": None}, str(export)).editing_threshold is None

    # Stages chain: T2T anywhere before makes it True; RL (no corruption) inherits; a model
    # with no facts (not trained here) leaves it unknown unless this run adds T2T.
    mask_only = OmegaConf.create({"noise_max": 0.0, "keep_share": 0.0, "mtf_fraction": 0.0})
    noisy = OmegaConf.create({"noise_max": 0.2, "keep_share": 0.0, "mtf_fraction": 0.0})
    for name, fact in (("t2t", True), ("m2t", False)):
        (tmp_path / name).mkdir()
        save_training_facts(str(tmp_path / name), {"t2t_trained": fact})
    assert t2t_trained(mask_only, None) is False and t2t_trained(noisy, None) is True
    assert t2t_trained(mask_only, str(tmp_path / "t2t")) is True
    assert t2t_trained(mask_only, str(tmp_path / "m2t")) is False
    assert t2t_trained(None, str(tmp_path / "m2t")) is False
    assert t2t_trained(None, str(tmp_path / "t2t")) is True
    assert (
        t2t_trained(mask_only, str(tmp_path)) is None and t2t_trained(None, str(tmp_path)) is None
    )
    assert t2t_trained(noisy, str(tmp_path)) is True
