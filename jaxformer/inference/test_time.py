"""What `python -m jaxformer.evaluate checkpoint=RUN_DIR` does: test-time compute on a trained
run's held-out problems (restore the run and its task, sample the held-out problems into a
resumable JSONL file, score the selection strategies, log the summary).

The task is rebuilt from the run's own config (`.hydra/config.yaml`), so the held-out split is the
one training never saw. For every problem: the greedy answer, `sampling.num_samples` sampled answers
(and the top beam when `sampling.beam_size > 0`), each with its correctness and log-probability.

Outputs, under OUT (`out_dir`, default the run dir), keyed by the settings that change the samples
(KEY, e.g. `step1500-T0.8-k0-p0.9-n16-seed0`):
  OUT/test_time/KEY/samples.jsonl   one JSON object per problem, in held-out order:
      {"problem": i, "prompt", "expected", "difficulty",
       "greedy": ANSWER, "beam": ANSWER (with beam search), "samples": [ANSWER, ...]}
      ANSWER = {"answer": text up to <eos>, "correct": bool, "logprob": float (the model's,
                unwarped, <eos> included), "tokens": int (<eos> included), "eos": bool}
  OUT/test_time/KEY/summary.json    settings + metrics (inference/selection.py for their meaning):
      greedy_accuracy, sample_accuracy, pass@k, majority@k, best_logprob@k, verifier_eps{eps}@k
      for k = 1, 2, 4, ... n (and beam_accuracy with beam search)
  OUT/metrics.jsonl                 the same summary as one record, split "test_time" (a rerun with
                                    the same KEY replaces it); and an offline wandb run in KEY/.
Sample j of problem i draws from fold_in(fold_in(key(seed), i), j): results do not depend on the
batch size, and an interrupted evaluation resumes where samples.jsonl ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import numpy as np
from flax import nnx
from omegaconf import MISSING
from tokenizers import Tokenizer

from jaxformer.config import LoggerConfig, SamplingConfig, TrainConfig, check_step, to_dict
from jaxformer.data.tasks import Task, build_task
from jaxformer.errors import UserError
from jaxformer.inference.selection import selection_metrics
from jaxformer.models.decoding import completion_texts, ended_at_eos, generate
from jaxformer.objectives import EvalSet, GenerativeObjective, generative_objective
from jaxformer.parallel import to_host
from jaxformer.progress import Progress
from jaxformer.runs import RunDir
from jaxformer.tracking import WandbTracker, run_metadata


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING  # a run dir written by `python -m jaxformer.train`
    step: Optional[int] = None  # checkpoint step; None: the latest
    out_dir: Optional[str] = None  # None: the run dir
    num_problems: Optional[int] = None  # the first N held-out problems; None: all of them
    text: Optional[str] = None  # a text file (or glob): its bits per byte instead (decoders)
    verifier_eps: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.05])
    majority_resamples: int = 1000  # k-subsets drawn per problem to estimate majority@k
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        check_step(self.step)
        if self.num_problems is not None and self.num_problems < 1:
            raise UserError(f"num_problems={self.num_problems} must be >= 1 (or null for all)")
        if self.majority_resamples < 1:
            raise UserError(f"majority_resamples={self.majority_resamples} must be >= 1")
        for eps in self.verifier_eps:
            if not 0.0 <= eps <= 1.0:
                raise UserError(f"verifier_eps holds {eps}: a false-positive rate is in [0, 1]")
        RunDir.open(self.checkpoint)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or self.checkpoint)


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
    objective: GenerativeObjective
    num_problems: int
    max_new_tokens: int

    @classmethod
    def restore(cls, config: EvaluateConfig) -> TestTimeRun:
        """The run's model and its task's held-out problems; every setting checked before compiling."""
        run_dir = RunDir.open(config.checkpoint)
        run = run_dir.restore(config.step)
        model_cfg = run.model_cfg
        objective = generative_objective(model_cfg, config.checkpoint, "evaluate", run.objective)
        if not objective.text_answers:
            raise UserError(f"checkpoint={config.checkpoint} is a language model on text "
                            f"({objective.name}): evaluate samples the held-out problems of the "
                            "synthetic tasks; its held-out bits per byte are in its metrics.jsonl")
        config.sampling.check_vocab(model_cfg.vocab_size)
        train_cfg = run_dir.config
        task = build_task(train_cfg.task)
        data = objective.eval_set(task)
        available = len(data.problems)
        if config.num_problems is not None and config.num_problems > available:
            raise UserError(f"num_problems={config.num_problems} exceeds the run's {available} "
                            f"held-out problems: use at most {available} (or null for all)")
        max_new_tokens = config.sampling.max_new_tokens or task.answer_chars + 1
        prompt_len = objective.prompt_len(task)
        if prompt_len + max_new_tokens > model_cfg.max_len:
            raise UserError(f"prompts of {prompt_len} tokens + sampling.max_new_tokens="
                            f"{max_new_tokens} exceed model.max_len={model_cfg.max_len}: use "
                            f"sampling.max_new_tokens<={model_cfg.max_len - prompt_len}")
        return cls(config, run.model, run.tokenizer, run.step, train_cfg, task, data, objective,
                   config.num_problems or available, max_new_tokens)

    # -- sampling ----------------------------------------------------------------------------------
    def _decode(self, rows: np.ndarray, **decoding) -> list[list[dict]]:
        """Every completion of the held-out problems `rows` (rows x N) as a JSONL answer record,
        but for its correctness."""
        inputs = {key: value[rows] for key, value in self.data.decode_inputs.items()}
        prompts, lens, source = self.objective.prompts(inputs, len(rows))
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
        with path.open("a") as out, Progress(self.num_problems, initial=len(records),
                                             desc="evaluate", unit="problem") as progress:
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
                progress.update(len(real))
                progress.report()  # off a terminal: one line per batch
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
                raise UserError(f"{path} holds other problems than this run's held-out set at "
                                f"line {i + 1}: delete it (or choose another out_dir)")
            records.append(record)
            kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        return records

    # -- scores and logs ---------------------------------------------------------------------------
    def score(self, records: list[dict]) -> dict[str, float]:
        """Greedy (and top-beam) accuracy and every selection strategy of inference/selection.py."""
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
        settings = wb.resolved(directory)
        if settings["mode"] == "disabled":
            return
        run_name = Path(self.config.checkpoint).absolute().name
        tracker = WandbTracker(
            directory, settings, wb.group or self.train_cfg.name,
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


def settings_key(step: int, sampling: SamplingConfig, max_new_tokens: Optional[int]) -> str:
    """The name of one evaluation: every setting that changes the samples."""
    key = (f"step{step}-T{sampling.temperature:g}-k{sampling.top_k}-p{sampling.top_p:g}"
           f"-n{sampling.num_samples}-seed{sampling.seed}")
    if max_new_tokens is not None:
        key += f"-new{max_new_tokens}"
    if sampling.beam_size:
        key += f"-beam{sampling.beam_size}-lp{sampling.length_penalty:g}"
    return key


class Evaluation(NamedTuple):
    directory: Path  # OUT/test_time/KEY
    summary: dict  # settings + metrics, as summary.json holds them


def evaluate_run(config: EvaluateConfig) -> Evaluation:
    """Sample (or resume sampling) the held-out problems, then score every selection strategy."""
    run = TestTimeRun.restore(config)
    key = settings_key(run.step, config.sampling, config.sampling.max_new_tokens)
    directory = config.output_dir / "test_time" / key
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"out_dir={config.output_dir} is not writable ({err.strerror}): "
                        "choose another out_dir") from err
    records = run.sample_problems(directory / "samples.jsonl")
    summary = {"checkpoint": str(Path(config.checkpoint).absolute()), "step": run.step,
               "settings": key, "problems": len(records), **to_dict(config.sampling),
               "max_new_tokens": run.max_new_tokens, **run.score(records)}
    (directory / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    run.log(summary, directory)
    return Evaluation(directory, summary)
