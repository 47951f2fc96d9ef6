"""What an export says it did, and the pattern it uses when none is given (the training's, from the checkpoint)."""

import pytest
import torch
from safetensors.torch import load_file

from lightning_sparse.callbacks import MagnitudePruning, SparseExport
from lightning_sparse.export import export_checkpoint
from lightning_sparse.export.checkpoint import main
from lightning_sparse.export.outcome import (
    NoSparseLayerError,
    default_pattern,
    export_pattern,
    no_sparse_reason,
    stored_line,
    training_patterns,
)
from tests.callbacks.test_export import fit

MLP = "lightning_sparse.models.MLP"


def test_export_pattern_follows_the_training():
    assert [export_pattern(p) for p in ("4x4", "64x9", "2:4", "1:4", "3:4", "2:8", "unstructured")] == [
        "4x4", "64x9", "2:4", "2:4", None, None, None]


def test_default_pattern_reads_the_callback_state(digits_checkpoint):
    checkpoint = torch.load(digits_checkpoint[0], weights_only=True)
    assert training_patterns(checkpoint) == {"16x16": 64 * 32}  # net.1.weight, Linear(64 -> 32)
    assert default_pattern(checkpoint) == ("16x16", "the training's pattern (training used 16x16 (2048 weights))")
    several = {"state_dict": {"a": torch.ones(10, 10), "b": torch.ones(4, 4)}, "callbacks": {
        "MagnitudePruning{'pattern': '2:4'}": {"masks": {"a": 0}}, "RigL{'pattern': '4x4'}": {"masks": {"b": 0}}}}
    assert default_pattern(several)[0] == "2:4"  # the pattern of the most weights
    unstructured = {"state_dict": several["state_dict"], "callbacks": {"RigL{'pattern': 'unstructured'}": {
        "masks": {"a": 0}}}}
    assert default_pattern(unstructured) == (
        "32x32", "training used unstructured (100 weights), which no export format follows: 32x32 blocks")
    assert default_pattern({"state_dict": {}})[1] == "no sparsity callback state in the checkpoint: 32x32 blocks"


def test_export_without_pattern_uses_the_training_pattern(digits_checkpoint, tmp_path, capsys):
    manifest = main(["--model", MLP, "--ckpt_path", str(digits_checkpoint[0]), "--out", str(tmp_path / "out")])
    assert manifest.pattern == "16x16" and manifest.converted == ["net.1"]
    captured = capsys.readouterr()
    assert "pattern 16x16: the training's pattern (training used 16x16 (2048 weights))" in captured.err
    assert captured.out.rstrip().endswith(stored_line(manifest, tmp_path / "out"))


def test_stored_line_counts_the_bytes_written(digits_checkpoint, tmp_path):
    manifest = export_checkpoint(digits_checkpoint[0], MLP, tmp_path)
    components = sum(t.numel() * t.element_size() for t in load_file(tmp_path / "sparse.safetensors").values())
    dense = (32 * 64 + 10 * 32) * 4  # float32 weights of net.1 and net.3
    after = components + 10 * 32 * 4  # net.1 as stored, net.3 dense
    expected = f"1 of 2 layers stored sparse ({dense / 1e6:.3g} MB -> {after / 1e6:.3g} MB)"
    assert stored_line(manifest, tmp_path) == expected
    assert after < dense


def test_no_sparse_layer_warns_why_or_fails_with_require_sparse(digits_checkpoint, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"no layer stored sparse with pattern '64x64', every layer stays dense: "
                                         r"shape \(32, 64\) is not divisible by the block 64x64 \(net.1\); "):
        manifest = export_checkpoint(digits_checkpoint[0], MLP, tmp_path / "warned", pattern="64x64")
    assert manifest.converted == []
    with pytest.raises(NoSparseLayerError, match="no layer stored sparse with pattern '64x64'"):
        export_checkpoint(digits_checkpoint[0], MLP, tmp_path / "failed", pattern="64x64", require_sparse=True)
    assert not (tmp_path / "failed").exists()  # nothing written
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", MLP, "--ckpt_path", str(digits_checkpoint[0]), "--out", str(tmp_path / "cli"), "--pattern",
              "64x64", "--require_sparse"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: no layer stored sparse with pattern '64x64'")


def test_no_sparse_reason_groups_layers_by_reason():
    assert no_sparse_reason("4x4", {"a": "r1", "b": "r2", "c": "r1", "": "r2"}).startswith(
        "no layer stored sparse with pattern '4x4', every layer stays dense: r1 (a, c); r2 (b, <root>). Train with")


def test_sparse_export_callback_warns_when_nothing_converts(tmp_path):
    with pytest.warns(UserWarning, match="SparseExport: no layer stored sparse with pattern 'dense'"):
        fit(tmp_path, MagnitudePruning(density=0.5), SparseExport(tmp_path / "out", pattern="dense"), max_steps=1)
