"""The algorithmic tasks: layouts, answers, seeding, the metric and the curriculum."""

import pytest
import torch

from sparsemem.tasks import (
    TASKS,
    AssociativeRecall,
    Copy,
    Curriculum,
    KeyValueRecall,
    PrioritySort,
    RepeatCopy,
    bits_in_error,
    sequence_loss,
)

BITS = 6


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_are_seeded_and_shaped(name):
    task = TASKS[name](BITS)
    level = task.max_level
    batch = task.sample(5, level, generator())
    again = task.sample(5, level, generator())
    other = task.sample(5, level, generator(1))
    assert torch.equal(batch.inputs, again.inputs) and torch.equal(batch.targets, again.targets)
    assert not torch.equal(batch.inputs, other.inputs)
    T = batch.inputs.shape[1]
    assert batch.inputs.shape == (5, T, task.input_size)
    assert batch.targets.shape == (5, T, task.output_size)
    assert batch.mask.shape == (5, T) and batch.mask.dtype == torch.bool
    # Nothing is asked before the input ends, and every unscored target is blank.
    assert not batch.mask[:, 0].any() and batch.mask[:, -1].all()
    assert batch.targets[~batch.mask].abs().sum() == 0
    with pytest.raises(ValueError, match="level must be in"):
        task.sample(2, task.max_level + 1, generator())


def test_copy_answers_with_its_input():
    batch = Copy(BITS).sample(4, 3, generator())
    assert batch.inputs.shape[1] == 7
    torch.testing.assert_close(batch.targets[:, 4:], batch.inputs[:, :3, :BITS])
    assert batch.inputs[:, 3, BITS].eq(1).all() and batch.inputs[:, 4:].abs().sum() == 0


def test_repeat_copy_repeats_then_ends():
    task = RepeatCopy(BITS, max_repeats=3)
    batch = task.sample(2, 2, generator())
    T = batch.inputs.shape[1]
    repeats = round(float(batch.inputs[0, 2, BITS + 1]) * 3)
    assert 2 + 1 + repeats * 2 + 1 == T
    sequence = batch.inputs[:, :2, :BITS]
    torch.testing.assert_close(batch.targets[:, 3 : T - 1, :BITS], sequence.repeat(1, repeats, 1))
    assert batch.targets[:, T - 1, BITS].eq(1).all() and batch.targets[:, : T - 1, BITS].sum() == 0


def test_associative_recall_answers_the_next_item():
    task = AssociativeRecall(BITS, item_length=2)
    items = 4
    batch = task.sample(8, items, generator())
    stored = torch.stack([batch.inputs[:, i * 3 + 1 : i * 3 + 3, :BITS] for i in range(items)], dim=1)
    query = batch.inputs[:, items * 3 + 1 : items * 3 + 3, :BITS]
    answer = batch.targets[batch.mask].view(8, 2, BITS)
    for b in range(8):
        position = next(i for i in range(items - 1) if torch.equal(stored[b, i], query[b]))
        torch.testing.assert_close(answer[b], stored[b, position + 1])


@pytest.mark.parametrize(("outputs", "expected"), [(None, 4), (2, 2), (9, 4)])
def test_priority_sort_orders_by_priority(outputs, expected):
    batch = PrioritySort(BITS, outputs=outputs).sample(3, 4, generator())
    assert batch.inputs.shape[1] == 4 + 1 + expected and batch.mask.sum(1).tolist() == [expected] * 3
    priority = batch.inputs[:, :4, BITS]
    order = priority.argsort(dim=1, descending=True)[:, :expected]
    for b in range(3):
        torch.testing.assert_close(batch.targets[b, 5:], batch.inputs[b, order[b], :BITS])


def test_repeat_copy_repeats_at_most_max_repeats():
    task = RepeatCopy(BITS, max_repeats=7)
    lengths = {task.sample(2, 3, generator(seed)).inputs.shape[1] for seed in range(40)}
    assert lengths == {3 + 1 + n * 3 + 1 for n in range(1, 8)}


