import math

import pytest

from lightning_sparse.core.schedules import Schedule, build_schedule


@pytest.mark.parametrize(
    ("shape", "midpoint"),
    [("constant", 0.1), ("linear", 0.55), ("cubic", 0.1 + 0.9 * 0.125), ("cosine", 0.55),
     ("exponential", math.sqrt(0.1))],
)
def test_shapes_at_start_middle_end(shape, midpoint):
    schedule = Schedule(final=0.1, initial=1.0, start=10, end=30, shape=shape)
    assert schedule(30) == pytest.approx(0.1) and schedule(1000) == pytest.approx(0.1)
    assert schedule(20) == pytest.approx(midpoint)
    if shape != "constant":
        assert schedule(0) == pytest.approx(1.0) and schedule(10) == pytest.approx(1.0)


def test_fractions_resolve_against_total_steps():
    schedule = Schedule(final=0.1, initial=1.0, start=0.25, end=0.75, shape="linear").resolve(200)
    assert (schedule.start, schedule.end) == (50, 150)
    assert schedule(100) == pytest.approx(0.55)


def test_build_from_float_dict_and_object():
    assert build_schedule(0.3)(999) == 0.3
    cosine = build_schedule({"type": "cosine", "initial": 0.3, "final": 0.0, "end": 100})
    assert cosine(0) == pytest.approx(0.3) and cosine(50) == pytest.approx(0.15)
    assert build_schedule(cosine) is cosine


def test_schedule_errors():
    with pytest.raises(ValueError, match="shape must be one of"):
        Schedule(final=0.1, shape="step")
    with pytest.raises(ValueError, match="start must not be after end"):
        Schedule(final=0.1, initial=1.0, start=50, end=10, shape="linear")
    with pytest.raises(ValueError, match="start must not be after end"):
        Schedule(final=0.1, initial=1.0, start=0.9, end=50, shape="linear").resolve(100)
    with pytest.raises(ValueError, match=r"fraction of the run and must be in \[0, 1\]"):
        Schedule(final=0.1, end=1.5)
    with pytest.raises(ValueError, match="must be >= 0"):
        Schedule(final=0.1, start=-1)
    with pytest.raises(TypeError, match="start must be an int"):
        Schedule(final=0.1, start="0")
    with pytest.raises(ValueError, match="needs initial and final > 0"):
        Schedule(final=0.0, initial=1.0, shape="exponential")
    with pytest.raises(ValueError, match=r"step 0.5 is a fraction of the run, whose length is unknown .* max_steps"):
        Schedule(final=0.1, initial=1.0, end=0.5, shape="linear").resolve(None)
    with pytest.raises(ValueError, match=r"^SparsityScheduler\(end=0.5\) is a fraction of the run"):
        Schedule(final=0.1, initial=1.0, end=0.5, shape="linear").resolve(None, "SparsityScheduler")
    with pytest.raises(ValueError, match="schedule type must be one of"):
        build_schedule({"type": "stairs"})
    with pytest.raises(ValueError, match="unknown schedule keys"):
        build_schedule({"type": "linear", "slope": 1})
    with pytest.raises(TypeError, match="a schedule must be"):
        build_schedule("cosine")
    with pytest.raises(TypeError, match="a schedule must be"):
        build_schedule(True)
