"""The harness every sparsity algorithm must pass.

For an :class:`AlgorithmCase` (a factory of fresh callbacks plus the expectations), it checks:

* exact density: every target keeps exactly the budget its pattern and density imply;
* strict loading: the checkpoint's model ``state_dict`` loads with ``strict=True`` into a plain model that never
  saw this library, and that model's outputs equal the trained model's; a checkpoint saved after ``fit`` also
  loads into a plain model that computes what the trained forward computed when training ended (for algorithms
  that keep dense weights and mask the forward, after they baked their masks into the weights);
* exact resume: stopping after epoch 1 and resuming to epoch 2 gives masks and weights bit-identical to the
  uninterrupted 2-epoch run (CPU);
* DDP: masks and weights identical on 2 CPU ranks (``ddp_fork``, gloo);
* pickling, and parsing the callback from a YAML config;
* final density (:func:`check_final_density`): with ``update_every`` not dividing the schedule's end step, the run
  ends at exactly the density asked, without a warning;
* resumable after fit (:func:`check_resume_after_fit`): ``trainer.save_checkpoint`` after ``fit`` returned, and after
  an early stop (``trainer.should_stop``), resumes exactly (after masked-forward algorithms baked their masks), or is
  refused with a message that says why; an early stop short of the schedule's end warns with both densities.

Every check runs on a :class:`HarnessModel`: :data:`NET` (``HarnessNet``, the default) or, in
``tests/callbacks/test_hf_harness.py``, tiny Hugging Face GPT-2 (``Conv1D`` layers, tied head) and Llama models
trained on dict batches.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_sparse.callbacks.base import SparsityCallback
from lightning_sparse.core.patterns import NM, Blocks
from lightning_sparse.layers import layer_weights

BATCHES_PER_EPOCH = 4
EPOCHS = 2


class HarnessNet(pl.LightningModule):
    """Conv1d + 3 Linear layers; every weight's matrix view is divisible by 4x4 blocks and by 2:4."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.conv = nn.Conv1d(4, 8, kernel_size=2)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.conv(x)).flatten(1)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def plain_model() -> nn.Module:
    """A ``HarnessNet`` built from the same seed every time."""
    torch.manual_seed(0)
    return HarnessNet()


