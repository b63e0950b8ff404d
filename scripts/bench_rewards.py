"""Wall time of one batch of 32 code-reward candidates (the RL step's reward phase), as
`score_batch` runs it in the trainer: reference solutions of the shipped code tasks, each in a
```python block, 8 reward workers. Prints one line per repeat and the median; a figure, not a
test (the time moves with the machine's load, printed alongside).

    python scripts/bench_rewards.py [--num 32] [--workers 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from llada_train.data.synthetic import code_tasks
from llada_train.rl.rewards import score_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tasks = code_tasks()
    records = [
        {"prompt": t.prompt, "entry_point": t.entry_point, "tests": t.tests}
        for t in (tasks[i % len(tasks)] for i in range(args.num))
    ]
    solutions = {t.entry_point: t.solution for t in tasks}
    completions = [f"```python\n{solutions[r['entry_point']]}```" for r in records]
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        values, num_errors = score_batch("code", completions, records, max_workers=args.workers)
        times.append(time.perf_counter() - start)
        print(
            f"repeat {i}: {times[-1]:.2f} s, {sum(values):.0f}/{len(values)} passed, "
            f"{num_errors} errors, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    print(f"median {statistics.median(times):.2f} s for {args.num} candidates")


if __name__ == "__main__":
    main()
