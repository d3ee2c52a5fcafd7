"""Shareable models: ``save_pretrained`` / ``from_pretrained`` (model.safetensors + config.json) and
``fastflow export``; configs checked key by key, weight mismatches named briefly, writes atomic."""

from __future__ import annotations

import errno
import json
import os

import pytest
import safetensors.torch
import torch

import fastflow
from fastflow.checkpoint import load_pretrained, save_checkpoint, save_pretrained
from fastflow.cli import main
from fastflow.models import NICE, NSF, FlowModel, Glow, RealNVP
from tests.helpers import edit_pretrained_config, perturb_parameters

MODELS = {
    "Glow": lambda: Glow(1, 4, levels=1, steps=1, hidden=8, n_bins=17),
    "RealNVP": lambda: RealNVP(1, 4, scales=2, hidden=8),
    "NICE": lambda: NICE(1, 4, couplings=2, hidden=8, depth=1),
}


def _trained(name: str = "Glow") -> FlowModel:
    model = MODELS[name]().train()
    model.log_prob(torch.rand(8, 1, 4, 4) - 0.5)  # initialises ActNorm
    perturb_parameters(model)
    return model.eval()


def _edit_config(directory, **changes) -> None:
    meta = json.loads((directory / "config.json").read_text())
    meta["config"].update(changes)
    (directory / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_pretrained_round_trip(tmp_path, name):
    model = _trained(name)
    model.save_pretrained(tmp_path / "shared")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "shared" / "config.json").read_text())
    assert meta["model_class"] == name and meta["fastflow_version"] == fastflow.__version__
    assert meta["config"]["image_size"] == [4, 4], "tuples are stored as JSON lists"
    for loader in (FlowModel.from_pretrained, type(model).from_pretrained):
        loaded = loader(tmp_path / "shared").eval()
        assert type(loaded) is type(model) and loaded.config == model.config
        x = torch.rand(3, 1, 4, 4) - 0.5
        torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=0)
        assert all(bool(m.initialized) for m in loaded.modules() if hasattr(m, "initialized"))


def test_from_pretrained_on_a_subclass_refuses_another_class(tmp_path):
    _trained("RealNVP").save_pretrained(tmp_path / "nvp")
    with pytest.raises(ValueError, match="nvp'? holds a RealNVP, not a Glow"):
        Glow.from_pretrained(tmp_path / "nvp")
    assert isinstance(RealNVP.from_pretrained(tmp_path / "nvp"), RealNVP)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"bogus": 1}, "config key 'bogus' is not an argument of Glow"),
        ({"hidden": 8.5}, "config key 'hidden' of Glow must be int, got 8.5"),
        ({"lu": "yes"}, "config key 'lu' of Glow must be bool"),
        ({"scale": "softplus"}, "config key 'scale' of Glow must be"),
    ],
)
def test_bad_config_json_names_the_key(tmp_path, changes, named):
    _trained().save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match="config.json") as info:
        FlowModel.from_pretrained(tmp_path)
    assert named in str(info.value)


def test_unreadable_or_foreign_config_json_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        FlowModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        FlowModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_class": "Pickle", "config": {}}))
    with pytest.raises(ValueError, match="unknown model class 'Pickle'"):
        FlowModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Glow"]}))
    with pytest.raises(ValueError, match="not a fastflow config"):
        FlowModel.from_pretrained(tmp_path)


def test_weights_of_another_architecture_name_only_the_differing_keys(tmp_path):
    _trained().save_pretrained(tmp_path)
    edit_pretrained_config(tmp_path, saved_with=False, steps=3)  # weights without a stored config: the old format
    with pytest.raises(ValueError, match="model.safetensors") as info:
        FlowModel.from_pretrained(tmp_path)
    message = str(info.value)
    assert "do not match the Glow architecture" in message and "missing" in message and "more" in message
    assert "unexpected" not in message and len(message) < 700, message
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors' is not a safetensors file"):
        FlowModel.from_pretrained(tmp_path)


