"""Tasks, their held-out splits, the tokenizer and the grain pipelines of every objective."""

from __future__ import annotations

import itertools
import numpy as np
import pytest

from jaxformer.config import TaskConfig
from jaxformer.data.pipeline import train_iterator
from jaxformer.data.tasks import AdditionProblem, AdditionTask, SequenceProblem, build_task
from jaxformer.data.tokenizers import (
    BOS_ID, EOS_ID, MASK, MASK_ID, NUM_SPECIAL, PAD_ID, SPECIAL_TOKENS, char_tokenizer,
)
from jaxformer.errors import UserError
from jaxformer.objectives import OBJECTIVES, get_objective

# small spaces keep every test fast; addition with 2 digits has 10^4 problems, sequences ~10^5
SMALL = {
    "addition": dict(max_digits=2),
    "reverse": dict(min_length=2, max_length=5, n_symbols=10),
    "sort": dict(min_length=2, max_length=5, n_symbols=10),
    "is_sorted": dict(min_length=2, max_length=5, n_symbols=10),
}
TASK_NAMES = list(SMALL)


def small_task(name: str, **overrides):
    return build_task(TaskConfig(name=name, **{"eval_size": 50, **SMALL[name], **overrides}))


WIDTHS = {  # the documented width of each array of each objective
    "clm": dict.fromkeys(["tokens", "loss_mask"], lambda task: task.seq_len),
    "mlm": dict.fromkeys(["inputs", "targets", "loss_mask", "valid"], lambda task: task.seq_len),
    "seq2seq": {**dict.fromkeys(["src", "src_valid"], lambda task: task.src_len),
                **dict.fromkeys(["tgt", "loss_mask"], lambda task: task.tgt_len)},
    "classification": dict.fromkeys(["tokens", "valid", "label"], lambda task: task.cls_len),
}


def objectives_of(task) -> list[str]:
    """The token objectives `task` can serve (vector_classification is for vector tasks)."""
    return [o for o in OBJECTIVES if o != "vector_classification" and not OBJECTIVES[o].reads_corpus
            and (o != "classification" or task.num_classes)]


def decode(task, ids) -> str:
    return task.tokenizer.decode(np.asarray(ids).tolist())


# -- tokenizer ------------------------------------------------------------------------------------
def test_char_tokenizer_round_trip_and_special_ids():
    assert SPECIAL_TOKENS[MASK_ID] == MASK and (PAD_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 4)
    tokenizer = char_tokenizer("0123456789+=")
    ids = tokenizer.encode("12+345=").ids
    assert len(ids) == 7 and min(ids) >= NUM_SPECIAL
    assert tokenizer.encode("0").ids == [NUM_SPECIAL]  # the alphabet follows the specials
    assert tokenizer.decode([BOS_ID, *ids, MASK_ID, EOS_ID]) == "12+345="


# -- tasks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASK_NAMES)
def test_heldout_never_in_training(name):
    task = small_task(name)
    heldout = set(task.eval_problems())
    assert len(heldout) == 50 and task.is_heldout(list(heldout)).all()
    assert not heldout & set(task.sample_train(np.random.default_rng(0), 5000))
    train = task.train_problems(2000, seed=0)
    assert len(set(train)) == 2000 and not heldout & set(train)
    assert not task.is_heldout(train).any()


def test_heldout_set_is_fixed_by_split_seed_only():
    for name in ("addition", "reverse"):
        a = small_task(name, eval_size=40).eval_problems()
        b = small_task(name, eval_size=40).eval_problems()
        c = small_task(name, eval_size=40, split_seed=7).eval_problems()
        assert a == b and a != c


def test_addition_format_and_check():
    task = AdditionTask(TaskConfig(pad_operands=False))
    problem = AdditionProblem(57, 68)
    assert task.prompt(problem) == "57+68=" and task.answer(problem) == "521"
    assert task.check(problem, "521") and not task.check(problem, "125")
    assert task.difficulty(problem) == 2 and task.num_classes == 0 and not task.num_classes
    padded = AdditionTask(TaskConfig(pad_operands=True))
    assert padded.prompt(problem) == "057+068=" and padded.answer(problem) == "5210"


