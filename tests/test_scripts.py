"""The issue-17 study scripts' bookkeeping, on hand-computed cases (scripts/ is not a package)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest

from llada_train import REPO_ROOT
from llada_train.tracking import optional_pyplot


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO_ROOT, "scripts", name + ".py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rl_compare = _load("rl_compare")
learning_probe = _load("learning_probe")
frontier = _load("frontier")
robustness = _load("robustness")


def test_rl_curve_keeps_one_point_per_step_the_last_logged(tmp_path):
    rows = [
        {"step": 0, "eval/reward": 0.5},
        {"step": 1, "loss": 1.0},
        {"step": 10, "eval/reward": 0.6},
        {"step": 10, "eval/reward": 0.65},  # logged again by a resumed run
        {"step": 5, "eval/reward": 0.55},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rl_compare.curve(str(tmp_path)) == [(0, 0.5), (5, 0.55), (10, 0.65)]


def test_rl_curve_without_held_out_reward_says_so(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="eval/reward"):
        rl_compare.curve(str(tmp_path))


def test_rl_summary_is_mean_and_population_std_over_seeds():
    runs = [
        {"variant": "ebpo", "seed": s, "start": 0.7, "end": e, "gain": e - 0.7, "best": e,
         "wall_s": w}
        for s, e, w in ((0, 0.8, 100.0), (1, 0.9, 300.0))
    ]  # fmt: skip
    (row,) = rl_compare.summarize(runs)
    assert row["seeds"] == [0, 1]
    assert row["end_mean"] == pytest.approx(0.85) and row["end_std"] == pytest.approx(0.05)
    assert row["gain_mean"] == pytest.approx(0.15) and row["start_std"] == 0.0
    assert row["wall_s_mean"] == 200.0


def test_place_accuracy_counts_places_right_aligned_and_per_number():
    # addition: units, tens, hundreds from the right; a short answer misses the high places
    assert learning_probe.place_accuracy(["134", "34", "99"], ["134", "134", "98"]) == [
        0.667, 1.0, 0.5
    ]  # fmt: skip
    # sorting: the k-th number of the spaced answer
    assert learning_probe.place_accuracy(["1 2 3", "1 3"], ["1 2 3", "1 2 3"]) == [1.0, 0.5, 0.5]


def test_frontier_report_only_rebuilds_mean_and_std_from_each_seeds_sweep_file(
    tmp_path, monkeypatch
):
    out = tmp_path / "study"
    for seed, acc in ((0, 0.5), (1, 1.0)):
        rows = [
            {"task": "sort", "seed": seed, "model": "mask_noise", "setting": setting,
             "editing": editing, "editing_threshold": 0.0 if editing else None,
             "threshold": 0.7, "accuracy": acc, "tpf": 2.0 + seed}
            for setting, editing in (("sweep, editing off", False), ("sweep, editing on", True),
                                     ("Q preset", True), ("S preset", True))
        ]  # fmt: skip
        (out / f"seed{seed}").mkdir(parents=True)
        (out / f"seed{seed}" / "sweep.json").write_text(json.dumps(rows))
    argv = ["frontier.py", "--report-only", "--seeds", "0", "1", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    frontier.main()
    table = (out / "frontier.md").read_text()
    assert "Seeds [0, 1]" in table
    assert (
        "| mask_noise | Q preset | 0.7 | 0.750 +- 0.250 | 0.500 / 1.000 | 2.50 +- 0.50 |" in table
    )
    assert len(json.loads((out / "frontier.json").read_text())) == 8
    if optional_pyplot() is not None:  # the mean plot and one panel per seed
        assert (out / "frontier.png").stat().st_size > 0
        assert (out / "frontier_seeds.png").stat().st_size > 0

    monkeypatch.setattr("sys.argv", [*argv[:3], "2", "--out", str(out)])
    with pytest.raises(SystemExit, match="seed2/sweep.json is missing"):
        frontier.main()


def test_accuracy_by_mask_ratio_counts_masked_answer_tokens_only():
    """Stand-in models with hand-known answers: one that outputs the gold chat everywhere (1.0
    at every ratio), one that repeats its input with the mask id as its top logit (excluded,
    so a masked position reads as its second choice, a token no answer holds: 0.0), and one
    right only at the EOS that ends the answer (at t = 1 every one of the n answer tokens is
    masked: 1/n). Every call masks exactly
    max(1, round(t * n)) tokens, all of them answer tokens."""
    import torch

    from llada_train.tokenizer import load_tokenizer, special_ids

    tokenizer = load_tokenizer()
    ids = special_ids(tokenizer)
    pairs = [("Sort these numbers: 47 12 89", "12 47 89")]
    x, answer, _ = learning_probe.gold_layout(tokenizer, ids, *pairs[0], 32)
    n = int(answer.sum())
    assert n == len(tokenizer.encode("12 47 89", add_special_tokens=False)) + 1  # + EOS
    masked = []

    def one_hot(inp, tokens):  # (L,) -> (1, L, V) logits; records where inp was masked
        where = (inp[0] == ids.mask_id).nonzero().squeeze(1)
        masked.append(where.tolist())
        logits = torch.nn.functional.one_hot(tokens, len(tokenizer))[None].float()
        logits[0, :, ids.mask_id] = 0.5  # second choice: excluded anyway
        return logits

    def oracle(inp, attention_mask):
        return one_hot(inp, x)

    def copy_input(inp, attention_mask):
        out = inp[0].clone()
        out[out == ids.mask_id] = 2  # a special token that no answer holds
        logits = one_hot(inp, out)
        logits[0, :, ids.mask_id] = 2.0  # the top logit, excluded by the probe
        return logits

    eos_at = int(answer.nonzero()[-1])

    def only_eos(inp, attention_mask):
        out = torch.zeros_like(inp[0])
        out[eos_at] = x[eos_at]
        return one_hot(inp, out)

    ratios = learning_probe.RATIOS
    assert learning_probe.accuracy_by_mask_ratio(oracle, tokenizer, pairs, 32) == {
        str(t): 1.0 for t in ratios
    }
    assert [len(m) for m in masked] == [max(1, round(t * n)) for t in ratios]
    assert all(answer[m].all() for m in masked)  # only answer (+ EOS) positions
    assert learning_probe.accuracy_by_mask_ratio(copy_input, tokenizer, pairs, 32) == {
        str(t): 0.0 for t in ratios
    }
    by_ratio = learning_probe.accuracy_by_mask_ratio(only_eos, tokenizer, pairs, 32)
    assert by_ratio["1.0"] == pytest.approx(1 / n)
    with pytest.raises(ValueError, match="no question/answer pairs"):
        learning_probe.accuracy_by_mask_ratio(oracle, tokenizer, [], 32)


def test_make_sort_mix_appends_shorter_training_lists(tmp_path, monkeypatch):
    import sys

    from llada_train.data import synthetic
    from llada_train.data.synthetic import is_heldout_sort

    make_sort_mix = _load("make_sort_mix")
    out = tmp_path / "mix.jsonl"
    monkeypatch.setattr(sys, "argv", ["make_sort_mix.py", str(out), "--short", "10"])
    make_sort_mix.main()
    chats = [json.loads(line) for line in open(out)]
    assert len(chats) == 20000 + 10
    assert synthetic.SORT_LENGTH == 6  # the shipped length is restored
    lists = [c["messages"][0]["content"].split(": ")[1].split() for c in chats[20000:]]
    assert sorted(len(xs) for xs in lists) == [2, 2, 2, 3, 3, 3, 4, 4, 5, 5]
    for chat, xs in zip(chats[20000:], lists, strict=True):
        numbers = [int(x) for x in xs]
        assert chat["messages"][1]["content"] == " ".join(map(str, sorted(numbers)))
        assert not is_heldout_sort(numbers)


def test_robustness_summary_first_step_end_and_loss_differences(tmp_path):
    # two variants of seed 0: the reference (none) and a split whose step-2 loss differs by 1e-6
    for name, losses, checks in [
        ("seed0_none", [2.0, 1.5, 1.2], [(100, 0.5), (200, 0.92), (300, 0.97)]),
        ("seed0_split", [2.0, 1.500001, 1.2], [(100, 0.2), (200, 0.85), (300, 0.95)]),
    ]:
        run = tmp_path / "runs" / name / "sft"
        run.mkdir(parents=True)
        rows = [{"step": i + 1, "loss/total": v} for i, v in enumerate(losses)]
        rows += [{"step": s, "heldout/exact_match": em} for s, em in checks]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "runs" / "seed0_none.log").write_text("log")
    (tmp_path / "runs" / "wall_s.json").write_text("{}")
    variants = robustness.summarize(str(tmp_path), goal=0.9)
    assert sorted(variants) == ["seed0_none", "seed0_split"]  # logs and wall times are no runs
    assert variants["seed0_none"]["first_step_at_goal"] == 200
    assert variants["seed0_split"]["first_step_at_goal"] == 300
    assert variants["seed0_split"]["end"] == 0.95
    diffs = robustness.loss_differences(variants)
    assert list(diffs) == ["seed0_split"]  # the reference itself has no difference
    assert diffs["seed0_split"] == pytest.approx(1e-6, rel=1e-3)
    # a variant whose last step is below max_steps is unfinished: listed, not counted
    partial = robustness.summarize(str(tmp_path), goal=0.9, max_steps=400)
    assert not partial["seed0_none"]["finished"] and partial["seed0_none"]["last_step"] == 300
    assert robustness.summarize(str(tmp_path), goal=0.9, max_steps=300)["seed0_none"]["finished"]


def test_robustness_keeps_recorded_variants_whose_runs_are_gone(tmp_path):
    # a sweep split over machines: seed 0 ran elsewhere (only the committed record is here),
    # seed 1 runs here; seed 2 split is recorded unfinished; seed 2 jitter's run dir is empty
    record = {
        "command": ["tiny", "--seeds", "0", "2", "--out", "X"],
        "variants": {
            "seed0_split": {"checks": [[100, 0.4], [200, 0.93]], "first_step_at_goal": 200,
                            "end": 0.93, "end_step": 200, "losses_first10": [[1, 2.0]],
                            "last_step": 200, "finished": True},
            "seed2_split": {"checks": [[100, 0.1]], "first_step_at_goal": None, "end": 0.1,
                            "end_step": 100, "losses_first10": [], "last_step": 100,
                            "finished": False},
            "seed2_jitter": {"checks": [[200, 0.91]], "first_step_at_goal": 200, "end": 0.91,
                             "end_step": 200, "losses_first10": [], "last_step": 200,
                             "finished": True},
        },
        "wall_s": {"seed0_split": 600.0},
        "machines": {"seed0_split": {"cpu": "CPU A", "commit": "abc1234"}},
    }  # fmt: skip
    (tmp_path / "robustness.json").write_text(json.dumps(record))
    run = tmp_path / "runs" / "seed1_split" / "sft"
    run.mkdir(parents=True)
    rows = [{"step": 1, "loss/total": 2.0}, {"step": 200, "heldout/exact_match": 0.95}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "runs" / "seed2_jitter" / "sft").mkdir(parents=True)  # started, nothing logged
    # a stale local entry of seed 0 (its run dir is gone) must not replace the record's
    (tmp_path / "runs" / "machines.json").write_text(json.dumps({
        "seed0_split": {"cpu": "STALE", "commit": "0000000"},
        "seed1_split": {"cpu": "CPU B", "commit": "def5678"},
    }))  # fmt: skip
    variants = robustness.summarize(str(tmp_path), goal=0.9, max_steps=200)
    assert list(variants) == ["seed0_split", "seed1_split", "seed2_jitter", "seed2_split"]
    assert variants["seed0_split"]["recorded"] and "recorded" not in variants["seed1_split"]
    assert variants["seed2_jitter"]["recorded"] and variants["seed2_jitter"]["finished"]
    assert variants["seed2_split"]["recorded"] and not variants["seed2_split"]["finished"]
    # a longer sweep does not count the 200-step records as finished
    longer = robustness.summarize(str(tmp_path), goal=0.9, max_steps=300)
    assert not longer["seed0_split"]["finished"] and not longer["seed2_jitter"]["finished"]
    recorded = robustness.recorded_names(variants)
    machines = robustness.runs_json(str(tmp_path), "machines", recorded)
    assert machines["seed0_split"]["cpu"] == "CPU A" and machines["seed1_split"]["cpu"] == "CPU B"
    # a record older than per-variant invocations: its command stands for them
    assert robustness.invocations(str(tmp_path), recorded) == [
        "python scripts/robustness.py tiny --seeds 0 2 --out X"
    ]
    args = argparse.Namespace(recipe="tiny", path="scratch", questions=100, goal=0.9,
                              out=str(tmp_path))  # fmt: skip
    text = robustness.report(args, variants, robustness.runs_json(str(tmp_path), "wall_s"),
                             machines)  # fmt: skip
    assert "| seed0_split | 0.400 | 0.930 | 200 | 0.930 |" in text
    assert "| seed2_split | 0.100 | - | unfinished (step 100) |" in text
    assert "- CPU A, abc1234: seed0_split" in text and "- CPU B, def5678: seed1_split" in text


def test_robustness_perturbations_override_the_right_keys():
    assert robustness.perturbation_args("none", 32) == []
    assert robustness.perturbation_args("split", 32) == ["micro_batch_size=16"]
    assert robustness.perturbation_args("jitter", 32) == ["init_jitter=1e-6"]
    with pytest.raises(ValueError, match="unknown perturbation"):
        robustness.perturbation_args("threads", 32)
