"""Evaluation through lm-eval: the `llada` model, the offline tasks, the entry point, the watcher.

All on a tiny LLaDA2-MoE (vocab of the shipped tokenizer) built here; no network. Torch runs on
one thread (autouse fixture, and OMP_NUM_THREADS=1 in subprocesses): on a shared 2-core machine
OpenMP threads that spin for busy cores made one tiny forward ~250x slower (1.1 s vs 4 ms).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import llada_train
from llada_train.eval.config import as_eval_config
from llada_train.eval.evaluate import (
    ERROR_FILE,
    RESULTS_FILE,
    TASKS_DIR,
    evaluate_checkpoint,
    make_lm,
    run_lm_eval,
)
from llada_train.eval.lm import LLaDALM, cut_at_stop, draw_masks
from llada_train.eval.watch import watch
from llada_train.masks import block_causal_mask
from llada_train.model.io import save_pretrained
from llada_train.model.modeling import LLaDA2MoeModelLM
from llada_train.sampler import SamplerConfig
from llada_train.tokenizer import load_tokenizer, special_ids
from tests.conftest import tiny_config

OFFLINE_TASKS = ["llada_arith_gen", "llada_arith_mc", "llada_code"]
SUBPROCESS_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "offline",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_SILENT": "true",
}


@pytest.fixture(autouse=True)
def one_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(autouse=True, scope="module")
def no_env_report():
    """lm-eval's results carry `torch.utils.collect_env` output (seconds of subprocesses per
    simple_evaluate); it says nothing about the model, so in-process tests skip it."""
    import lm_eval.evaluator

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_model(tokenizer, initializer_range: float = 0.02, seed: int = 0) -> LLaDA2MoeModelLM:
    """Every architectural feature (dense layer 0, grouped MoE + shared expert, GQA, partial
    RoPE) at a width that runs in milliseconds, over the shipped tokenizer's vocabulary."""
    ids = special_ids(tokenizer)
    config = tiny_config(
        vocab_size=len(tokenizer),
        initializer_range=initializer_range,
        eos_token_id=ids.eos_id,
        pad_token_id=ids.pad_id,
        mask_token_id=ids.mask_id,
    )
    torch.manual_seed(seed)
    return LLaDA2MoeModelLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    out = tmp_path_factory.mktemp("tiny") / "hf"
    return save_pretrained(tiny_model(tokenizer), out, tokenizer=tokenizer)


def make_checkpoint(ckpt_root, step: int, model_dir: str) -> str:
    """The layout of llada_train.checkpoint: step_N/{hf/, COMPLETE.json}, published by rename."""
    final = os.path.join(ckpt_root, f"step_{step:08d}")
    partial = final + ".partial"
    shutil.copytree(model_dir, os.path.join(partial, "hf"))
    with open(os.path.join(partial, "COMPLETE.json"), "w") as f:
        json.dump({"step": step}, f)
    os.rename(partial, final)
    return final


def small_eval_config(**overrides):
    base = {
        "tasks": OFFLINE_TASKS,
        "limit": 2,
        "mc_samples": 4,
        "gen_kwargs": {"max_gen_toks": 16},
        "tracking": {"mode": "disabled"},
    }
    return as_eval_config({**base, **overrides})


