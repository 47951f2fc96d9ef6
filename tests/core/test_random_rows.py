"""random_rows: a sharded rank's rows of the whole random draw, with the generator left as the whole draw leaves it."""

import pytest
import torch

from lightning_sparse.core.scores import random, random_rows


@pytest.mark.parametrize(("shape", "start", "stop", "chunk"), [
    ((40, 16), 0, 20, 64), ((40, 16), 20, 40, 64), ((7, 24), 4, 7, 50), ((7, 24), 0, 0, 1), ((9, 3, 2, 2), 2, 8, 30),
    ((5, 1000), 1, 4, 10), ((6, 5), 0, 6, 1 << 22),
])
def test_equals_the_rows_of_the_whole_draw_and_advances_the_generator_alike(shape, start, stop, chunk):
    whole_generator, rows_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    whole = random(torch.empty(shape), whole_generator)
    rows = random_rows(shape, rows_generator, start, stop, chunk=chunk)
    assert torch.equal(rows, whole[start:stop])
    assert torch.equal(rows_generator.get_state(), whole_generator.get_state())
    assert torch.equal(torch.rand(3, generator=rows_generator), torch.rand(3, generator=whole_generator))
