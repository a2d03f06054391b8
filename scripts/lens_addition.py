"""At which layer does each answer digit become the top token? The logit lens of an addition run
(`make demo`: outputs/demo) over its first N held-out problems of the most digits, the model's
greedy answers teacher-forced (README, "Seeing inside: activation cache, logit lens, ...").

    python scripts/lens_addition.py [RUN_DIR] [N]     # defaults: outputs/demo 40

Prints, per answer position, how many problems the target settles at each layer (the first layer
from which it is the top token at every later one), and the mean direct logit attribution.
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from jaxformer.inference.activation_cache import run_with_cache
from jaxformer.inference.lens import direct_logit_attribution, logit_lens
from jaxformer.inference.lens_report import lens_input
from jaxformer.runs import RunDir


def main(run_dir: str = "outputs/demo", n: int = 40) -> None:
    source = RunDir.open(run_dir)
    run, task = source.restore(), source.task
    problems = task.eval_problems()
    hardest = max(task.difficulty(p) for p in problems)
    problems = [p for p in problems if task.difficulty(p) == hardest][:n]
    settled = collections.Counter()
    shares, names, right = [], None, 0
    for problem in problems:
        framed = lens_input(run.model, run.model_cfg, run.tokenizer, task.prompt(problem))
        answer_ids = framed.input_ids[framed.answer_start + 1:]
        right += task.check(problem, run.tokenizer.decode(answer_ids))
        _, cache = run_with_cache(run.model, *framed.model_inputs)
        targets_bt = np.asarray([framed.target_ids])
        lens = logit_lens(run.model, cache, targets_bt)
        for position, layer in enumerate(lens.settled_layers()[0, framed.answer_start:]):
            settled[position, lens.layers[layer] if layer >= 0 else "never"] += 1
        attribution = direct_logit_attribution(run.model, cache, targets_bt)
        names = attribution.names
        shares.append(attribution.contributions_cbt[:, 0, framed.answer_start:])
    print(f"{len(problems)} held-out {hardest}-digit problems, {right} answered right")
    for position in sorted({position for position, _ in settled}):
        counts = {layer: count for (p, layer), count in settled.items() if p == position}
        print(f"answer position {position}: settles at {dict(sorted(counts.items()))}")
    mean = np.mean(shares, axis=0)
    print("mean share of the target logit per answer position:")
    for name, row in zip(names, mean):
        print(f"  {name:22s}" + " ".join(f"{value:+6.2f}" for value in row))


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:3]))
