import importlib.util
import math
import sys

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_sparse.data import PythonSourceDataModule
from lightning_sparse.models import HFCausalLM
from lightning_sparse.models import hf as hf_module

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason='needs the [hf] extra: pip install "lightning-sparse[hf]"'
)

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 256}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 256,
    "max_position_embeddings": 64,
}
CONFIGS = pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])


def tiny(config=None, seed=0, **kwargs) -> HFCausalLM:
    torch.manual_seed(seed)
    return HFCausalLM(config=GPT2 if config is None else config, **kwargs)


def test_imports_without_transformers_and_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    spec = importlib.util.spec_from_file_location("_hf_without_transformers", hf_module.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the module itself imports without transformers
    for cls in (module.HFCausalLM, HFCausalLM):
        with pytest.raises(ImportError, match=r'pip install "lightning-sparse\[hf\]"'):
            cls(config=GPT2)


@needs_transformers
@CONFIGS
def test_builds_the_model_in_init(config):
    import transformers

    model = tiny(config)
    assert isinstance(model.model, transformers.PreTrainedModel) and model.hf_model is model.model
    assert model.hf_model.config.model_type == config["model_type"] and model.hf_model.config.vocab_size == 256
    assert model.get_output_embeddings() is model.hf_model.get_output_embeddings()
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    assert model.hparams.config == config and model.hparams.pretrained is None
    assert model(torch.randint(0, 256, (3, 10))).shape == (3, 10, 256)


@needs_transformers
@pytest.mark.parametrize(
    ("config_class", "config", "expected"),
    [
        ("LlamaConfig", {k: v for k, v in LLAMA.items() if k != "model_type"}, "LlamaForCausalLM"),
        ("GPT2Config", GPT2, "GPT2LMHeadModel"),  # a model_type that matches the class is allowed
    ],
)
def test_config_class(config_class, config, expected):
    model = HFCausalLM(config=config, config_class=config_class)
    assert type(model.hf_model).__name__ == expected
    assert type(model.hf_model.config).__name__ == config_class
    assert model.hf_model.config.vocab_size == 256


@needs_transformers
@CONFIGS
def test_dict_and_tuple_batches_give_the_same_loss(config):
    model = tiny(config).eval()  # no dropout
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        pair, n_pair = model._loss((ids[:, :-1], ids[:, 1:]))
        plain, n_plain = model._loss({"input_ids": ids})
        full, n_full = model._loss({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)})
    assert n_pair == n_plain == n_full == 2 * 12
    torch.testing.assert_close(plain, pair)
    torch.testing.assert_close(full, pair)


@needs_transformers
def test_forward_takes_a_dict_batch():
    model = tiny().eval()
    ids = torch.randint(0, 256, (2, 9))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(model(**batch), logits)  # labels are ignored
        torch.testing.assert_close(model(batch), logits)  # what SparseGPT's default calibration forward calls


@needs_transformers
def test_padding_and_ignored_labels_are_not_scored():
    model = tiny(LLAMA).eval()
    ids = torch.randint(0, 256, (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], dim=1).long()
    labels = padded.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected, _ = model._loss({"input_ids": ids})
        from_mask, n_mask = model._loss({"input_ids": padded, "attention_mask": mask})
        from_labels, n_labels = model._loss({"input_ids": padded, "labels": labels})
        pair, n_pair = model._loss((padded[:, :-1], labels[:, 1:]))
    assert n_mask == n_labels == n_pair == 11
    for loss in (from_mask, from_labels, pair):
        torch.testing.assert_close(loss, expected)


@needs_transformers
@CONFIGS
def test_from_pretrained_reproduces_the_logits(config, tmp_path):
    model = tiny(config).eval()
    model.hf_model.save_pretrained(tmp_path)
    loaded = HFCausalLM(pretrained=str(tmp_path)).eval()
    assert loaded.hparams.pretrained == str(tmp_path) and loaded.hparams.config is None
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@needs_transformers
@CONFIGS
def test_fit_lowers_the_loss_and_logs_perplexity(config, python_source, fast_trainer):
    model = tiny(config, lr=3e-3, warmup_steps=2)
    trainer = fast_trainer(
        fast_dev_run=False, max_steps=12, limit_train_batches=12, limit_val_batches=2, limit_test_batches=2
    )
    before = trainer.validate(model, datamodule=python_source, verbose=False)[0]
    trainer.fit(model, datamodule=python_source)
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_ppl"} <= set(metrics)
    assert math.isclose(metrics["val_ppl"].item(), math.exp(metrics["val_loss"].item()), rel_tol=1e-4)
    assert metrics["val_loss"] < before["val_loss"] - 0.5, (before, metrics)
    results = trainer.test(model, datamodule=python_source, verbose=False)[0]
    assert set(results) == {"test_loss", "test_ppl"}
    assert math.isclose(results["test_ppl"], math.exp(results["test_loss"]), rel_tol=1e-4)


