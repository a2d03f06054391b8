"""The addition task, its held-out split, the tokenizer and the grain pipeline."""

from __future__ import annotations

import numpy as np

from jaxformer.config import TaskConfig
from jaxformer.data.pipeline import eval_set, train_iterator
from jaxformer.data.tasks import AdditionTask, Problem
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, char_tokenizer


def test_char_tokenizer_round_trip():
    tokenizer = char_tokenizer("0123456789+=")
    ids = tokenizer.encode("12+345=").ids
    assert len(ids) == 7 and min(ids) >= 4
    assert tokenizer.decode([BOS_ID, *ids, EOS_ID]) == "12+345="


def test_heldout_never_in_training():
    task = AdditionTask(TaskConfig(max_digits=2, eval_size=50))
    heldout = set(task.eval_problems())
    assert len(heldout) == 50
    assert all(task.is_heldout(np.array([p.a]), np.array([p.b]))[0] for p in heldout)
    trained = task.sample_train(np.random.default_rng(0), 5000)
    assert not heldout & set(trained)
    assert not heldout & set(task.train_problems(2000, seed=0))


def test_heldout_set_is_fixed_by_split_seed_only():
    a = AdditionTask(TaskConfig(eval_size=40)).eval_problems()
    b = AdditionTask(TaskConfig(eval_size=40)).eval_problems()
    c = AdditionTask(TaskConfig(eval_size=40, split_seed=7)).eval_problems()
    assert a == b and a != c


def test_answer_format_and_check():
    task = AdditionTask(TaskConfig(pad_operands=False))
    problem = Problem(57, 68)
    assert task.prompt(problem) == "57+68=" and task.answer(problem) == "521"
    assert task.check(problem, "521") and not task.check(problem, "125")
    padded = AdditionTask(TaskConfig(pad_operands=True))
    assert padded.prompt(problem) == "057+068=" and padded.answer(problem) == "5210"


def test_train_size_gives_exactly_that_many_unique_problems():
    task = AdditionTask(TaskConfig(train_size=300))
    problems = task.train_problems(300, seed=0)
    assert len(set(problems)) == 300


def test_batches_are_fixed_shape_with_answer_mask():
    task = AdditionTask(TaskConfig(max_digits=2))
    batch = next(train_iterator(task, batch_size=8, seed=0))
    assert batch["tokens"].shape == (8, task.seq_len) and batch["tokens"].dtype == np.int32
    for tokens, mask in zip(batch["tokens"], batch["loss_mask"]):
        text = task.tokenizer.decode(tokens.tolist())
        prompt, answer = text.split("=")
        a, b = map(int, prompt.split("+"))
        assert answer == f"{a + b:03d}"[::-1]  # padded to max_digits + 1, reversed
        masked = task.tokenizer.decode(tokens[mask > 0].tolist())
        assert masked == answer and EOS_ID in tokens[mask > 0]


def test_iterator_state_resumes_the_same_batches():
    for train_size in (None, 64):
        task = AdditionTask(TaskConfig(max_digits=2, train_size=train_size))
        it = train_iterator(task, 8, seed=1)
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = [next(it)["tokens"] for _ in range(10)]  # crosses epochs when train_size=64
        resumed = train_iterator(task, 8, seed=1)
        resumed.set_state(state)
        for want in expected:
            np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_eval_prompts_stop_at_equals_sign():
    task = AdditionTask(TaskConfig(max_digits=2, eval_size=10))
    data = eval_set(task)
    for prompt, length in zip(data.prompts, data.prompt_lens):
        assert task.tokenizer.decode(prompt[:length].tolist()).endswith("=")
        assert (prompt[length:] == 0).all()
