import json
import math
import pickle

import lightning.pytorch as pl
import pytest
import torch

from lightning_sparse.callbacks import KernelBenchmark, MagnitudePruning
from lightning_sparse.kernels.timing import linear_candidates
from lightning_sparse.models import SmallCNN
from tests.harness import harness_data, plain_model

FAST = {"warmup": 0.5, "rep": 2.0}
CONV1D_REASON = "Conv1d layers are not converted (only nn.Linear, Hugging Face Conv1D and nn.Conv2d)"


def fit(root, *callbacks):
    trainer = pl.Trainer(
        max_steps=2, callbacks=list(callbacks), accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(plain_model(), harness_data())
    return trainer


def positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_writes_a_ratio_per_layer_on_cpu(tmp_path, capsys):
    benchmark = KernelBenchmark(dirpath=tmp_path / "bench", pattern="4x4", **FAST)
    fit(tmp_path, MagnitudePruning(density=0.25, pattern="4x4"), benchmark)
    results = json.loads((tmp_path / "bench" / "kernel_benchmark.json").read_text())
    assert results == json.loads(json.dumps(benchmark.results))
    assert results["device"] == "cpu" and results["pattern"] == "4x4"
    rows = {row["name"]: row for row in results["layers"]}
    assert rows["conv"]["reason"] == CONV1D_REASON
    assert "speedup" not in rows["conv"]
    for name in ("body.0", "body.2", "head"):
        row = rows[name]
        assert row["tokens"] == 16 and row["errors"] == {}  # a batch of 16 rows of the real data
        assert set(row["times_ms"]) == {"dense F.linear", "SparseLinear"}
        assert all(map(positive, row["times_ms"].values()))
        assert positive(row["speedup"]) and row["faster"] == (row["speedup"] > 1)
    assert positive(results["linear_speedup"]) and positive(results["model"]["speedup"])
    assert results["model"]["inputs"] == 16
    out = capsys.readouterr().out
    assert "KernelBenchmark on cpu" in out and "whole model on cpu (batch of 16)" in out


def test_tokens_override_and_not_divisible_layers(tmp_path):
    benchmark = KernelBenchmark(dirpath=tmp_path, tokens=5, pattern="16x16", **FAST)
    fit(tmp_path, MagnitudePruning(density=0.5, pattern="16x16", include=["body.*.weight"]), benchmark)
    rows = {row["name"]: row for row in benchmark.results["layers"]}
    assert rows["body.0"]["tokens"] == rows["body.2"]["tokens"] == 5
    assert rows["head"]["reason"] == "shape (8, 32) is not divisible by the block 16x16"


def test_without_a_batch_it_needs_tokens(tmp_path):
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"KernelBenchmark needs tokens=\.\.\. when the train dataloader yields no"):
        KernelBenchmark(pattern="4x4", **FAST).benchmark(trainer, plain_model())


def test_argument_errors():
    with pytest.raises(ValueError, match=r'pattern must be "RxC" blocks or "2:4" \(there is nothing to time'):
        KernelBenchmark(pattern="dense")
    with pytest.raises(ValueError, match=r'pattern must be "RxC" blocks .* got \'x\''):
        KernelBenchmark(pattern="x")
    with pytest.raises(ValueError, match="tokens must be >= 1, got 0"):
        KernelBenchmark(tokens=0)
    with pytest.raises(TypeError, match="tokens must be an int, got float"):
        KernelBenchmark(tokens=1.5)
    with pytest.raises(ValueError, match=r"warmup must be >= 0 and rep > 0 \(milliseconds\), got warmup=1, rep=0"):
        KernelBenchmark(warmup=1, rep=0)
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'float16', 'bfloat16'\) or None"):
        KernelBenchmark(dtype="half")
    assert pickle.loads(pickle.dumps(KernelBenchmark(tokens=3))).tokens == 3