# ---------------------------------------------------------------------------- tasks end to end
def test_offline_tasks_run_end_to_end(model_dir, tmp_path, monkeypatch):
    """The three shipped tasks through simple_evaluate on a tiny checkpoint, from a foreign cwd
    (task data paths resolve next to the YAMLs): numeric scores, TPF, tokens/s, ELBO SE."""
    monkeypatch.chdir(tmp_path)
    cfg = small_eval_config()
    lm = make_lm(cfg, model_dir)
    summary = run_lm_eval(lm, cfg)
    assert set(summary["scores"]) == set(OFFLINE_TASKS)
    main_metric = {
        "llada_arith_gen": "exact_match",
        "llada_arith_mc": "acc",
        "llada_code": "pass@1",
    }
    for task, metric in main_metric.items():
        assert 0.0 <= summary["scores"][task][metric] <= 1.0, summary["scores"]
    assert summary["n_samples"] == {task: 2 for task in OFFLINE_TASKS}
    # 2 gen + 2 code docs, 16 tokens each at most, >= 1 forward per token of a random model
    assert 0 < summary["generation"]["num_tokens"] <= 4 * 16
    assert 0 < summary["tpf"] <= 1.0 and summary["tokens_per_s"] > 0
    assert summary["sampler"]["preset"] == "speed" and summary["sampler"]["threshold"] == 0.5
    assert summary["loglikelihood"]["requests"] == 2 * 4  # 2 docs x 4 choices
    assert summary["loglikelihood"]["standard_error_mean"] > 0