def harness_data() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16 * BATCHES_PER_EPOCH, 4, 9, generator=generator)
    y = torch.randint(0, 8, (16 * BATCHES_PER_EPOCH,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


@dataclass(frozen=True)
class HarnessModel:
    """A model the harness trains: a seeded factory, its data, and how a batch becomes outputs."""

    name: str
    make: Callable[[], nn.Module]
    data: Callable[[], torch.utils.data.DataLoader]
    run: Callable[[nn.Module, Any], torch.Tensor]

    def first_batch(self) -> Any:
        return next(iter(self.data()))


NET = HarnessModel("HarnessNet", plain_model, harness_data, lambda model, batch: model(batch[0]))


@dataclass
class AlgorithmCase:
    """One configuration of an algorithm under test.

    Args:
        name: test id.
        make_callbacks: returns fresh callbacks (the sparsity callback and, e.g., its scheduler).
        yaml_config: ``[{"class_path": ..., "init_args": {...}}, ...]`` equivalent to ``make_callbacks``.
    """

    name: str
    make_callbacks: Callable[[], list[Callback]]
    yaml_config: list[dict] = field(default_factory=list)


def sparsity_callback(callbacks: list[Callback]) -> SparsityCallback:
    return next(cb for cb in callbacks if isinstance(cb, SparsityCallback))


class FinalOutput(Callback):
    """The model's outputs on ``inputs`` (default: the first harness batch) when training ends, before any callback
    bakes masks into the weights."""

    def __init__(self, spec: HarnessModel = NET) -> None:
        self.spec, self.batch = spec, spec.first_batch()
        self.output: torch.Tensor | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.output = self.spec.run(pl_module, self.batch)
        pl_module.train(training)


def fit(case: AlgorithmCase, root: Path, ckpt_path: str | None = None, extra_callbacks: tuple = (),
        spec: HarnessModel = NET, epochs: int = EPOCHS, **trainer_kwargs):
    """Train ``case`` for ``epochs`` epochs, checkpointing every epoch and, after ``fit``, to ``final.ckpt``."""
    model, callbacks = spec.make(), case.make_callbacks()
    checkpoint = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[*extra_callbacks, *callbacks, checkpoint], accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, deterministic=True,
        **trainer_kwargs,
    )
    trainer.fit(model, spec.data(), ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "final.ckpt")
    return model, sparsity_callback(callbacks)


def expected_kept(callback: SparsityCallback, name: str, density: float) -> int:
    shape = tuple(callback.masks.params[name].shape)
    pattern, groups = callback.pattern, callback.pattern.num_groups(shape)
    if isinstance(pattern, NM):
        return groups * pattern.keep_per_group(density)
    if isinstance(pattern, Blocks):
        return round(density * groups) * pattern.rows * pattern.cols
    return round(density * groups)


def check_nm_along_inputs(model: nn.Module, callback: SparsityCallback) -> None:
    """Every N:M group runs along the input dimension of its layer's ``(out, in)`` view (dim 0 of a Conv1D)."""
    if not isinstance(callback.pattern, NM):
        return
    kinds, (n, m) = layer_weights(model), (callback.pattern.n, callback.pattern.m)
    for name, mask in callback.masks.masks.items():
        view = kinds[name].kind.as_matrix(mask) if name in kinds else mask.reshape(mask.shape[0], -1)
        per_group = view.reshape(view.shape[0], -1, m).sum(-1)
        assert int(per_group.max()) <= max(n, callback.pattern.keep_per_group(callback.final_density)), name


def check_exact_density(model: nn.Module, callback: SparsityCallback, step: int) -> None:
    densities = callback.layer_densities(step)
    params = dict(model.named_parameters())
    check_nm_along_inputs(model, callback)
    for name, mask in callback.masks.masks.items():
        kept = int(mask.sum())
        if callback.distribution != "global":
            assert kept == expected_kept(callback, name, densities[name]), f"{name}: kept {kept}, density {densities}"
        assert not (params[name].detach()[~mask] != 0).any(), f"{name} has non-zero weights outside its mask"
    if callback.distribution == "global":
        total = sum(m.numel() for m in callback.masks.masks.values())
        kept = sum(int(m.sum()) for m in callback.masks.masks.values())
        group = callback.pattern.rows * callback.pattern.cols if isinstance(callback.pattern, Blocks) else 1
        assert kept == round(callback.target_density(step) * total / group) * group


def check_strict_checkpoint(
    model: nn.Module, checkpoint: Path, expected: torch.Tensor | None = None, spec: HarnessModel = NET
) -> None:
    """A plain model loads ``checkpoint`` strictly and computes ``expected`` (default: ``model``'s outputs)."""
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    plain = spec.make()
    plain.load_state_dict(state, strict=True)
    batch = spec.first_batch()
    model.eval(), plain.eval()
    with torch.no_grad():
        want = spec.run(model, batch) if expected is None else expected
        torch.testing.assert_close(spec.run(plain, batch), want, rtol=1e-5, atol=1e-6)


def check_fit_and_resume(case: AlgorithmCase, root: Path, spec: HarnessModel = NET) -> None:
    """Exact density, strict-loading checkpoint and bit-exact resume."""
    final = FinalOutput(spec)
    model, callback, messages = _fit_recording(case, root / "full", extra_callbacks=(final,), spec=spec)
    check_asked_or_warned(model, callback, EPOCHS * BATCHES_PER_EPOCH, messages)
    check_exact_density(model, callback, EPOCHS * BATCHES_PER_EPOCH)
    if callback.hard_mask:  # dense-weight algorithms checkpoint dense weights until they bake at the end
        check_strict_checkpoint(model, root / "full" / f"epoch={EPOCHS - 1}.ckpt", spec=spec)
    check_strict_checkpoint(model, root / "full" / "final.ckpt", expected=final.output, spec=spec)
    resumed, resumed_callback = fit(case, root / "resumed", ckpt_path=str(root / "full" / "epoch=0.ckpt"), spec=spec)
    for name, mask in callback.masks.masks.items():
        assert torch.equal(mask, resumed_callback.masks.masks[name]), f"mask of {name} differs after resume"
    for (name, p), (_, q) in zip(model.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs after resume: max diff {(p - q).abs().max()}"


SHORT_RUN = re.compile(r"density (\d[\d.e-]*) reached, (\d[\d.e-]*) asked")
REFUSED = "not to resume"


class StopAfterEpoch(Callback):
    """An early stop: ``trainer.should_stop`` at the end of epoch ``epoch``, as ``EarlyStopping`` sets it."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _fit_recording(*args, **kwargs) -> tuple[nn.Module, SparsityCallback, list[str]]:
    """:func:`fit`, and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, callback = fit(*args, **kwargs)
    return model, callback, [str(w.message) for w in caught]


def reaches_final_density(model: nn.Module, callback: SparsityCallback, step: int) -> bool:
    """Whether every target holds exactly its final budget (and its weights are zero outside the mask)."""
    if abs(callback.target_density(step) - callback.final_density) > 1e-12:
        return False
    try:
        check_exact_density(model, callback, step)
    except AssertionError:
        return False
    return True


class KeptPerStep(Callback):
    """The weights each target's mask keeps, at every step: before each batch (the masks of the last optimizer step)
    and at train end (before the sparsity callbacks' own train-end work: add it first)."""

    def __init__(self) -> None:
        self.kept: dict[int, dict[str, int]] = {}

    def _record(self, trainer: pl.Trainer) -> None:
        masks = sparsity_callback(trainer.callbacks).masks.masks
        self.kept[trainer.global_step] = {name: int(mask.sum()) for name, mask in masks.items()}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._record(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)


def final_budgets(callback: SparsityCallback) -> dict[str, int]:
    """The weights each target keeps at the final density (``"total"`` only, under a global budget)."""
    densities = callback.layer_densities(callback.schedule_end)
    if callback.distribution == "global":
        total = sum(m.numel() for m in callback.masks.masks.values())
        group = callback.pattern.rows * callback.pattern.cols if isinstance(callback.pattern, Blocks) else 1
        return {"total": round(callback.final_density * total / group) * group}
    return {name: expected_kept(callback, name, densities[name]) for name in callback.masks.masks}


def check_asked_or_warned(model: nn.Module, callback: SparsityCallback, step: int, messages: list[str]) -> None:
    """The run ended at the density asked, or one of ``messages`` (its warnings) gives the density reached and the
    one asked."""
    if reaches_final_density(model, callback, step):
        return
    numbers = [match.groups() for match in map(SHORT_RUN.search, messages) if match]
    reached, asked = callback.masks.global_density(), callback.final_density
    assert any(abs(float(r) - reached) < 1e-3 and abs(float(a) - asked) < 1e-3 for r, a in numbers), (
        f"the run ended at density {reached:.4g}, not the {asked} asked, without a warning that gives both: {messages}")


def check_final_density(case: AlgorithmCase, root: Path, spec: HarnessModel = NET) -> None:
    """The masks hold the final density from the schedule's end step on, and at the end of the run, without a
    warning, although ``update_every`` (when the case has one that matters, > 1) does not divide that step."""
    kept = KeptPerStep()
    model, callback, messages = _fit_recording(case, root, extra_callbacks=(kept,), spec=spec)
    step, end, every = EPOCHS * BATCHES_PER_EPOCH, callback.schedule_end, callback.update_every
    assert end <= step, f"the case's schedule ends at step {end}, after the run's last step {step}"
    if end > 0 and isinstance(every, int) and every > 1:
        assert end % every, f"the case's update_every={every} divides its schedule's end step {end}"
    want = final_budgets(callback)
    pooled = "total" in want or getattr(callback, "redistribution", None)  # counts move between layers
    for at in range(end, step + 1):
        counts = {"total": sum(kept.kept[at].values())} if pooled else kept.kept[at]
        want_at = {"total": sum(want.values())} if pooled else want
        assert counts == want_at, f"{case.name}: at step {at} (the schedule ends at {end}) the masks keep {counts}, " \
                                  f"not {want_at}"
    assert reaches_final_density(model, callback, step), (
        f"{case.name}: density {callback.masks.global_density():.4g} at the end, {callback.final_density} asked")
    short = [m for m in messages if SHORT_RUN.search(m)]
    assert not short, f"{case.name} reached its density but warned: {short}"


def _assert_same_run(a: tuple[nn.Module, SparsityCallback], b: tuple[nn.Module, SparsityCallback], what: str) -> None:
    (model_a, callback_a), (model_b, callback_b) = a, b
    for name, mask in callback_a.masks.masks.items():
        assert torch.equal(mask, callback_b.masks.masks[name]), f"mask of {name} differs {what}"
    for (name, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs {what}: max diff {(p - q).abs().max()}"


def _resume_or_refusal(case: AlgorithmCase, root: Path, ckpt: Path, spec: HarnessModel, **kwargs):
    """The resumed run, or None when the checkpoint is refused with a message that says why."""
    try:
        return fit(case, root, ckpt_path=str(ckpt), spec=spec, **kwargs)
    except ValueError as err:
        assert REFUSED in str(err), f"resuming from {ckpt.name} failed without saying why: {err}"
        return None


def check_resume_after_fit(case: AlgorithmCase, root: Path, spec: HarnessModel = NET) -> None:
    """``save_checkpoint`` after ``fit`` returned and after an early stop resumes exactly, or is refused.

    * early stop: stopped after epoch 1 of 2, ``final.ckpt`` resumed to epoch 2 equals the uninterrupted run; the
      stopped run warned with both densities if it ended short of its density;
    * after fit: ``final.ckpt`` (saved after ``fit`` returned) resumed for one more epoch equals ``epoch=1.ckpt``
      (saved during fit, at the same step) resumed for one more epoch.
    """
    full = fit(case, root / "full", spec=spec)
    stopped_model, stopped, messages = _fit_recording(case, root / "stopped", extra_callbacks=(StopAfterEpoch(0),),
                                                      spec=spec)
    check_asked_or_warned(stopped_model, stopped, BATCHES_PER_EPOCH, messages)
    resumed = _resume_or_refusal(case, root / "resumed", root / "stopped" / "final.ckpt", spec)
    if resumed is not None:
        _assert_same_run(full, resumed, "after resuming from a checkpoint saved after an early stop")
    after_fit = _resume_or_refusal(case, root / "after", root / "full" / "final.ckpt", spec, epochs=EPOCHS + 1)
    if after_fit is not None:
        during_fit = fit(case, root / "during", ckpt_path=str(root / "full" / f"epoch={EPOCHS - 1}.ckpt"), spec=spec,
                         epochs=EPOCHS + 1)
        _assert_same_run(during_fit, after_fit, "resuming from the checkpoint saved after fit")


class _DumpMasks(Callback):
    def __init__(self, root: Path) -> None:
        self.root = root

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = sparsity_callback(trainer.callbacks)
        state = {"masks": callback.masks.masks, "weights": pl_module.state_dict()}
        torch.save(state, self.root / f"rank{trainer.global_rank}.pt")


def check_ddp(case: AlgorithmCase, root: Path, spec: HarnessModel = NET) -> None:
    """Masks and weights identical on 2 CPU ranks."""
    model, callbacks = spec.make(), [*case.make_callbacks(), _DumpMasks(root)]
    trainer = pl.Trainer(
        max_epochs=EPOCHS, callbacks=callbacks, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
    )
    trainer.fit(model, spec.data())
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["masks"], "no masks were recorded"
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), f"mask of {name} differs between ranks"
        assert not mask.all(), f"{name} was never pruned under DDP"
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"{name} differs between ranks"


def check_pickle(case: AlgorithmCase) -> None:
    for callback in case.make_callbacks():
        clone = pickle.loads(pickle.dumps(callback))
        assert type(clone) is type(callback) and clone.state_key == callback.state_key


def check_yaml(case: AlgorithmCase) -> None:
    """The YAML config builds callbacks equal (type and state key) to ``make_callbacks``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_string(yaml.safe_dump({"callbacks": case.yaml_config}))
    instantiate = getattr(parser, "instantiate", parser.instantiate_classes)  # renamed in jsonargparse 4.49
    built = instantiate(config).callbacks
    expected = case.make_callbacks()
    assert [type(cb) for cb in built] == [type(cb) for cb in expected]
    assert [getattr(cb, "state_key", None) for cb in built] == [getattr(cb, "state_key", None) for cb in expected]