def image_batches():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_times_conv_layers_and_the_whole_cnn(tmp_path, capsys):
    torch.manual_seed(0)
    model = SmallCNN(image_size=8, width=16, scheduler=None)  # features.3: Conv2d(16, 32, 3), matrix view (32, 144)
    benchmark = KernelBenchmark(dirpath=tmp_path, pattern="16x16", **FAST)
    channels = MagnitudePruning(density=0.25, pattern="32x9", include=["features.3.weight"])  # 4 of 16 channels
    blocks = MagnitudePruning(density=0.25, pattern="16x16", include=["classifier.1.weight"])
    trainer = pl.Trainer(
        max_steps=2, callbacks=[channels, blocks, benchmark], accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, image_batches())
    rows = {row["name"]: row for row in benchmark.results["layers"]}
    conv = rows["features.3"]
    assert conv["type"] == "Conv2d" and conv["input_shape"] == [16, 16, 4, 4] and conv["errors"] == {}
    assert set(conv["times_ms"]) == {"dense Conv2d", "SparseConv2d"} and all(map(positive, conv["times_ms"].values()))
    assert positive(conv["speedup"]) and conv["faster"] == (conv["speedup"] > 1)
    assert rows["features.0"]["reason"] == "matrix view (16, 9) is not divisible by the block 16x16"
    assert rows["classifier.1"]["tokens"] == 16
    for key in ("conv_speedup", "linear_speedup"):
        assert positive(benchmark.results[key])
    assert positive(benchmark.results["model"]["speedup"]) and benchmark.results["model"]["errors"] == {}
    out = capsys.readouterr().out
    assert "speed-up vs dense" in out and "all converted Conv2d layers together: speed-up" in out
    again = KernelBenchmark(dirpath=tmp_path, tokens=5, pattern="16x16", **FAST).benchmark(trainer, model)
    rows = {row["name"]: row for row in again["layers"]}
    assert rows["classifier.1"]["tokens"] == 5 and rows["features.3"]["input_shape"] == [16, 16, 4, 4]  # from the batch


def test_gpt2_conv1d_layers_are_timed_at_their_out_in_shape(tmp_path):
    pytest.importorskip("transformers")
    from tests.hf_models import HF_GPT2, text_batches

    benchmark = KernelBenchmark(dirpath=tmp_path, pattern="2:4", **FAST)
    trainer = pl.Trainer(
        max_steps=1, callbacks=[MagnitudePruning(density=0.5, pattern="2:4"), benchmark], accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(HF_GPT2.make(), text_batches(1))
    rows = {row["name"]: row for row in benchmark.results["layers"]}
    fc = rows["model.transformer.h.0.mlp.c_fc"]  # Conv1D(nf=64, nx=16): stored (16, 64)
    assert (fc["type"], fc["shape"], fc["matrix_shape"]) == ("Conv1D", [16, 64], [64, 16])
    assert fc["tokens"] == 4 * 16 and fc["errors"] == {} and positive(fc["speedup"])  # a dict batch of 4 x 16 ids
    assert rows["model.lm_head"]["reason"].startswith("its weight is tied to 'model.transformer.wte.weight'")
    assert benchmark.results["model"]["inputs"] == 4 and positive(benchmark.results["model"]["speedup"])
    again = KernelBenchmark(dirpath=tmp_path, tokens=3, pattern="2:4", **FAST).benchmark(trainer, trainer.model)
    proj = {row["name"]: row for row in again["layers"]}["model.transformer.h.1.mlp.c_proj"]
    assert proj["tokens"] == 3 and proj["matrix_shape"] == [16, 64] and proj["errors"] == {}


def test_linear_candidates_need_a_linear_layer():
    with pytest.raises(TypeError, match="linear must be an nn.Linear or a Hugging Face Conv1D, got Conv2d"):
        linear_candidates(torch.nn.Conv2d(2, 2, 1), torch.randn(2, 2), "2:4", None)