@pytest.mark.parametrize("name, answer, wrong", [
    ("reverse", "1413", "3141"), ("sort", "1134", "1143"), ("is_sorted", "0", "1"),
])
def test_sequence_formats_and_check(name, answer, wrong):
    task = small_task(name)
    problem = SequenceProblem("3141")
    assert task.prompt(problem) == "3141=" and task.answer(problem) == answer
    assert task.check(problem, answer) and not task.check(problem, wrong)
    assert task.difficulty(problem) == 4


def test_is_sorted_labels_and_classes():
    task = small_task("is_sorted")
    assert task.num_classes == 2
    assert task.label(SequenceProblem("1134")) == 1 and task.answer(SequenceProblem("1134")) == "1"
    assert task.label(SequenceProblem("3141")) == 0
    with pytest.raises(UserError, match="not a classification task"):
        small_task("sort").label(SequenceProblem("12"))


def test_sampled_problems_respect_the_config():
    task = small_task("sort", min_length=3, max_length=4, n_symbols=5)
    for problem in task.sample_train(np.random.default_rng(0), 500):
        assert 3 <= len(problem.symbols) <= 4 and set(problem.symbols) <= set("01234")


def test_small_space_is_split_and_listed_exhaustively():
    # 3^2 + 3^3 = 36 problems: the held-out share grows so eval_size fits, training keeps the rest
    task = small_task("reverse", min_length=2, max_length=3, n_symbols=3, eval_size=8)
    assert task.num_problems == 36 and 0.02 < task.heldout_share <= 0.5
    heldout = task.eval_problems()
    space = [SequenceProblem("".join(s)) for n in (2, 3) for s in itertools.product("012", repeat=n)]
    n_train = int((~task.is_heldout(space)).sum())
    everything = task.train_problems(n_train, seed=0)
    assert len(set(everything)) == n_train and not set(everything) & set(heldout)
    too_many = f"task.train_size={n_train + 1} needs .* only {n_train} exist"
    with pytest.raises(UserError, match=too_many):
        task.train_problems(n_train + 1, seed=0)
    with pytest.raises(UserError, match="task.eval_size=100 .* lower task.eval_size"):
        small_task("reverse", min_length=2, max_length=3, n_symbols=3, eval_size=100).eval_problems()


# -- pipelines ------------------------------------------------------------------------------------
def test_objective_errors_are_one_line():
    with pytest.raises(UserError, match="needs a classification task"):
        OBJECTIVES["classification"].check(small_task("reverse"))
    with pytest.raises(UserError, match="not one of"):
        get_objective("lm")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_objective_batch_has_the_documented_format(name):
    task = small_task(name)
    for objective in objectives_of(task):
        batch = next(train_iterator(task, OBJECTIVES[objective], batch_size=8, seed=0))
        assert set(batch) == set(WIDTHS[objective])
        for key, value in batch.items():
            want = np.float32 if "mask" in key or "valid" in key else np.int32
            assert value.dtype == want and value.shape[0] == 8, (objective, key)
            assert value.shape[1:] == ((WIDTHS[objective][key](task),) if key != "label" else ())
        assert OBJECTIVES[objective].max_positions(task) == max(
            v.shape[1] for v in batch.values() if v.ndim == 2)
        data = OBJECTIVES[objective].eval_set(task)
        assert {k: v.shape[1:] for k, v in data.examples.items()} == \
            {k: v.shape[1:] for k, v in batch.items()}
        assert set(data.decode_inputs) == {"clm": {"prompts", "prompt_lens"},
                                           "seq2seq": {"src", "src_valid"}}.get(objective, set())


@pytest.mark.parametrize("name", TASK_NAMES)
def test_clm_batches_decode_with_answer_mask(name):
    task = small_task(name)
    problems = task.sample_train(np.random.default_rng(0), 16)
    batch = OBJECTIVES["clm"].eval_arrays(task, problems)
    assert batch["tokens"].shape == (16, task.seq_len)
    for problem, tokens, mask in zip(problems, batch["tokens"], batch["loss_mask"]):
        assert tokens[0] == BOS_ID
        assert decode(task, tokens) == task.prompt(problem) + task.answer(problem)
        assert decode(task, tokens[mask > 0]) == task.answer(problem) and tokens[mask > 0][-1] == EOS_ID