def test_save_pretrained_handles_shared_and_strided_tensors(tmp_path, monkeypatch):
    model = _trained()
    base = torch.arange(12.0)
    tensors = {"a": base, "b": base, "c": base.reshape(3, 4).t(), "d": base[2:5]}
    monkeypatch.setattr(model, "state_dict", lambda: tensors)
    save_pretrained(tmp_path, model)  # safetensors alone refuses shared storage
    loaded = safetensors.torch.load_file(tmp_path / "model.safetensors")
    for key, value in tensors.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_disk_full_keeps_the_previous_export(tmp_path, monkeypatch):
    model = _trained()
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="model.safetensors.*No space left") as info:
        perturb_parameters(model)
        model.save_pretrained(tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_export_writes_a_loadable_folder(tmp_path, capsys):
    model = _trained()
    save_checkpoint(tmp_path / "ckpt.pt", model, torch.optim.Adam(model.parameters()), step=3)
    out = tmp_path / "shared"
    assert main(["export", str(tmp_path / "ckpt.pt"), str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}/model.safetensors and {out}/config.json"
    loaded = Glow.from_pretrained(out).eval()
    x = torch.rand(2, 1, 4, 4) - 0.5
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=0)


def test_cli_export_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.pt" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_from_pretrained_on_cuda(tmp_path):
    _trained().save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, map_location="cuda")
    assert all(p.is_cuda for p in model.parameters())


def test_a_folder_mixing_two_saves_is_refused(tmp_path, monkeypatch):
    """save_pretrained writes the weights, then config.json: stopped between the two, the folder paired the new
    weights with the old config, and a model of the same shapes (here another scale and n_bins) loaded silently
    as the wrong one (a review: 9.6 bits/dim instead of 6.4)."""
    import fastflow.checkpoint as checkpoint

    old = Glow(1, 8, levels=2, steps=2, hidden=8, n_bins=256)
    new = Glow(1, 8, levels=2, steps=2, hidden=8, n_bins=32, scale="exp")
    old.save_pretrained(tmp_path)
    write = checkpoint.atomic_file

    def stop_before_the_config(path):
        if str(path).endswith("config.json"):
            raise KeyboardInterrupt
        return write(path)

    monkeypatch.setattr(checkpoint, "atomic_file", stop_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match="config.json' does not match the config .*model.safetensors' was saved with"
    ) as info:
        FlowModel.from_pretrained(tmp_path)
    assert "n_bins: 32 with the weights, 256 in config.json" in str(info.value)
    assert "scale: 'exp' with the weights, 'sigmoid' in config.json" in str(info.value)
    monkeypatch.setattr(checkpoint, "atomic_file", write)
    new.save_pretrained(tmp_path)  # saved again whole, it loads
    assert FlowModel.from_pretrained(tmp_path).config == new.config


def test_a_folder_whose_weights_store_no_config_still_loads(tmp_path):
    """Folders written before the weights stored their config load as before."""
    model = _trained()
    model.save_pretrained(tmp_path)
    edit_pretrained_config(tmp_path, saved_with=False)
    x = torch.rand(3, 1, 4, 4) - 0.5
    torch.testing.assert_close(FlowModel.from_pretrained(tmp_path).eval().log_prob(x), model.log_prob(x))


@pytest.mark.parametrize(
    ("weights", "named"),
    [
        (None, "cannot read .*model.safetensors': No such file or directory"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 84097405\n", "is a Git LFS pointer"),
        ("cut", "model.safetensors' is truncated: its header declares"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "not a safetensors file, or is corrupt"),
    ],
    ids=["missing", "lfs-pointer", "truncated", "bad-header"],
)
def test_missing_or_broken_weights_are_named_before_the_model_is_built(tmp_path, monkeypatch, weights, named):
    """The model was built before the weights were read, with a budget from the file's size: for weights over
    16 MiB a missing, truncated or Git LFS placeholder file was reported as a bad config.json."""
    import fastflow.checkpoint as checkpoint

    Glow(1, 4, levels=1, steps=1, hidden=8).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    if weights is None:
        path.unlink()
    elif weights == "cut":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_bytes(weights)
    built = []
    monkeypatch.setattr(checkpoint, "build_model", lambda *args: built.append(args))
    with pytest.raises(ValueError, match=named):
        FlowModel.from_pretrained(tmp_path)
    assert built == []


@pytest.mark.parametrize(
    ("make", "edit"),
    [
        (lambda: Glow(1, 32, levels=2, steps=1, hidden=8), lambda config: config.pop("image_size")),  # the default
        (lambda: Glow(1, 4, levels=1, steps=1, hidden=8), lambda config: config.update(image_size=4)),  # [4, 4]
        (lambda: NSF(3, transforms=1, hidden=8), lambda config: config.update(bound=int(config["bound"]))),  # 3.0
    ],
    ids=["default-left-out", "int-for-pair", "int-for-float"],
)
def test_a_config_json_edited_to_the_same_model_still_loads(tmp_path, make, edit):
    """The weights' stored config is compared with the model config.json builds, not with its text: a key left
    to its default, 4 for [4, 4] or 3 for 3.0 are the same model (they were refused as 'two saves')."""
    model = make()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    edit(meta["config"])
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert FlowModel.from_pretrained(tmp_path).config == model.config
