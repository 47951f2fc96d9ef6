"""Masks in FSDP2 checkpoints: every rank writes its bit-packed rows into Lightning's distributed checkpoint (rank 0's
``meta.pt`` holds only a reference), and checkpoints move between FSDP2 and one device."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sparse.callbacks import MagnitudePruning, SparsityScheduler
from lightning_sparse.mask_checkpoint import (
    MASKS_KEY,
    PACKED,
    SHARDED,
    consolidate,
    pack_bits,
    packed_columns,
    reference,
    unpack_bits,
)
from lightning_sparse.masking import MaskState
from tests import fsdp2

SHAPES = {"body.0.weight": (40, 16), "body.2.weight": (24, 40), "head.weight": (7, 24)}


def _callbacks():
    return [SparsityScheduler(density=0.3, end=3), MagnitudePruning(update_every=2)]  # steps: runs differ in length


def _state_of(checkpoint, name):
    """The one callback state of class ``name`` in a loaded checkpoint (or ``meta.pt``)."""
    (state,) = [s for key, s in checkpoint["callbacks"].items() if key.startswith(f"{name}{{")]
    return state


def _checkpointed(root):
    root.mkdir()
    return ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")


@pytest.mark.parametrize("shape", [(3, 8), (5, 13), (4, 3, 3, 3), (1, 1), (0, 5)])
def test_packed_masks_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (shape[0], packed_columns(shape))
    assert torch.equal(unpack_bits(packed, shape), mask)


@pytest.mark.ddp
def test_every_rank_writes_its_packed_rows_and_rank_zero_only_a_reference(tmp_path):
    full = tmp_path / "full"
    fsdp2.fit([*_callbacks(), _checkpointed(full)], full, epochs=1)
    folder = full / "epoch=0.ckpt"
    state = _state_of(torch.load(folder / "meta.pt", weights_only=False), "MagnitudePruning")
    assert set(state["masks"]) == {SHARDED, "shapes"}, "meta.pt must not hold the masks"
    assert {name: tuple(shape) for name, shape in state["masks"]["shapes"].items()} == SHAPES
    stored = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    ours = {key: value for key, value in stored.items() if MASKS_KEY in key}
    assert len(ours) == 3
    final = fsdp2.results(full)[0]["masks"]
    whole = consolidate(folder, tmp_path / "one.ckpt")
    packed = torch.load(whole, weights_only=False)
    assert not any(MASKS_KEY in key for key in packed["state_dict"]), "masks left among the model's weights"
    state = _state_of(packed, "MagnitudePruning")
    for name, shape in SHAPES.items():
        key = next(k for k in ours if k.endswith(f".{name}"))
        assert tuple(ours[key].size) == (shape[0], packed_columns(shape))
        assert [tuple(chunk.offsets) for chunk in ours[key].chunks] == [(0, 0), ((shape[0] + 1) // 2, 0)]
        assert torch.equal(unpack_bits(state["masks"][PACKED][name], shape), final[name])


@pytest.mark.ddp
def test_an_fsdp2_checkpoint_resumes_on_one_device(tmp_path):
    full = tmp_path / "full"
    fsdp2.fit([*_callbacks(), _checkpointed(full)], full, epochs=1)
    expected = fsdp2.results(full)[0]
    one = consolidate(full / "epoch=0.ckpt")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    fsdp2.fit_one_device([*_callbacks(), fsdp2.DumpAtTrainStart(resumed)], resumed, epochs=2, ckpt_path=str(one),
                         enable_checkpointing=False)
    start = torch.load(resumed / "start.pt", weights_only=True)
    for name, mask in expected["masks"].items():
        assert torch.equal(start["masks"][name], mask), f"mask of {name} differs after the move to one device"
    for name, weight in expected["weights"].items():
        assert torch.equal(start["weights"][name], weight), f"{name} differs after the move to one device"
    end = fsdp2.results_one_device(resumed)
    assert end["density"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.ddp
def test_a_one_device_checkpoint_resumes_under_fsdp2(tmp_path):
    one = tmp_path / "one"
    fsdp2.fit_one_device([*_callbacks(), _checkpointed(one)], one, epochs=1)
    expected = fsdp2.results_one_device(one)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    fsdp2.fit([*_callbacks(), fsdp2.DumpAtTrainStart(resumed)], resumed, epochs=2,
              ckpt_path=str(one / "epoch=0.ckpt"), enable_checkpointing=False)
    start = torch.load(resumed / "start.pt", weights_only=True)
    for name, mask in expected["masks"].items():
        assert torch.equal(start["masks"][name], mask), f"mask of {name} differs after the move to FSDP2"
    for name, weight in expected["weights"].items():
        assert torch.equal(start["weights"][name], weight), f"{name} differs after the move to FSDP2"


def _state() -> MaskState:
    return MaskState({name: torch.nn.Parameter(torch.ones(shape)) for name, shape in SHAPES.items()})


def test_masks_that_do_not_fit_the_model_are_an_error():
    wrong = {**SHAPES, "head.weight": (8, 24)}
    with pytest.raises(ValueError, match=r"mask for head.weight has shape \(8, 24\) but the model's head.weight has "
                                         r"shape \(7, 24\)"):
        _state().check_state_dict(reference("abc", wrong))
    packed = {PACKED: {n: pack_bits(torch.ones(s, dtype=torch.bool)) for n, s in wrong.items()}, "shapes": wrong}
    with pytest.raises(ValueError, match=r"mask for head.weight has shape \(8, 24\)"):
        _state().load_state_dict(packed)
    with pytest.raises(ValueError, match=r"checkpoint has \['body.0.weight'\]"):
        _state().check_state_dict(reference("abc", {"body.0.weight": (40, 16)}))


def test_a_reference_needs_the_checkpoint_path():
    with pytest.raises(ValueError, match=r"masks are in a distributed checkpoint, but no checkpoint path was given"):
        _state().load_state_dict(reference("abc", SHAPES))


def test_consolidate_needs_a_distributed_checkpoint_folder(tmp_path):
    (tmp_path / "file.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"path must be a distributed checkpoint folder \(with meta.pt\), got '.*file"):
        consolidate(tmp_path / "file.ckpt")


def test_the_consolidate_command_reports_a_bad_folder(tmp_path, capsys):
    from lightning_sparse.consolidate import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "path must be a distributed checkpoint folder" in capsys.readouterr().err


@pytest.mark.ddp
def test_per_weight_state_is_written_rank_by_rank_too(tmp_path):
    from lightning_sparse.callbacks import SNFS

    full = tmp_path / "full"
    fsdp2.fit([SNFS(density=0.5, update_every=2, stop_at=1.0), _checkpointed(full)], full, epochs=1)
    folder = full / "epoch=0.ckpt"
    state = _state_of(torch.load(folder / "meta.pt", weights_only=False), "SNFS")
    assert not any(isinstance(v, torch.Tensor) for v in state["momentum"].values()), "meta.pt holds the momentum"
    whole = torch.load(consolidate(folder), weights_only=False)
    state = _state_of(whole, "SNFS")
    assert {name: tuple(m.shape) for name, m in state["momentum"].items()} == SHAPES
    assert not any(MASKS_KEY in key for key in whole["state_dict"])


@pytest.mark.ddp
def test_topkast_backward_masks_are_written_rank_by_rank_and_resume_on_one_device(tmp_path):
    from lightning_sparse.callbacks import TopKAST

    def make():
        return TopKAST(density=0.3, backward_density=0.5, update_every=2)

    full = tmp_path / "full"
    fsdp2.fit([make(), _checkpointed(full)], full, epochs=1)
    folder = full / "epoch=0.ckpt"
    state = _state_of(torch.load(folder / "meta.pt", weights_only=False), "TopKAST")
    assert not any(isinstance(v, torch.Tensor) for v in state["backward_masks"].values()), "meta.pt holds them"
    whole = torch.load(consolidate(folder), weights_only=False)
    state = _state_of(whole, "TopKAST")
    backward = state["backward_masks"]
    assert {name: tuple(m.shape) for name, m in backward.items()} == SHAPES
    final = fsdp2.results(full)[0]["masks"]
    for name, mask in final.items():
        assert not (mask & ~backward[name].bool()).any(), f"{name}: the forward set must lie inside the backward set"
        assert int(backward[name].sum()) > int(mask.sum())


@pytest.mark.ddp
def test_supermask_scores_are_written_rank_by_rank(tmp_path):
    from lightning_sparse.callbacks import Supermask

    full = tmp_path / "full"
    fsdp2.fit([Supermask(density=0.5, tile_size=4, exclude="head.weight"), _checkpointed(full)], full, epochs=1)
    folder = full / "epoch=0.ckpt"
    state = _state_of(torch.load(folder / "meta.pt", weights_only=False), "Supermask")
    assert "scores" in state and not any(isinstance(v, torch.Tensor) for v in state["scores"].values())
    whole = torch.load(consolidate(folder), weights_only=False)
    state = _state_of(whole, "Supermask")
    assert {name: tuple(s.shape) for name, s in state["scores"].items()} == {"body.0.weight": (10, 4),
                                                                            "body.2.weight": (6, 10)}
