"""Replayed block passes: what each group's pass runs, and that replaying never changes a result."""

from collections import Counter

import pytest
import torch
from torch import nn

from lightning_sparse.replay import GroupPasses


def counted(features_in: int, features_out: int, calls: Counter, name: str) -> nn.Linear:
    """A plain Linear whose calls that really compute are counted (replayed or zeroed calls are not)."""
    layer = nn.Linear(features_in, features_out)
    compute = layer.forward

    def forward(x):
        calls[name] += 1
        return compute(x)

    layer.forward = forward
    return layer


class Block(nn.Module):
    """q/k (one shared input) -> o -> wide up (3x) -> down; ``in_place`` adds to o's output in place."""

    def __init__(self, calls: Counter, in_place: bool = False, twice: bool = False):
        super().__init__()
        self.q, self.k, self.o = (counted(4, 4, calls, name) for name in "qko")
        self.up, self.down = counted(4, 12, calls, "up"), counted(12, 4, calls, "down")
        self.in_place, self.twice, self.calls = in_place, twice, calls

    def forward(self, x):
        h = torch.tanh(self.q(x)) * self.k(x)
        h = self.o(h)
        if self.in_place:
            h.add_(1.0)
        if self.twice:
            h = self.o(h)
        return x + self.down(torch.relu(self.up(h)))


GROUPS = [["q", "k"], ["o"], ["up"], ["down"]]


def _prune_in_turn(block: Block, calls: list, shared: bool = True) -> list:
    """Run each group's passes, then halve that group's weights ("prune" it); returns the final outputs."""
    passes = GroupPasses(block, calls, GROUPS, shared_inputs=shared)
    block.calls.clear()  # the probe pass that found the call order
    for number, group in enumerate(GROUPS):
        for index in range(len(calls)):
            assert passes.run(number, index) is None  # stopped once the group's modules were entered
        with torch.no_grad():
            for name in group:
                block.get_submodule(name).weight.mul_(0.5)
    return [passes.run(len(GROUPS), index) for index in range(len(calls))]


def _calls(batches: int = 2) -> list:
    torch.manual_seed(0)
    return [((torch.randn(3, 4),), {}) for _ in range(batches)]


def _reference(block: Block, calls: list) -> list:
    with torch.no_grad():
        return [block(*args) for args, _ in calls]


@pytest.mark.parametrize("variant", [{}, {"in_place": True}, {"twice": True}], ids=["plain", "in-place", "twice"])
def test_replayed_outputs_equal_running_the_pruned_block(variant):
    torch.manual_seed(1)
    block, calls = Block(Counter(), **variant), _calls()
    with torch.no_grad():
        outputs = _prune_in_turn(block, calls)
    for out, expected in zip(outputs, _reference(block, calls), strict=True):
        assert torch.equal(out, expected)


def _computed(batches: int = 1, shared: bool = True, **variant) -> Counter:
    """How many times each layer of :class:`Block` really computed while its groups were pruned in turn."""
    counts = Counter()
    torch.manual_seed(1)
    block = Block(counts, **variant)
    with torch.no_grad():
        _prune_in_turn(block, _calls(batches), shared=shared)
    return counts


def test_each_pass_runs_only_what_the_group_just_pruned_changed():
    # q, k: once, for o's pass (zeros in their own pass, replayed after); o: once, in up's pass; up is wider than the
    # block's input, so it is not kept: it runs in down's pass and in the final one; down runs only at the end.
    assert _computed(batches=2) == {"q": 2, "k": 2, "o": 2, "up": 4, "down": 2}


def test_outputs_changed_in_place_are_computed_again():
    # o's output was modified after it returned: never replayed (it runs in up's, down's and the last pass)
    assert _computed(in_place=True)["o"] == 3


def test_a_module_called_twice_per_pass_is_never_replayed():
    counts = _computed(twice=True)
    # o's own pass stops at its second call (whose input is the first call's output: no zeros); both calls run in
    # up's, down's and the last pass
    assert counts["o"] == 1 + 2 + 2 + 2
    assert counts["q"] == 1  # zeros in its own pass, computed for o's, replayed after


def test_without_shared_inputs_the_group_modules_compute():
    assert _computed(shared=False)["q"] == 2  # its own pass (no zeros) and o's pass
