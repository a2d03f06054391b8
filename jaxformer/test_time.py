"""The work behind `python -m jaxformer.evaluate`: restore a run and its task, sample the held-out
problems into a resumable JSONL file, score the selection strategies, log the summary.

See jaxformer/evaluate.py for the file formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from tokenizers import Tokenizer
from tqdm import tqdm

from jaxformer.config import ConfigError, TrainConfig, to_dict
from jaxformer.data.pipeline import EvalSet, eval_set
from jaxformer.data.tasks import Task, build_task
from jaxformer.evaluation import completion_texts, ended_at_eos
from jaxformer.objectives import objective_for
from jaxformer.restore import read_run_config, require_generative, restore_params
from jaxformer.run_info import run_metadata
from jaxformer.parallel import to_host
from jaxformer.sampling import bos_prompts, generate
from jaxformer.selection import selection_metrics
from jaxformer.tracking import WandbTracker

if TYPE_CHECKING:  # the config lives with its command, which imports this module
    from jaxformer.evaluate import EvaluateConfig


@dataclass
class TestTimeRun:
    __test__ = False  # not a pytest class, whatever its name says

    config: EvaluateConfig
    model: nnx.Module
    tokenizer: Tokenizer
    step: int
    train_cfg: TrainConfig
    task: Task
    data: EvalSet
    objective: str
    num_problems: int
    max_new_tokens: int

    @classmethod
    def restore(cls, config: EvaluateConfig) -> TestTimeRun:
        """The run's model and its task's held-out problems; every setting checked before compiling."""
        run = restore_params(config.checkpoint, config.step)
        model_cfg = run.model_cfg
        require_generative(model_cfg, config.checkpoint, "evaluate")
        config.sampling.check_vocab(model_cfg.vocab_size)
        train_cfg = read_run_config(config.checkpoint)
        task = build_task(train_cfg.task)
        objective = objective_for(model_cfg.kind, classification_task=False)
        data = eval_set(task, objective)
        available = len(data.problems)
        if config.num_problems is not None and config.num_problems > available:
            raise ConfigError(f"num_problems={config.num_problems} exceeds the run's {available} "
                              f"held-out problems: use at most {available} (or null for all)")
        max_new_tokens = config.sampling.max_new_tokens or task.answer_chars + 1
        prompt_len = task.prompt_len if objective == "clm" else 1  # the decoder side: <bos>
        if prompt_len + max_new_tokens > model_cfg.max_len:
            raise ConfigError(f"prompts of {prompt_len} tokens + sampling.max_new_tokens="
                              f"{max_new_tokens} exceed model.max_len={model_cfg.max_len}: use "
                              f"sampling.max_new_tokens<={model_cfg.max_len - prompt_len}")
        return cls(config, run.model, run.tokenizer, run.step, train_cfg, task, data, objective,
                   config.num_problems or available, max_new_tokens)

    # -- sampling ----------------------------------------------------------------------------------
    def _decode(self, rows: np.ndarray, **decoding) -> list[list[dict]]:
        """Every completion of the held-out problems `rows` (rows x N) as a JSONL answer record,
        but for its correctness."""
        if self.objective == "clm":
            prompts, lens, source = self.data.prompts[rows], self.data.prompt_lens[rows], ()
        else:
            (prompts, lens), source = bos_prompts(len(rows)), (self.data.src[rows],
                                                               self.data.src_valid[rows])
        done = to_host(generate(self.model, prompts, lens, source=source,
                                       max_new_tokens=self.max_new_tokens, **decoding))
        return [[{"answer": text, "logprob": float(logprob), "tokens": int(length), "eos": bool(eos)}
                 for text, logprob, length, eos in zip(*row)]
                for row in zip(completion_texts(self.tokenizer, done), done.logprobs, done.lengths,
                               ended_at_eos(done))]

    def _checked(self, problem, answers: list[dict]) -> list[dict]:
        return [{"answer": answer["answer"],
                 "correct": bool(self.task.check(problem, answer["answer"])), **answer}
                for answer in answers]

    def sample_problems(self, path: Path) -> list[dict]:
        """One record per problem (greedy, samples, beam), appended to `path` as they are done;
        records already there are kept, so an interrupted evaluation picks up where it stopped."""
        records = self._resume(path)
        sampling = self.config.sampling
        seed_key = jax.random.key(sampling.seed)
        batch = min(sampling.batch_size, self.num_problems)
        with path.open("a") as out, tqdm(total=self.num_problems, initial=len(records),
                                         desc="evaluate", unit="problem", dynamic_ncols=True) as bar:
            for start in range(len(records), self.num_problems, batch):
                real = np.arange(start, min(start + batch, self.num_problems))
                rows = np.resize(real, batch)  # one compiled shape: the tail repeats real rows
                keys = jax.vmap(jax.random.fold_in, (None, 0))(seed_key, rows)
                greedy = self._decode(rows)
                samples = self._decode(rows, key=keys, temperature=sampling.temperature,
                                       top_k=sampling.top_k, top_p=sampling.top_p,
                                       num_samples=sampling.num_samples)
                beams = (self._decode(rows, beam_size=sampling.beam_size,
                                      length_penalty=sampling.length_penalty)
                         if sampling.beam_size else None)
                for b, i in enumerate(real):
                    problem = self.data.problems[i]
                    record = {"problem": int(i), "prompt": self.task.prompt(problem),
                              "expected": self.task.answer(problem),
                              "difficulty": self.task.difficulty(problem),
                              "greedy": self._checked(problem, greedy[b])[0]}
                    if beams is not None:
                        record["beam"] = self._checked(problem, beams[b])[0]
                    record["samples"] = self._checked(problem, samples[b])
                    out.write(json.dumps(record) + "\n")
                    records.append(record)
                out.flush()
                bar.update(len(real))
        return records[: self.num_problems]

    def _resume(self, path: Path) -> list[dict]:
        """The complete records already in `path` (a torn last line is dropped from the file)."""
        if not path.exists():
            return []
        records, kept = [], []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            i = len(records)
            if record.get("problem") != i or i >= len(self.data.problems) or \
                    record.get("prompt") != self.task.prompt(self.data.problems[i]):
                raise ConfigError(f"{path} holds other problems than this run's held-out set at "
                                  f"line {i + 1}: delete it (or choose another out_dir)")
            records.append(record)
            kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        return records

    # -- scores and logs ---------------------------------------------------------------------------
    def score(self, records: list[dict]) -> dict[str, float]:
        """Greedy (and top-beam) accuracy and every selection strategy of jaxformer/selection.py."""
        samples = [r["samples"] for r in records]
        metrics = {"greedy_accuracy": float(np.mean([r["greedy"]["correct"] for r in records]))}
        if self.config.sampling.beam_size:
            metrics["beam_accuracy"] = float(np.mean([r["beam"]["correct"] for r in records]))
        return {**metrics, **selection_metrics(
            [[s["correct"] for s in row] for row in samples],
            [[s["logprob"] for s in row] for row in samples],
            [[s["answer"] for s in row] for row in samples],
            self.config.verifier_eps, self.config.majority_resamples, self.config.sampling.seed)}

    def log(self, summary: dict, directory: Path) -> None:
        """The summary as one `test_time` record of OUT/metrics.jsonl (replacing an earlier one of
        the same settings) and, unless wandb is disabled, a wandb run in `directory`."""
        path = self.config.output_dir / "metrics.jsonl"
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if line.strip() and not _same_evaluation(json.loads(line), summary["settings"])]
        record = {"step": self.step, "split": "test_time", **summary}
        path.write_text("".join(line + "\n" for line in [*kept, json.dumps(record)]))
        wb = self.config.logger.wandb
        if wb.mode == "disabled":
            return
        run_name = Path(self.config.checkpoint).absolute().name
        tracker = WandbTracker(
            directory, wb.mode, wb.project, wb.entity, wb.group or self.train_cfg.name,
            f"{run_name}/{summary['settings']}", [*wb.tags, "test_time"],
            {"train": to_dict(self.train_cfg), "evaluate": to_dict(self.config), **run_metadata()})
        try:
            metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
            tracker.log(metrics, self.step, "test_time")
            tracker.summary(summary)
        finally:
            tracker.finish()


def _same_evaluation(record: dict, settings: str) -> bool:
    return record.get("split") == "test_time" and record.get("settings") == settings