def test_addition_batches_from_the_iterator_are_correct_sums():
    task = small_task("addition")
    batch = next(train_iterator(task, OBJECTIVES["clm"], batch_size=8, seed=0))
    for tokens in batch["tokens"]:
        prompt, answer = decode(task, tokens).split("=")
        a, b = map(int, prompt.split("+"))
        assert answer == f"{a + b:03d}"[::-1]  # padded to max_digits + 1, reversed


@pytest.mark.parametrize("name", TASK_NAMES)
def test_seq2seq_src_is_prompt_and_tgt_is_answer(name):
    task = small_task(name)
    problems = task.sample_train(np.random.default_rng(1), 16)
    batch = OBJECTIVES["seq2seq"].eval_arrays(task, problems)
    for i, problem in enumerate(problems):
        src, tgt = batch["src"][i], batch["tgt"][i]
        n_src = int(batch["src_valid"][i].sum())
        assert decode(task, src) == task.prompt(problem) and src[n_src - 1] == EOS_ID
        assert (src[n_src:] == PAD_ID).all() and (batch["src_valid"][i, n_src:] == 0).all()
        assert tgt[0] == BOS_ID and decode(task, tgt) == task.answer(problem)
        predicted = tgt[batch["loss_mask"][i] > 0]  # positions the decoder must predict
        assert decode(task, predicted) == task.answer(problem) and predicted[-1] == EOS_ID
        assert len(predicted) == len(task.answer(problem)) + 1


def test_classification_labels_are_balanced_and_correct():
    task = small_task("is_sorted", eval_size=200)
    batch = next(train_iterator(task, OBJECTIVES["classification"], batch_size=2000, seed=0))
    texts = [decode(task, row) for row in batch["tokens"]]
    labels = [int(list(t[:-1]) == sorted(t[:-1])) for t in texts]
    np.testing.assert_array_equal(batch["label"], labels)
    assert 0.45 < batch["label"].mean() < 0.55
    assert (batch["tokens"][:, 0] == BOS_ID).all() and all(t.endswith("=") for t in texts)
    data = OBJECTIVES["classification"].eval_set(task)
    assert data.examples["label"].mean() == 0.5  # eval sets are drawn per class: exactly balanced
    np.testing.assert_array_equal(data.examples["label"], [task.label(p) for p in data.problems])


def test_mlm_masking_statistics():
    task = small_task("addition", max_digits=3, mask_prob=0.3)
    problems = task.sample_train(np.random.default_rng(0), 3000)
    mlm = OBJECTIVES["mlm"]
    batch = mlm.randomize(task, mlm.encode(task, problems), np.random.default_rng(5))
    inputs, targets, selected = batch["inputs"], batch["targets"], batch["loss_mask"] > 0
    np.testing.assert_array_equal(targets, OBJECTIVES["clm"].eval_arrays(task, problems)["tokens"])
    np.testing.assert_array_equal(batch["valid"], (targets != PAD_ID).astype(np.float32))
    candidates = targets >= NUM_SPECIAL
    assert not (selected & ~candidates).any()  # never <pad>, <bos>, <eos>
    assert selected.any(axis=1).all()
    assert abs(selected.sum() / candidates.sum() - 0.3) < 0.02
    assert (inputs[~selected] == targets[~selected]).all()
    masked = (inputs[selected] == MASK_ID).mean()
    kept = (inputs[selected] == targets[selected]).mean()  # 10% kept + random draws of the same id
    assert abs(masked - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / len(task.alphabet))) < 0.02
    replaced = inputs[selected][(inputs[selected] != MASK_ID)]
    assert ((replaced >= NUM_SPECIAL) & (replaced < NUM_SPECIAL + len(task.alphabet))).all()


