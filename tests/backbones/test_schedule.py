import pytest
import torch

from promptloop.backbones import RefinementSchedule


def test_uniform_is_evenly_spaced_and_in_range():
    assert RefinementSchedule.uniform(5).steps(50) == [8, 17, 25, 33, 42]
    assert RefinementSchedule.uniform(1).steps(10) == [5]
    assert RefinementSchedule.uniform(3).steps(4) == [1, 2, 3]  # turbo: every step after the first
    for T in range(1, 30):
        for n in range(T):
            steps = RefinementSchedule.uniform(n).steps(T)
            assert len(steps) == n and len(set(steps)) == n
            assert all(1 <= s <= T - 1 for s in steps) and steps == sorted(steps)


def test_none_has_no_steps():
    assert RefinementSchedule.none().steps(1) == []
    assert RefinementSchedule.none().num_refinements == 0


def test_random_is_seeded_subset_and_covers_all_steps():
    a, b = RefinementSchedule.random(3, seed=7), RefinementSchedule.random(3, seed=7)
    assert a.steps(20) == b.steps(20) == a.steps(20)
    seen = set()
    for seed in range(200):
        steps = RefinementSchedule.random(3, seed=seed).steps(8)
        assert len(set(steps)) == 3 and all(1 <= s <= 7 for s in steps) and steps == sorted(steps)
        seen.update(steps)
    assert seen == set(range(1, 8))
    assert RefinementSchedule.random(3, seed=0).steps(4) == [1, 2, 3]


def test_random_from_generator_and_global_seed_are_reproducible():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert RefinementSchedule.random(4, generator=g1).steps(50) == RefinementSchedule.random(4, generator=g2).steps(50)
    torch.manual_seed(11)
    first = RefinementSchedule.random(4).steps(50)
    torch.manual_seed(11)
    assert RefinementSchedule.random(4).steps(50) == first
    with pytest.raises(ValueError, match="not both"):
        RefinementSchedule.random(2, seed=1, generator=g1)


def test_explicit_sorted_and_validated():
    assert RefinementSchedule.explicit([7, 3]).steps(10) == [3, 7]
    with pytest.raises(ValueError, match=r"duplicates \[3\]"):
        RefinementSchedule.explicit([3, 3])
    with pytest.raises(ValueError, match=r"\[-1\] are out of range"):
        RefinementSchedule.explicit([-1, 2])
    with pytest.raises(ValueError, match=r"\[10\] are out of range for num_inference_steps=10.*1\.\.9"):
        RefinementSchedule.explicit([2, 10]).steps(10)
    with pytest.raises(TypeError, match="ints"):
        RefinementSchedule.explicit([1.5])


@pytest.mark.parametrize("make", [RefinementSchedule.uniform, lambda n: RefinementSchedule.random(n, seed=0)])
def test_too_many_refinements_names_the_numbers(make):
    with pytest.raises(ValueError, match=r"4 refinements needs at least 5 sampling steps, got num_inference_steps=4"):
        make(4).steps(4)


def test_bad_counts():
    with pytest.raises(ValueError, match="num_refinements"):
        RefinementSchedule.uniform(-1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        RefinementSchedule.uniform(1).steps(0)


def test_initial_rewrite_adds_step_0_on_top_of_the_refinements():
    uniform = RefinementSchedule.uniform(3, initial_rewrite=True)
    assert uniform.steps(10) == [0] + RefinementSchedule.uniform(3).steps(10) and uniform.num_decisions == 4
    random = RefinementSchedule.random(2, seed=4, initial_rewrite=True)
    assert random.steps(10) == [0] + RefinementSchedule.random(2, seed=4).steps(10)
    explicit = RefinementSchedule.explicit([5, 0])
    assert explicit == RefinementSchedule(kind="explicit", num_refinements=1, explicit_steps=(5,), initial_rewrite=True)
    assert explicit.steps(10) == [0, 5] and RefinementSchedule.explicit([0]).steps(1) == [0]
    assert RefinementSchedule.none().num_decisions == 0
    with pytest.raises(TypeError, match="initial_rewrite must be a bool"):
        RefinementSchedule.uniform(2, initial_rewrite=1)