class OracleLM:
    """Answers from the document itself: the task wiring (prompts, targets, choices, metrics)
    must then score exactly 1.0 (0.0 for the anti-oracle)."""

    @staticmethod
    def make(correct: bool):
        from lm_eval.api.model import LM

        class Oracle(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [
                    f"We add.\n#### {r.doc['answer']}" if correct else "#### -1" for r in requests
                ]

            def loglikelihood(self, requests, disable_tqdm=False):
                out = []
                for r in requests:
                    gold = r.doc["choices"][r.doc["gold"]]
                    is_gold = r.args[1] == gold
                    out.append((0.0 if is_gold == correct else -5.0, False))
                return out

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return Oracle()


@pytest.mark.parametrize("correct", [True, False])
def test_task_wiring_scores_an_oracle_exactly(correct):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = ["llada_arith_gen", "llada_arith_mc"]
    raw = lm_eval.simple_evaluate(
        model=OracleLM.make(correct),
        tasks=tasks,
        limit=5,
        task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    expected = 1.0 if correct else 0.0
    assert raw["results"]["llada_arith_gen"]["exact_match,none"] == expected
    assert raw["results"]["llada_arith_mc"]["acc,none"] == expected


def test_code_metric_runs_tests_in_the_sandbox():
    """process_code is the RL code reward: a right function passes, a wrong one fails."""
    spec = importlib.util.spec_from_file_location("task_utils", os.path.join(TASKS_DIR, "utils.py"))
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = utils.load_jsonl({"test": "../data/code_tasks.jsonl"})["test"][0]
    assert doc["entry_point"] == "clamp_5_10"
    right = "Sure:\n```python\ndef clamp_5_10(x):\n    return max(5, min(10, x))\n```"
    wrong = "```python\ndef clamp_5_10(x):\n    return x\n```"
    assert utils.process_code(doc, [right]) == {"pass@1": 1.0}
    assert utils.process_code(doc, [wrong]) == {"pass@1": 0.0}
    assert utils.process_arith_gen({"answer": "1329"}, ["so 1,329.\n#### 1329"]) == {
        "exact_match": 1.0
    }


def test_entry_point_writes_results_next_to_the_checkpoint(model_dir, tmp_path):
    """`python -m llada_train.eval model_dir=<ckpt>/hf` as a user runs it (W&B offline)."""
    run_dir = tmp_path / "run"
    ckpt = make_checkpoint(run_dir / "checkpoints", 7, model_dir)
    cmd = [
        sys.executable,
        "-m",
        "llada_train.eval",
        f"model_dir={ckpt}/hf",
        "limit=1",
        "mc_samples=2",
        "+gen_kwargs.max_gen_toks=8",
        "sampler=quality",
        "sampler.threshold=0.6",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(ckpt, RESULTS_FILE)) as f:
        summary = json.load(f)
    assert summary["step"] == 7 and summary["checkpoint"] == ckpt
    assert set(summary["scores"]) == set(OFFLINE_TASKS)
    assert summary["sampler"]["preset"] == "custom"  # quality with threshold 0.6
    assert summary["sampler"]["editing_threshold"] == 0.5
    assert summary["tpf"] > 0 and summary["wall_time_s"] > 0
    metrics = [json.loads(line) for line in open(run_dir / "eval" / "metrics.jsonl")]
    assert metrics[-1]["step"] == 7 and "eval/llada_arith_mc/acc" in metrics[-1]
    assert (run_dir / "eval" / "wandb").is_dir()  # the offline W&B run
    assert not list(tmp_path.glob("*.log"))  # nothing written into the cwd


# ---------------------------------------------------------------------------- the ELBO
@pytest.fixture(scope="module")
def sharp_lm(tokenizer) -> LLaDALM:
    """Weights of std 0.5 give peaked, context-dependent predictions, so masking patterns and
    attention layouts change the numbers a lot (std 0.02 predicts ~uniform: no power)."""
    model = tiny_model(tokenizer, initializer_range=0.5)
    return LLaDALM(model=model, tokenizer=tokenizer, sampler_config=SamplerConfig(block_length=4))


def _pairs(num: int, context_len: int, continuation_len: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(10, 1000, (context_len,), generator=g).tolist(),
            torch.randint(10, 1000, (continuation_len,), generator=g).tolist(),
        )
        for _ in range(num)
    ]


@torch.no_grad()
def exact_elbo(lm: LLaDALM, c: list[int], y: list[int], block_causal: bool = True) -> float:
    """E[e] enumerated: sum over non-empty subsets M of y of w(M) * sum_{i in M} log p(y_i | z_M),
    w(M) = P(k = |M|) P(M | k) (n / k) = (1/n) (1/C(n,|M|)) (n/|M|).

    Computed independently of the adapter: for each block b holding a masked position, one
    forward of [x0 before block b ; z_M of block b] under the inference block-causal mask, which
    is what the training layout's noisy block b sees. `block_causal=False` (full attention over
    the whole z_M) is the negative control: a layout bug of that kind must be detected.
    """
    x0 = torch.tensor([*c, *y])
    n, prompt_len, bl = len(y), len(c), lm.block_length
    total = 0.0
    for size in range(1, n + 1):
        weight = (1 / n) / math.comb(n, size) * (n / size)
        for subset in itertools.combinations(range(n), size):
            z = x0.clone()
            z[[prompt_len + i for i in subset]] = lm.mask_id
            blocks = sorted({(prompt_len + i) // bl for i in subset})
            value = 0.0
            for b in blocks if block_causal else [None]:
                end = min((b + 1) * bl, len(x0)) if b is not None else len(x0)
                tokens = torch.cat((x0[: b * bl], z[b * bl : end])) if b is not None else z
                pos = torch.arange(len(tokens))[None]
                mask = block_causal_mask(pos, pos, bl) if b is not None else None
                logits = lm.model(tokens[None], attention_mask=mask, position_ids=pos)[0]
                logits[:, lm.mask_id] = float("-inf")
                logp = logits.log_softmax(-1)
                for i in subset:
                    p = prompt_len + i
                    if b is None or p // bl == b:
                        value += float(logp[p, x0[p]])
            total += weight * value
    return total


def test_elbo_matches_exact_enumeration(sharp_lm):
    """c of 6 tokens, y of 3 with block_length 4: y sits at positions 6, 7 | 8, so it shares
    block 1 with the context's last two tokens and spills into block 2, which must see block 1
    clean. n = 3 has 7 mask subsets: the estimator's expectation is an exact finite sum."""
    (c, y), *_ = _pairs(1, 6, 3)
    exact = exact_elbo(sharp_lm, c, y)
    full_attention = exact_elbo(sharp_lm, c, y, block_causal=False)
    (result,) = sharp_lm.loglikelihood_tokens([(c, y)], num_samples=1024)
    assert result.num_tokens == 3 and result.standard_error > 0
    assert abs(result.estimate - exact) < 4 * result.standard_error, (result, exact)
    # the negative control is far outside the error bars: the test can see a layout bug
    assert abs(full_attention - exact) > 5 * result.standard_error, (full_attention, exact)
    # reproducible: same seed, same numbers
    (again,) = sharp_lm.loglikelihood_tokens([(c, y)], num_samples=1024)
    assert again == result


def test_standard_error_shrinks_as_one_over_sqrt_samples(sharp_lm):
    """SE(16 samples) / SE(64 samples) ~ sqrt(64 / 16) = 2. Averaged over 16 requests of 5
    tokens: one SE from 16 draws has a relative spread of ~1/sqrt(2 * 15) ~ 0.18 (Gaussian
    case), the mean over 16 requests ~0.05; over 10 seeds the ratio ranged 1.76-2.22, so
    [1.5, 2.6] is a wide margin while 1 (no shrinking) or 4 (1/N) fail."""
    pairs = _pairs(16, 6, 5, seed=2)
    few = sharp_lm.loglikelihood_tokens(pairs, num_samples=16)
    many = sharp_lm.loglikelihood_tokens(pairs, num_samples=64)
    ratio = sum(r.standard_error for r in few) / sum(r.standard_error for r in many)
    assert 1.5 < ratio < 2.6, ratio


def test_batching_and_order_do_not_change_estimates(sharp_lm):
    """Requests are seeded by their context and rows of one length share forwards: a request
    scored alone, among others, or with 3 rows per forward gets the same estimate."""
    pairs = _pairs(3, 6, 3, seed=3) + _pairs(2, 9, 4, seed=4)
    together = sharp_lm.loglikelihood_tokens(pairs, num_samples=8)
    alone = [sharp_lm.loglikelihood_tokens([p], num_samples=8)[0] for p in reversed(pairs)][::-1]
    sharp_lm.mc_batch_size = 3
    try:
        small_batches = sharp_lm.loglikelihood_tokens(pairs, num_samples=8)
    finally:
        sharp_lm.mc_batch_size = 64
    for a, b, s in zip(together, alone, small_batches, strict=True):
        assert a.estimate == pytest.approx(b.estimate, abs=1e-4)
        assert a.estimate == pytest.approx(s.estimate, abs=1e-4)
        assert a.is_greedy == b.is_greedy == s.is_greedy


def test_draw_masks_is_stratified():
    """k covers 1..n evenly (N = 4n: each k exactly 4 times) and each row masks exactly k."""
    k, masked = draw_masks(5, 20, torch.Generator().manual_seed(0))
    assert torch.bincount(k, minlength=6)[1:].tolist() == [4] * 5
    assert torch.equal(masked.sum(1), k)


def test_is_greedy_when_the_continuation_is_the_models_own_argmax(sharp_lm):
    """Write y as the one-shot argmax of the fully masked block (given the clean prefix): the
    definition of is_greedy says True; change one token and it says False."""
    c = _pairs(1, 8, 1, seed=5)[0][0]  # context = two full blocks of 4
    block = torch.tensor([*c, *[sharp_lm.mask_id] * 4])
    pos = torch.arange(len(block))[None]
    with torch.no_grad():
        logits = sharp_lm.model(
            block[None], attention_mask=block_causal_mask(pos, pos, 4), position_ids=pos
        )[0, 8:]
    logits[:, sharp_lm.mask_id] = float("-inf")
    y = logits.argmax(-1).tolist()
    (hit,) = sharp_lm.loglikelihood_tokens([(c, y)], num_samples=2)
    (miss,) = sharp_lm.loglikelihood_tokens([(c, y[:3] + [(y[3] + 1) % 1000 + 10])], num_samples=2)
    assert hit.is_greedy and not miss.is_greedy


def test_rolling_windows_score_every_token_once(sharp_lm):
    sharp_lm.max_length = 8
    try:
        tokens = list(range(10, 31))  # 21 tokens: windows [0, 8) then 4 new tokens each
        windows = sharp_lm.rolling_windows(tokens)
        assert [len(c) for c, _ in windows] == [0, 4, 4, 4, 4]
        assert sum((y for _, y in windows), []) == tokens
        for c, y in windows:
            assert len(c) + len(y) <= 8 and (not c or tokens.index(y[0]) == tokens.index(c[-1]) + 1)

        class Request:
            args = (sharp_lm.tokenizer.decode(tokens),)

        (total,) = sharp_lm.loglikelihood_rolling([Request()])
        parts = sharp_lm.loglikelihood_tokens(
            sharp_lm.rolling_windows(sharp_lm._encode(Request.args[0]))
        )
        assert total == pytest.approx(sum(p.estimate for p in parts))
        assert sharp_lm.last_standard_errors[0] > 0
    finally:
        sharp_lm.max_length = 4096


def test_perplexity_task_through_lm_eval(model_dir):
    """A wikitext-shaped task (loglikelihood_rolling, defined inline) through simple_evaluate,
    texts longer than max_length so that they are cut into windows: finite perplexities, and
    bits per byte = -ELBO / (bytes * ln 2) of the rolling estimates."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    texts = ["What is 12 + 30? It is 42, said the tiny model to nobody.", "Compute 5 * 6."]
    lm = LLaDALM(pretrained=model_dir, device="cpu", mc_samples=4, max_length=16)
    task = {
        "task": "tiny_perplexity",
        "custom_dataset": lambda **_: datasets.DatasetDict(
            {"test": datasets.Dataset.from_list([{"text": t} for t in texts])}
        ),
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    }
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )
    scores = raw["results"]["tiny_perplexity"]
    assert len(lm._encode(texts[0])) > 16  # the first text really is windowed
    elbos = [
        sum(r.estimate for r in lm.loglikelihood_tokens(lm.rolling_windows(lm._encode(t))))
        for t in texts
    ]
    num_bytes = sum(len(t.encode()) for t in texts)
    expected_bpb = -sum(elbos) / num_bytes / math.log(2)
    assert scores["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-6)
    assert math.isfinite(scores["word_perplexity,none"]) and scores["word_perplexity,none"] > 1


# ---------------------------------------------------------------------------- generation
def test_generate_until_honours_stop_strings_and_max_gen_toks(model_dir):
    lm = LLaDALM(pretrained=model_dir, device="cpu", sampler="speed", batch_size=2)

    class Request:
        def __init__(self, context, gen_kwargs):
            self.args = (context, gen_kwargs)

    contexts = ["What is 2 + 2?", "Compute 17 * 3.", "Say hi"]
    free = lm.generate_until([Request(c, {"until": [], "max_gen_toks": 12}) for c in contexts])
    stats = lm.speed_stats()
    assert stats["num_tokens"] <= 3 * 12 and stats["num_forwards"] >= stats["num_tokens"] > 0
    assert stats["tpf"] == pytest.approx(stats["num_tokens"] / stats["num_forwards"])
    text = max(free, key=len)
    assert len(text) >= 4
    stop = text[2:4]
    cut = lm.generate_until([Request(c, {"until": [stop], "max_gen_toks": 12}) for c in contexts])
    for full, short in zip(free, cut, strict=True):
        assert short == cut_at_stop(full, [stop]) and stop not in short
    assert cut_at_stop("a\n\nb####c", ["####", "\n\n"]) == "a"


def test_model_args_string_and_unknown_knobs(model_dir):
    lm = LLaDALM.create_from_arg_string(
        f"pretrained={model_dir},device=cpu,sampler=quality,threshold=0.8,mc_samples=5,"
        "editing_threshold=None,chat_template=True,max_gen_toks=24"
    )
    assert lm.sampler_config.threshold == 0.8 and lm.sampler_config.editing_threshold is None
    assert lm.sampler_config.max_post_steps == 16 and lm.mc_samples == 5
    assert lm.max_gen_toks == 24 and lm.use_chat_template
    with pytest.raises(ValueError, match="treshold"):
        LLaDALM.create_from_arg_string(f"pretrained={model_dir},treshold=0.8")


# ---------------------------------------------------------------------------- the watcher
class RecordingTracker:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.logged.append((step, metrics))


def test_watcher_evaluates_new_checkpoints_and_skips_broken_ones(model_dir, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    good = make_checkpoint(root, 10, model_dir)
    broken = make_checkpoint(root, 20, model_dir)
    with open(os.path.join(broken, "hf", "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    partial = root / "step_00000030.partial"  # a save in progress: never read
    shutil.copytree(model_dir, partial / "hf")
    cfg = small_eval_config(tasks=["llada_arith_gen", "llada_arith_mc"], limit=1)
    tracker, stop, records = RecordingTracker(), threading.Event(), []
    thread = threading.Thread(
        target=lambda: records.extend(
            watch(str(tmp_path / "run"), cfg, poll_s=0.05, tracker=tracker, stop=stop)
        )
    )
    thread.start()
    try:
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(broken, ERROR_FILE)) and time.time() < deadline:
            time.sleep(0.05)
        late = make_checkpoint(root, 40, model_dir)  # appears while the watcher runs
        while not os.path.exists(os.path.join(late, RESULTS_FILE)) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert [(r["step"], r["status"]) for r in records] == [(10, "ok"), (20, "failed"), (40, "ok")]
    for path, step in ((good, 10), (late, 40)):
        with open(os.path.join(path, RESULTS_FILE)) as f:
            summary = json.load(f)
        assert summary["step"] == step and summary["tpf"] > 0
    assert not os.path.exists(os.path.join(broken, RESULTS_FILE))
    with open(os.path.join(broken, ERROR_FILE)) as f:
        assert "safetensor" in json.load(f)["error"].lower()
    assert sorted(os.listdir(partial)) == ["hf"]  # untouched
    assert [step for step, _ in tracker.logged] == [10, 20, 40]
    assert "eval/llada_arith_mc/acc" in tracker.logged[0][1] and tracker.logged[1][1] == {
        "eval/failed": 1.0
    }
    # once=True: nothing new but the broken one (retried by a new watcher), then it returns
    again = watch(str(tmp_path / "run"), cfg, poll_s=3600, once=True)
    assert [(r["step"], r["status"]) for r in again] == [(20, "failed")]


def test_evaluate_checkpoint_in_memory_for_the_training_loop(tokenizer, tmp_path):
    """The in-process call of the training loop: a model in memory (train mode), results next
    to the checkpoint, the model left in train mode."""
    model = tiny_model(tokenizer).train()
    ckpt = tmp_path / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    tracker = RecordingTracker()
    summary = evaluate_checkpoint(
        str(ckpt),
        {"tasks": ["llada_arith_mc"], "limit": 1, "mc_samples": 2},
        model=model,
        tokenizer=tokenizer,
        step=5,
        tracker=tracker,
    )
    assert model.training
    assert summary["step"] == 5 and "acc" in summary["scores"]["llada_arith_mc"]
    assert json.load(open(ckpt / RESULTS_FILE))["scores"] == summary["scores"]
    assert tracker.logged[0][0] == 5


WRITER = textwrap.dedent(
    """
    import json, os, shutil, sys, time
    template, root, stop_file = sys.argv[1:4]
    step = 0
    while True:
        step += 1
        final = os.path.join(root, f"step_{step:08d}")
        shutil.copytree(template, os.path.join(final + ".partial", "hf"))
        time.sleep(0.1)  # a save takes a while: readers must never see it half done
        with open(os.path.join(final + ".partial", "COMPLETE.json"), "w") as f:
            json.dump({"step": step}, f)
        os.rename(final + ".partial", final)
        if os.path.exists(stop_file):
            print(step)
            break
        time.sleep(0.3)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_the_watcher_does_not_disturb_training(model_dir, tmp_path, sig):
    """A stand-in training job keeps publishing checkpoints while a watcher process evaluates
    them; the watcher is killed mid-run. The job must go on and exit 0 with every checkpoint
    complete; SIGTERM must also end the watcher promptly."""
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    stop_file = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, model_dir, str(root), str(stop_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llada_train.eval",
            f"watch={tmp_path / 'run'}",
            "poll_s=0.2",
            "tracking=disabled",
            "tasks=[llada_arith_mc]",
            "limit=1",
            "mc_samples=2",
        ],
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = root / "step_00000001" / RESULTS_FILE
        deadline = time.time() + 90
        while not first.exists() and time.time() < deadline and watcher.poll() is None:
            time.sleep(0.1)
        assert first.exists(), "the watcher never evaluated the first checkpoint"
        assert writer.poll() is None  # the job is still running
        watcher.send_signal(sig)
        assert watcher.wait(timeout=30) in (-sig, 128 + sig)
        stop_file.touch()
        out, _ = writer.communicate(timeout=60)
    finally:
        for proc in (watcher, writer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert writer.returncode == 0
    last = int(out.strip())
    assert last >= 2  # it kept writing after the watcher died
    names = sorted(os.listdir(root))
    assert names == [f"step_{s:08d}" for s in range(1, last + 1)]  # none left partial
    for name in names:
        assert sorted(os.listdir(root / name / "hf")) == sorted(os.listdir(model_dir))
    assert json.load(open(first))["step"] == 1


def test_lm_eval_command_line_launcher(model_dir, tmp_path, monkeypatch):
    """`python -m llada_train.eval.cli --model llada ...` is lm-eval's own CLI (run in-process
    here; lm-eval's built-in task index, ~10 s to build, is left out): our model is found, the
    model_args reach it, our tasks are included without --include_path, results are written."""
    import lm_eval.tasks

    from llada_train.eval import cli

    manager = lm_eval.tasks.TaskManager
    monkeypatch.setattr(
        lm_eval.tasks,
        "TaskManager",
        lambda *args, **kwargs: manager(*args, **{**kwargs, "include_defaults": False}),
    )
    monkeypatch.setattr(sys, "argv", ["cli"])
    cli.main(
        [
            "--model",
            "llada",
            "--model_args",
            f"pretrained={model_dir},sampler=quality,mc_samples=3,max_gen_toks=8",
            "--tasks",
            "llada_arith_mc,llada_arith_gen",
            "--limit",
            "1",
            "--batch_size",
            "2",
            "--device",
            "cpu",
            "--output_path",
            str(tmp_path),
        ]
    )
    (path,) = tmp_path.rglob("results*.json")
    results = json.load(open(path))
    assert set(results["results"]) == {"llada_arith_mc", "llada_arith_gen"}
    assert results["config"]["llada_sampler"]["preset"] == "quality"
    assert results["config"]["llada_mc_samples"] == 3


def test_shipped_config_composes():
    """conf/eval.yaml composes over the schema with each sampler preset (struct mode)."""
    from hydra import compose, initialize_config_dir

    from llada_train.eval.config import register_eval_schema

    register_eval_schema()
    with initialize_config_dir(config_dir=llada_train.CONF_DIR, version_base="1.3"):
        for preset, threshold in (("speed", 0.5), ("quality", 0.7)):
            cfg = compose("eval", overrides=[f"sampler={preset}", "model_dir=x"])
            assert cfg.sampler.threshold == threshold and cfg.tracking.mode == "offline"
            assert list(cfg.tasks) == OFFLINE_TASKS
        with pytest.raises(Exception, match="mc_sample"):
            compose("eval", overrides=["mc_sample=3"])