def test_mlm_forces_a_selection_in_every_row():
    task = small_task("reverse", min_length=2, max_length=2, mask_prob=0.01)
    batch = next(train_iterator(task, OBJECTIVES["mlm"], batch_size=64, seed=0))
    assert (batch["loss_mask"].sum(axis=1) >= 1).all()


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_iterator_state_resumes_the_same_batches(objective):
    for train_size in (None, 64):
        task = small_task("addition", train_size=train_size)
        it = train_iterator(task, OBJECTIVES[objective], 8, seed=1)
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(10)]  # crosses epochs when train_size=64
        resumed = train_iterator(task, OBJECTIVES[objective], 8, seed=1)
        resumed.set_state(state)
        for want in expected:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_mlm_masks_change_across_epochs():
    task = small_task("reverse", train_size=16)
    it = train_iterator(task, OBJECTIVES["mlm"], 16, seed=0)  # one batch is one epoch
    first, second = next(it), next(it)
    order = np.lexsort(first["targets"].T), np.lexsort(second["targets"].T)
    np.testing.assert_array_equal(first["targets"][order[0]], second["targets"][order[1]])
    assert not np.array_equal(first["loss_mask"][order[0]], second["loss_mask"][order[1]])


def test_mlm_eval_masking_is_fixed_by_split_seed():
    a = OBJECTIVES["mlm"].eval_set(small_task("sort")).examples
    b = OBJECTIVES["mlm"].eval_set(small_task("sort")).examples
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_eval_prompts_stop_at_equals_sign():
    for name in TASK_NAMES:
        task = small_task(name, eval_size=10)
        data = OBJECTIVES["clm"].eval_set(task)
        prompts, prompt_lens = data.decode_inputs["prompts"], data.decode_inputs["prompt_lens"]
        assert prompts.shape == (10, task.prompt_len) and prompts.dtype == np.int32
        for problem, prompt, length in zip(data.problems, prompts, prompt_lens):
            assert prompt[0] == BOS_ID and decode(task, prompt[:length]) == task.prompt(problem)
            assert (prompt[length:] == PAD_ID).all()


# -- vector tasks ---------------------------------------------------------------------------------
def test_teacher_task_is_balanced_fixed_by_split_seed_and_batched():
    task = build_task(TaskConfig(name="teacher", eval_size=400))
    heldout = task.eval_problems()
    assert heldout["features"].shape == (400, 16) and heldout["features"].dtype == np.float32
    assert heldout["label"].dtype == np.int32
    shares = np.bincount(heldout["label"], minlength=4) / 400
    assert shares.min() > 0.15 and shares.max() < 0.35  # balanced 4 classes, within sampling noise
    again = build_task(TaskConfig(name="teacher", eval_size=400)).eval_problems()
    other = build_task(TaskConfig(name="teacher", eval_size=400, split_seed=7)).eval_problems()
    np.testing.assert_array_equal(heldout["features"], again["features"])
    assert not np.array_equal(heldout["label"], other["label"])
    batch = next(train_iterator(task, OBJECTIVES["vector_classification"], batch_size=8, seed=0))
    assert batch["features"].shape == (8, 16) and batch["label"].shape == (8,)
    assert not np.isin(batch["features"], heldout["features"]).any()
    vectors = OBJECTIVES["vector_classification"]
    np.testing.assert_array_equal(vectors.eval_set(task).examples["label"], heldout["label"])


def test_teacher_fixed_training_set_resumes_and_token_objectives_refuse_it():
    task = build_task(TaskConfig(name="teacher", train_size=40, eval_size=50))
    it = train_iterator(task, OBJECTIVES["vector_classification"], 16, seed=1)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]  # crosses epochs of the 40 fixed points
    resumed = train_iterator(task, OBJECTIVES["vector_classification"], 16, seed=1)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["features"], want["features"])
    with pytest.raises(UserError, match="task 'teacher' gives feature vectors"):
        OBJECTIVES["clm"].check(task)
    with pytest.raises(UserError, match="task 'addition' gives tokens"):
        OBJECTIVES["vector_classification"].check(small_task("addition"))
