"""`python -m llada_train.eval.cli ...`: lm-eval's own command line, with `--model llada`.

    python -m llada_train.eval.cli --model llada \
        --model_args pretrained=runs/sft/checkpoints/step_00000150/hf,sampler=quality \
        --tasks llada_arith_gen,llada_arith_mc --limit 50 --batch_size 16 --device cuda:0 \
        --output_path results/

lm-eval 0.4.13 finds models only in its registry and has no plugin entry point for them, so
`python -m lm_eval --model llada` works only in a process that imported
`llada_train.eval.lm` first; this launcher does exactly that, then hands the arguments to
lm-eval's CLI unchanged (same subcommands: run, ls, validate; `run` is implied as in lm-eval).
It adds `--include_path <repo>/eval/tasks` when none is given, so the shipped offline tasks
are found. Pass the device and the batch size as `--device` / `--batch_size`, not inside
`--model_args` (lm-eval always passes its own; `--device` defaults to cuda:0, which falls back
to the CPU with a warning where there is no GPU). The shipped code task runs model output only
inside our sandbox; lm-eval's own code tasks (humaneval, mbpp) also need
`--confirm_run_unsafe_code`.
"""

from __future__ import annotations

import sys

from llada_train.eval.evaluate import TASKS_DIR


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import llada_train.eval.lm  # noqa: F401  (registers the `llada` model with lm-eval)

    args = list(sys.argv[1:] if argv is None else argv)
    is_help = not args or any(a in ("-h", "--help") for a in args)
    if not is_help and not any(a.split("=")[0] == "--include_path" for a in args):
        args += ["--include_path", TASKS_DIR]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