def test_repeat_copy_repeats_follow_the_level_when_asked():
    task = RepeatCopy(BITS, max_length=10, max_repeats=7, repeats_follow_level=True)
    for level, most in ((2, 2), (5, 5), (10, 7)):
        batches = [task.sample(2, level, generator(seed)) for seed in range(60)]
        repeats = {(batch.inputs.shape[1] - level - 2) // level for batch in batches}
        assert repeats == set(range(1, most + 1))
        # the count's channel scales by max_repeats at every level
        scaled = {round(float(batch.inputs[0, level, BITS + 1]) * 7) for batch in batches}
        assert scaled == repeats


@pytest.mark.parametrize(("make", "message"), [
    (lambda: PrioritySort(BITS, outputs=0), "outputs must be a positive int"),
    (lambda: RepeatCopy(BITS, max_repeats=0), "max_repeats must be a positive int"),
])  # fmt: skip
def test_task_options_out_of_range_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bits_in_error_and_loss():
    batch = Copy(BITS).sample(4, 3, generator())
    perfect = (batch.targets * 2 - 1) * 10
    assert bits_in_error(perfect, batch) == 0
    assert bits_in_error(-perfect, batch) == 3 * BITS
    assert sequence_loss(perfect, batch) < 1e-3 < sequence_loss(-perfect, batch)
    # Unscored steps count for nothing, whatever the model says there.
    noisy = perfect.clone()
    noisy[~batch.mask] = -noisy[~batch.mask] + 5
    assert bits_in_error(noisy, batch) == 0
    torch.testing.assert_close(sequence_loss(noisy, batch), sequence_loss(perfect, batch))


def test_curriculum_advances_on_mastery_and_round_trips():
    curriculum = Curriculum(1, 3, threshold=0.5, window=3)
    draws = {curriculum.draw(generator(seed)) for seed in range(10)}
    assert draws == {1}
    for error in (1.5, 0.2, 0.2):
        curriculum.update(1, error)
    assert curriculum.level == 1  # the window mean is 0.63 until the 1.5 leaves it
    curriculum.update(2, 0.0)  # below the top level: not counted
    curriculum.update(1, 0.2)
    assert curriculum.level == 2 and not curriculum.mastered
    for _ in range(3):
        curriculum.update(2, 0.0)
    for _ in range(3):
        curriculum.update(3, 0.1)
    assert curriculum.level == 3 and curriculum.mastered
    copy = Curriculum(1, 3, threshold=0.5, window=3)
    copy.load_state_dict(curriculum.state_dict())
    assert copy.level == 3 and copy.mastered
    assert Curriculum(1, 3, enabled=False).level == 3


def test_curriculum_growth_multiplies_the_top_level_up_to_the_highest():
    curriculum = Curriculum(8, 40, threshold=0.5, window=2, growth=2)
    levels = [curriculum.level]
    while not curriculum.mastered:
        for _ in range(2):
            curriculum.update(curriculum.level, 0.0)
        levels.append(curriculum.level)
    assert levels == [8, 16, 32, 40, 40]
    slow = Curriculum(1, 3, threshold=0.5, window=1, growth=1.2)  # ceil(1.2) = 2: never less than one up
    slow.update(1, 0.0)
    assert slow.level == 2
    with pytest.raises(ValueError, match=r"growth must be a number >= 1; got 0\.5"):
        Curriculum(1, 3, growth=0.5)


def test_curriculum_top_share_draws_that_share_at_the_top_level():
    g = generator(0)
    mixed = Curriculum(1, 8, top_share=0.5)
    mixed.level = 8
    draws = torch.tensor([mixed.draw(g) for _ in range(4000)])
    assert abs((draws == 8).float().mean().item() - (0.5 + 0.5 / 8)) < 0.03  # the share, and the uniform's 1/8
    assert set(draws.tolist()) == set(range(1, 9))
    always = Curriculum(1, 8, top_share=1.0)
    always.level = 5
    assert {always.draw(g) for _ in range(50)} == {5}
    # top_share 0 draws exactly the levels a curriculum without it draws
    plain, zero = Curriculum(1, 8), Curriculum(1, 8, top_share=0.0)
    plain.level = zero.level = 8
    a, b = generator(3), generator(3)
    assert [plain.draw(a) for _ in range(30)] == [zero.draw(b) for _ in range(30)]
    with pytest.raises(ValueError, match=r"top_share must be a number in \[0, 1\]; got 1\.5"):
        Curriculum(1, 3, top_share=1.5)


def test_bad_levels_are_named():
    with pytest.raises(ValueError, match="min_level <= max_level"):
        Copy(BITS, 4, 2)
    with pytest.raises(ValueError, match="min_items >= 2"):
        AssociativeRecall(BITS, min_items=1)


def test_key_value_recall_answers_with_the_value_stored_under_the_key():
    task = KeyValueRecall(BITS, max_pairs=2000, key_bits=24, query_every=4, recent=16, final_queries=50)
    P, kb = 2000, 24
    batch = task.sample(3, P, generator())
    T = batch.inputs.shape[1]
    assert T == P + P // 4 + 50
    store = batch.inputs[..., -2] == 1
    query = batch.inputs[..., -1] == 1
    assert torch.equal(query, batch.mask) and not (store & query).any()
    assert store.sum(1).tolist() == [P] * 3 and query[:, -50:].all()
    for b in range(3):
        steps = store[b].nonzero().flatten().tolist()
        position = {tuple(batch.inputs[b, t, :kb].int().tolist()): i for i, t in enumerate(steps)}
        asked = []
        for t in query[b].nonzero().flatten().tolist():
            i = position[tuple(batch.inputs[b, t, :kb].int().tolist())]
            assert torch.equal(batch.targets[b, t], batch.inputs[b, steps[i], kb:-2])
            stored_before = sum(1 for s in steps if s < t)
            assert i < stored_before
            if t < T - 50:
                assert stored_before - i <= 16  # a recent pair: within reach of truncated BPTT
            else:
                asked.append(i)
        # the final queries reach back over the whole episode, far beyond the recent window
        assert min(asked) < P // 2 and max(asked) >= P // 2


def test_key_value_recall_scales_to_many_pairs_quickly():
    task = KeyValueRecall(BITS, max_pairs=20_000)
    batch = task.sample(2, 20_000, generator())
    assert batch.inputs.shape == (2, 20_000 + 5_000 + 16, 32 + BITS + 2)
    assert task.eval_levels() == [2, 20_000]