@needs_transformers
def test_configure_optimizers_decays_matrices_only_and_warms_up():
    model = tiny(lr=1e-2, weight_decay=0.05, warmup_steps=4, betas=(0.8, 0.9))
    setup = model.configure_optimizers()
    opt, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and setup["lr_scheduler"]["interval"] == "step"
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.8, 0.9)
    assert decay["params"] and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["params"] and all(p.ndim < 2 for p in no_decay["params"])
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter once (the head is tied)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


@needs_transformers
def test_no_warmup_is_a_constant_rate():
    setup = tiny().configure_optimizers()
    assert setup["optimizer"].param_groups[0]["lr"] == 3e-4 and setup["lr_scheduler"]["scheduler"].lr_lambdas[0](0) == 1


@needs_transformers
def test_lightning_cli_builds_it_from_yaml(tmp_path, monkeypatch):
    import yaml

    path = tmp_path / "hf.yaml"
    model = {"class_path": "lightning_sparse.models.HFCausalLM", "init_args": {"config": LLAMA, "warmup_steps": 10}}
    data = {"class_path": "lightning_sparse.data.PythonSourceDataModule", "init_args": {"block_size": 16}}
    path.write_text(yaml.safe_dump({"model": model, "data": data}))
    monkeypatch.setattr(sys, "argv", ["lightning-sparse"])
    cli = LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(path), "--model.init_args.lr=0.001", "--model.init_args.betas=[0.9, 0.99]"],
        save_config_callback=None,
    )
    assert isinstance(cli.model, HFCausalLM) and isinstance(cli.datamodule, PythonSourceDataModule)
    assert type(cli.model.hf_model).__name__ == "LlamaForCausalLM" and cli.model.hf_model.config.num_hidden_layers == 2
    assert cli.model.hparams.lr == 1e-3 and tuple(cli.model.hparams.betas) == (0.9, 0.99)


@needs_transformers
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"exactly one of config \(or config_class\) and pretrained must be given, got config=None"),
        ({"config": GPT2, "pretrained": "folder"}, "exactly one of config .* and pretrained must be given"),
        ({"config_class": "GPT2Config", "pretrained": "folder"}, "exactly one of config .* and pretrained"),
        ({"config": {"model_type": "nope"}}, "config\\['model_type'\\] must be a transformers model type .*'nope'"),
        ({"config": {"n_embd": 32}}, r"config must have a 'model_type' key .* got keys \['n_embd'\]"),
        ({"config": {"model_type": "vit"}}, "model_type 'vit' has no causal language model in transformers"),
        ({"config_class": "NopeConfig"}, "config_class must name a transformers config class .* got 'NopeConfig'"),
        ({"config_class": "AutoModel"}, "config_class must name a transformers config class .* got 'AutoModel'"),
        ({"config": GPT2, "config_class": "LlamaConfig"}, r"must match config_class='LlamaConfig' .* got 'gpt2'"),
        ({"config": [("model_type", "gpt2")]}, "config must be a dict of config fields, got list"),
        ({"config": GPT2, "warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
        ({"config": GPT2, "warmup_steps": 1.5}, "warmup_steps must be an integer >= 0, got 1.5"),
        ({"config": GPT2, "lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"config": GPT2, "lr": -1.0}, "lr must be > 0, got -1.0"),
        ({"config": GPT2, "weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
        ({"config": GPT2, "betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
        ({"config": GPT2, "betas": (0.9,)}, r"betas must be two numbers in \[0, 1\)"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HFCausalLM(**kwargs)


@needs_transformers
def test_pretrained_must_be_a_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained must be a local folder .* got '.*missing'"):
        HFCausalLM(pretrained=str(tmp_path / "missing"))


@needs_transformers
def test_unknown_config_fields_warn():
    with pytest.warns(UserWarning, match=r"config fields \['n_embed'\] are not fields of GPT2Config"):
        HFCausalLM(config={**GPT2, "n_embed": 64})


@needs_transformers
@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"labels": torch.zeros(1, 4, dtype=torch.long)}, r"a dict batch must have an 'input_ids' key, got keys"),
        ((torch.zeros(1, 4, dtype=torch.long),), r"batch must be an \(input_ids, targets\) pair or a dict"),
    ],
)
def test_invalid_batches(batch, match):
    with pytest.raises(ValueError, match=match):
        tiny().training_step(batch, 0)
