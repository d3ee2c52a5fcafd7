"""Checkpoints: exact round trip, architecture mismatch named, atomic writes, no code run from the file."""

from __future__ import annotations

import enum
import errno
import os
import pickle
import shlex
import stat
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch

from fastflow.checkpoint import build_model, load_checkpoint, load_pretrained, save_checkpoint, save_pretrained
from fastflow.cli import main
from fastflow.models import Glow, RealNVP, TabularFlow
from fastflow.train import TrainConfig
from tests.helpers import edit_pretrained_config, perturb_parameters


def _trained_glow() -> Glow:
    model = Glow(1, 4, levels=2, steps=2, hidden=8, n_bins=17).train()
    model.log_prob(torch.rand(8, 1, 4, 4) - 0.5)
    perturb_parameters(model)
    return model.eval()


def test_round_trip_restores_outputs_and_optimizer(tmp_path):
    model = _trained_glow()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.log_prob(torch.rand(4, 1, 4, 4) - 0.5).mean().backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer, step=7)
    loaded, payload = load_checkpoint(path)
    assert isinstance(loaded, Glow) and payload["extra"] == {"step": 7}
    loaded.eval()
    x = torch.rand(3, 1, 4, 4) - 0.5
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    assert all(bool(m.initialized) for m in loaded.modules() if hasattr(m, "initialized"))
    assert payload["optimizer"]["state"], "optimizer state must be saved"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "no temporary file may be left behind"


def test_weights_saved_with_two_lu_matrices_load(tmp_path):
    """A checkpoint written before the LU factors were packed (``lower``, ``upper`` and ``log_s`` per 1x1
    convolution)."""
    model = _trained_glow()
    path = tmp_path / "old.pt"
    save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    old = {}
    for key, value in payload["state_dict"].items():
        if key.endswith("lu_packed"):
            prefix = key[: -len("lu_packed")]
            old[prefix + "lower"], old[prefix + "upper"] = torch.tril(value, -1), torch.triu(value, 1)
            old[prefix + "log_s"] = torch.diagonal(value).clone()
        else:
            old[key] = value
    assert any(key.endswith("lower") for key in old)
    payload["state_dict"] = old
    torch.save(payload, path)
    loaded, _ = load_checkpoint(path)
    x = torch.rand(3, 1, 4, 4) - 0.5
    torch.testing.assert_close(loaded.eval().log_prob(x), model.log_prob(x), rtol=0, atol=0)


def test_loading_into_a_different_architecture_names_the_file(tmp_path):
    path = tmp_path / "glow.pt"
    save_checkpoint(path, _trained_glow())
    with pytest.raises(ValueError, match="glow.pt.*does not match"):
        load_checkpoint(path, RealNVP(1, 4, scales=2, hidden=8))
    with pytest.raises(ValueError, match="glow.pt.*does not match"):
        load_checkpoint(path, Glow(1, 4, levels=2, steps=3, hidden=8, n_bins=17))


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model = _trained_glow()
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()

    def killed_mid_write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


class _RunsCode:
    """Pickles as a call of ``func(arg)``: what a crafted checkpoint does to run code when unpickled."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _malicious_file(path, marker, how: str) -> None:
    if how == "os.system":
        evil = _RunsCode(os.system, f"touch {shlex.quote(str(marker))}")
    else:
        evil = _RunsCode(exec, f"open({str(marker)!r}, 'w').close()")
    payload = {"model_class": "Glow", "config": {}, "state_dict": evil, "optimizer": None, "extra": {}}
    if how.startswith("pickle"):
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(how[-1]))
    else:
        torch.save(payload, path)


@pytest.mark.skipif(os.name != "posix", reason="the os.system payload uses touch")
@pytest.mark.parametrize("how", ["os.system", "exec", "pickle2", "pickle4"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    _malicious_file(path, marker, how)
    with pytest.raises(ValueError, match="evil.pt.* not a safe fastflow checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    assert not marker.exists(), "the checkpoint's code ran"
    # The file really is malicious: unsafe unpickling runs it.
    with open(path, "rb") as f:
        if how.startswith("pickle"):
            pickle.load(f)
        else:
            torch.load(f, weights_only=False)
    assert marker.exists()


def test_a_crafted_global_name_reaches_the_message_escaped(tmp_path):
    """The name a pickle would call was printed raw: escape codes in it cleared the user's terminal."""
    path = tmp_path / "esc.pt"
    path.write_bytes(b"\x80\x02cos\x1b[2J\x1b[31m\nsystem\nq\x00.")
    with pytest.raises(ValueError, match="esc.pt.* not a safe fastflow checkpoint") as info:
        load_checkpoint(path)
    assert "\x1b" not in str(info.value) and "os\\x1b[2J" in str(info.value)


def test_cli_sample_of_a_malicious_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    path, marker, out = tmp_path / "evil.pt", tmp_path / "pwned", tmp_path / "samples.png"
    _malicious_file(path, marker, "exec")
    assert main(["sample", str(path), "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evil.pt" in err[0] and "not a safe fastflow checkpoint" in err[0], err
    assert not marker.exists() and not out.exists()


def test_training_extras_round_trip_under_weights_only(tmp_path):
    model = _trained_glow()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    extra = {
        "step": 3,
        "scaler": scaler.state_dict(),
        "train_config": asdict(TrainConfig(steps=5, amp="fp16", out="runs/x")),
        "heldout_bits_per_dim": 1.5,
        "rng": torch.random.get_rng_state(),
        "history": [1.0, 2.0],
    }
    save_checkpoint(tmp_path / "ckpt.pt", model, torch.optim.Adam(model.parameters()), **extra)
    torch.load(tmp_path / "ckpt.pt", weights_only=True)  # the same load as load_checkpoint's, with no fallback
    _, payload = load_checkpoint(tmp_path / "ckpt.pt")
    assert torch.equal(payload["extra"].pop("rng"), extra.pop("rng")) and payload["extra"] == extra


class _Level(enum.IntEnum):
    HIGH = 2


class _TensorKind(torch.Tensor):
    """A tensor subclass: weights-only loading refuses it."""


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"stats": {"mean": _RunsCode(print, "x")}}, r"extra 'stats'\['mean'\] is a .*_RunsCode"),
        ({"bpd": np.float64(1.5)}, r"extra 'bpd' is a numpy.float64"),  # a float subclass: would not load back
        ({"level": _Level.HIGH}, r"extra 'level' is a .*_Level"),
        ({"v": frozenset({1})}, r"extra 'v' is a builtins.frozenset"),
        ({"t": {"w": torch.ones(2).as_subclass(_TensorKind)}}, r"extra 't'\['w'\] is a .*_TensorKind"),
    ],
)
def test_extras_that_would_not_load_are_refused_before_writing(tmp_path, extra, named):
    with pytest.raises(TypeError, match=named):
        save_checkpoint(tmp_path / "ckpt.pt", _trained_glow(), **extra)
    assert list(tmp_path.iterdir()) == []


def _write_payload(path, **changes):
    model = Glow(1, 4, levels=1, steps=1, hidden=8)
    payload = {"model_class": "Glow", "config": dict(model.config), "state_dict": model.state_dict()}
    payload.update(changes)
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("config_change", "named"),
    [
        ({"bogus": 1}, "config key 'bogus' is not an argument of Glow"),
        ({"levels": "1"}, "config key 'levels' of Glow must be int, got '1'"),
        ({"coupling": "quadratic"}, "config key 'coupling' of Glow must be"),
        ({"image_size": [4, 4, 4]}, "config key 'image_size'"),
        ({"steps": 0}, "invalid config for Glow: steps must be >= 1, got 0"),
        ({"hidden": -4}, "invalid config for Glow: hidden must be >= 1, got -4"),
        ({"num_classes": -2}, "invalid config for Glow: num_classes must be >= 0, got -2"),
    ],
)
def test_bad_config_names_the_key(tmp_path, config_change, named):
    path = tmp_path / "bad.pt"
    config = dict(Glow(1, 4, levels=1, steps=1, hidden=8).config, **config_change)
    _write_payload(path, config=config)
    with pytest.raises(ValueError, match="bad.pt") as info:
        load_checkpoint(path)
    assert named in str(info.value)


@pytest.mark.parametrize("fmt", ["checkpoint", "pretrained"])
def test_a_config_declaring_a_huge_model_is_refused_before_it_is_built(tmp_path, fmt, monkeypatch):
    """A config of a hundred bytes (hidden 8192 here; steps x hidden^2 at will) built the whole model before its
    weights were compared with it: gigabytes allocated, or the process killed. Building now stops at a few times
    the weights' bytes; what it allocated here is counted, and the real model stays far below the cap."""
    import fastflow.allocation_budget as budget

    seen: list[int] = []
    original = budget.AllocationBudget._add
    monkeypatch.setattr(budget.AllocationBudget, "_add", lambda self, n: (seen.append(n), original(self, n))[1])
    model = Glow(1, 4, levels=1, steps=1, hidden=8)
    path = tmp_path / ("glow.pt" if fmt == "checkpoint" else "glow")
    (save_checkpoint if fmt == "checkpoint" else save_pretrained)(path, model)
    load = load_checkpoint if fmt == "checkpoint" else load_pretrained
    load(path)  # the real config loads
    assert 0 < sum(seen) < budget.construction_budget(0)
    huge = dict(model.config, hidden=8192, steps=64)  # about 17 GB of weights declared
    if fmt == "checkpoint":
        _write_payload(path, config=huge)
    else:
        edit_pretrained_config(path, saved_with=True, **huge)  # both files crafted alike
    seen.clear()
    with pytest.raises(ValueError, match="building this Glow would allocate more than 64 MiB"):
        load(path)
    assert sum(seen) <= budget.construction_budget(0) + 8192 * 8192 * 4  # refused before its first large weight


def test_config_values_nested_deep_are_named_in_a_short_message(tmp_path):
    """A crafted value nested hundreds deep went whole into the message; a config.json nested deeper than JSON
    decodes raised RecursionError (the CLI's exit status 1 instead of 2), now that it is not valid JSON."""
    deep: object = 8
    for _ in range(300):  # deeper than torch.save can write
        deep = [deep]
    _write_payload(tmp_path / "deep.pt", config=dict(Glow(1, 4, levels=1, steps=1, hidden=8).config, image_size=deep))
    with pytest.raises(ValueError, match="deep.pt.*config key 'image_size' of Glow must be") as info:
        load_checkpoint(tmp_path / "deep.pt")
    assert len(str(info.value)) < 400
    save_pretrained(tmp_path / "shared", Glow(1, 4, levels=1, steps=1, hidden=8))
    (tmp_path / "shared" / "config.json").write_text('{"model_class": "Glow", "config": {"lu": ' + "[" * 100000)
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        load_pretrained(tmp_path / "shared")


def test_from_pretrained_of_a_checkpoint_file_points_to_load_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ck.pt", Glow(1, 4, levels=1, steps=1, hidden=8))
    with pytest.raises(ValueError, match="ck.pt' is a file, not a folder.*load_checkpoint"):  # was "Not a directory"
        Glow.from_pretrained(str(tmp_path / "ck.pt"))


def test_unknown_model_class_is_named(tmp_path):
    _write_payload(tmp_path / "bad.pt", model_class="os.system")
    with pytest.raises(ValueError, match="bad.pt.*unknown model class 'os.system'"):
        load_checkpoint(tmp_path / "bad.pt")


def test_architecture_mismatch_names_only_the_keys_that_differ(tmp_path):
    path = tmp_path / "glow.pt"
    save_checkpoint(path, _trained_glow())
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, Glow(1, 4, levels=2, steps=3, hidden=8, n_bins=17, reversible=True))
    message = str(info.value)
    assert "steps: 2 in the file, 3 in the model" in message
    for same in ("hidden", "levels", "n_bins", "in_channels", "reversible"):
        assert same not in message, message


def test_state_dict_mismatch_names_only_the_differing_parameters(tmp_path):
    model = Glow(1, 4, levels=1, steps=1, hidden=8)
    state = model.state_dict()
    names = list(state)
    removed = names[:8]
    for name in removed:
        del state[name]
    state["bogus.weight"] = torch.zeros(2)
    reshaped = names[-1]
    state[reshaped] = torch.zeros(*state[reshaped].shape, 2)
    path = tmp_path / "bad.pt"
    _write_payload(path, state_dict=state)
    with pytest.raises(ValueError, match="bad.pt") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "8 missing" in message and "and 3 more" in message and removed[0] in message and removed[-1] not in message
    assert "1 unexpected (bogus.weight)" in message and f"1 of another shape ({reshaped} " in message
    assert names[8] not in message and len(message) < 600, message


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_gets_the_mode_of_other_outputs(tmp_path, umask):
    """The pretrained folder's weights too: safetensors' ``save_file`` recreates its file 0600 (others could not
    read a model written to be shared, beside its 0644 config)."""
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "ckpt.pt", _trained_glow())
        save_pretrained(tmp_path / "shared", _trained_glow())
        (tmp_path / "other.txt").write_text("x")
    finally:
        os.umask(old)
    for written in ("ckpt.pt", "shared/model.safetensors", "shared/config.json"):
        assert stat.S_IMODE((tmp_path / written).stat().st_mode) == 0o666 & ~umask, written
        assert (tmp_path / written).stat().st_mode == (tmp_path / "other.txt").stat().st_mode, written


def test_disk_full_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model = _trained_glow()
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as info:
        save_checkpoint(path, model, step=2)
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


@pytest.mark.gpu
def test_built_model_moves_to_map_location(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", _trained_glow())
    model, payload = load_checkpoint(tmp_path / "ckpt.pt", map_location="cuda")
    assert all(p.is_cuda for p in model.parameters()) and payload["state_dict"]["prior.params"].is_cuda


@pytest.mark.parametrize(
    ("name", "config", "named"),
    [
        ("NICE", {"in_channels": 1, "image_size": 4, "couplings": -3}, "couplings must be >= 1, got -3"),
        ("NICE", {"in_channels": 0, "image_size": 4}, "in_channels must be >= 1, got 0"),
        ("NICE", {"in_channels": 1, "image_size": 4, "hidden": -4}, "hidden must be >= 1, got -4"),
        ("RealNVP", {"in_channels": -1, "image_size": 4}, "in_channels must be >= 1, got -1"),
    ],
)
def test_sizes_below_their_minimum_are_named(name, config, named):
    with pytest.raises(ValueError, match=f"invalid config for {name}: {named}"):
        build_model(name, config, "")


def test_malformed_weights_in_an_old_layout_name_the_file(tmp_path):
    model = Glow(1, 4, levels=1, steps=1, hidden=8)
    weights = model.state_dict()
    packed = next(k for k in weights if k.endswith("lu_packed"))
    weights[packed[: -len("lu_packed")] + "log_s"] = torch.zeros(5)  # beside a (4, 4) lu_packed
    _write_payload(tmp_path / "old.pt", state_dict=weights)
    with pytest.raises(ValueError, match=r"old.pt.*earlier layout that cannot be upgraded"):
        load_checkpoint(tmp_path / "old.pt")


def test_float64_weights_load_as_float64_in_both_formats(tmp_path):
    torch.manual_seed(0)
    model = TabularFlow(3, transforms=2, hidden=8).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    model.log_prob(x)  # ActNorm's initialisation
    perturb_parameters(model)
    model.eval()
    save_checkpoint(tmp_path / "ckpt.pt", model)
    save_pretrained(tmp_path / "shared", model)
    for loaded in (load_checkpoint(tmp_path / "ckpt.pt")[0], load_pretrained(tmp_path / "shared")):
        assert {p.dtype for p in loaded.parameters()} == {torch.float64}
        torch.testing.assert_close(loaded.eval().log_prob(x), model.log_prob(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ckpt.pt.*of another dtype \(.*torch.float64 in the file, torch.float32"):
        load_checkpoint(tmp_path / "ckpt.pt", TabularFlow(3, transforms=2, hidden=8))  # no silent conversion


def test_weights_of_a_non_float_dtype_are_refused(tmp_path):
    weights = Glow(1, 4, levels=1, steps=1, hidden=8).state_dict()
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key].to(torch.complex64)
    _write_payload(tmp_path / "complex.pt", state_dict=weights)
    with pytest.raises(ValueError, match=rf"complex.pt.*1 of another dtype \({key} torch.complex64 in the file"):
        load_checkpoint(tmp_path / "complex.pt")


@pytest.mark.parametrize("fmt", ["checkpoint", "pretrained"])
def test_float8_weights_are_refused_at_load_naming_the_dtype(tmp_path, fmt):
    """float8 weights were adopted as the model's dtype; the model then failed in its first op ("add_stub" not
    implemented for 'Float8_e5m2')."""
    model = Glow(1, 4, levels=1, steps=1, hidden=8).to(torch.float8_e5m2)
    path = tmp_path / ("f8.pt" if fmt == "checkpoint" else "f8")
    if fmt == "checkpoint":
        _write_payload(path, state_dict=model.state_dict())
    else:
        save_pretrained(path, model)
    with pytest.raises(ValueError, match="f8.*the weights are torch.float8_e5m2; models run in float16, bfloat16"):
        (load_checkpoint if fmt == "checkpoint" else load_pretrained)(path)


def test_a_map_location_this_machine_lacks_is_a_value_error_naming_it(tmp_path):
    """safetensors' own error (a RuntimeError, then a ValueError quoting it) spoke of pinned memory."""
    save_pretrained(tmp_path / "shared", Glow(1, 4, levels=1, steps=1, hidden=8))
    with pytest.raises(ValueError, match="map_location 'cuda:1000' is not available here"):
        load_pretrained(tmp_path / "shared", map_location="cuda:1000")


def test_a_truncated_checkpoint_is_called_truncated_or_corrupt(tmp_path):
    """torch reads a cut-off zip archive as OSError(22): the message was 'Invalid argument'."""
    save_checkpoint(tmp_path / "full.pt", _trained_glow())
    data = (tmp_path / "full.pt").read_bytes()
    for cut in (200, len(data) // 2, len(data) - 100):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.pt': it is truncated or corrupt"):
            load_checkpoint(tmp_path / "cut.pt")


class _MyGlow(Glow):
    """A user's subclass: a checkpoint names the class it is rebuilt as, so it would load back as another class."""


def test_compiled_and_data_parallel_models_save_the_model_inside(tmp_path):
    model = _trained_glow()
    x = torch.rand(3, 1, 4, 4) - 0.5
    for i, wrapped in enumerate(
        [torch.compile(model), torch.nn.DataParallel(model), torch.compile(torch.nn.DataParallel(model))]
    ):
        save_checkpoint(tmp_path / f"{i}.pt", wrapped)
        save_pretrained(tmp_path / f"shared{i}", wrapped)
        for loaded in (load_checkpoint(tmp_path / f"{i}.pt")[0], load_pretrained(tmp_path / f"shared{i}")):
            assert type(loaded) is Glow
            torch.testing.assert_close(loaded.eval().log_prob(x), model.log_prob(x), rtol=0, atol=0)


def test_a_subclass_of_a_model_is_refused_before_writing(tmp_path):
    model = _MyGlow(1, 4, levels=1, steps=1, hidden=8)
    with pytest.raises(TypeError, match=r"model must be a .*Glow.*not a subclass.*_MyGlow"):
        save_checkpoint(tmp_path / "ckpt.pt", torch.compile(model))
    with pytest.raises(TypeError, match=r"model must be a .*_MyGlow"):
        save_pretrained(tmp_path / "shared", model)
    with pytest.raises(TypeError, match=r"model must be a .*_MyGlow"):
        model.save_pretrained(tmp_path / "shared")
    assert list(tmp_path.iterdir()) == []


def _corrupt_lu_buffer(tmp_path, make, suffix, value):
    model = make()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith(suffix))
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], value)
    torch.save(payload, path)
    return path, key


@pytest.mark.parametrize(
    "make",
    [lambda: Glow(2, 4, levels=1, steps=1, hidden=8), lambda: TabularFlow(3, transforms=1, hidden=8)],
    ids=["InvConv1x1", "InvertibleLinear"],
)
@pytest.mark.parametrize(
    ("suffix", "value", "named"), [("perm", 0, "must be a permutation of range"), ("sign_s", 0.5, "must be all")]
)
def test_a_corrupt_lu_permutation_or_sign_is_refused(tmp_path, make, suffix, value, named):
    """A ``perm`` of zeros or a ``sign_s`` of 0.5 loaded, giving a finite but wrong log-density."""
    path, key = _corrupt_lu_buffer(tmp_path, make, suffix, value)
    with pytest.raises(ValueError, match=rf"ckpt.pt.*{key.replace('.', '[.]')} {named}"):
        load_checkpoint(path)


def test_a_made_mask_other_than_the_configs_is_refused(tmp_path):
    """A MADE's masks follow from the config; a crafted mask of ones loaded, and the model's log-density was finite
    and wrong (its Jacobian no longer triangular)."""
    from fastflow.models import NSF

    make = lambda: NSF(3, transforms=1, hidden=8, autoregressive=True)  # noqa: E731
    path, key = _corrupt_lu_buffer(tmp_path, make, ".mask", 1.0)
    with pytest.raises(ValueError, match=rf"ckpt.pt.*{key.replace('.', '[.]')} is not the autoregressive mask"):
        load_checkpoint(path)
    model = make()
    save_checkpoint(path, model)
    assert torch.equal(load_checkpoint(path)[0].state_dict()[key], model.state_dict()[key])  # its own mask loads


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        ("text.pt", b"hello world\n", "is not a PyTorch checkpoint: it does not start like one"),
        ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(32), "is not a PyTorch checkpoint: it does not start like one"),
        ("config.json", b'{"model_class": "Glow", "config": {}}', "shared model folder: .*from_pretrained"),
        ("weights.safetensors", None, "shared model folder: .*from_pretrained"),
        ("empty.pt", b"", "is not a PyTorch checkpoint: it is empty"),
        ("memo.pt", b"\x80\x02h\x05.", r"cannot read checkpoint .*memo.pt': KeyError: 5$"),
        ("folder", None, "is a folder, not a checkpoint file: .*FlowModel.from_pretrained"),
    ],
)
def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, name, content, named):
    path = tmp_path / name
    if name == "folder":
        save_pretrained(path, Glow(1, 4, levels=1, steps=1, hidden=8))
    elif content is None:
        save_pretrained(tmp_path, Glow(1, 4, levels=1, steps=1, hidden=8))
        (tmp_path / "model.safetensors").rename(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=named) as info:
        load_checkpoint(path)
    assert name in str(info.value) and "not a safe" not in str(info.value), "a file that is no pickle is not unsafe"


def test_a_flipped_bit_in_a_weight_is_refused_as_corrupt(tmp_path):
    """torch.load does not check the zip members' CRC-32: a flipped bit in a weight loaded silently (a review:
    log_prob off by 8.3)."""
    import zipfile

    save_checkpoint(tmp_path / "ckpt.pt", TabularFlow(4, transforms=2, hidden=8))
    data = bytearray((tmp_path / "ckpt.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "ckpt.pt") as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    local = info.header_offset  # the member's bytes follow its local header (30 bytes, its name and extra field)
    start = (
        local
        + 30
        + int.from_bytes(data[local + 26 : local + 28], "little")
        + int.from_bytes(data[local + 28 : local + 30], "little")
    )
    data[start + 3] ^= 0x40
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped.pt': it is corrupt \(the bytes of its member '.*data/0' fail"):
        load_checkpoint(tmp_path / "flipped.pt")


def test_a_checkpoint_saved_without_checksums_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) (documented: torch.load still reads the file) stores CRC 0 for
    every member: the checksum check called such a file corrupt."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch always writes checksums")
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint(tmp_path / "nocrc.pt", TabularFlow(4, transforms=2, hidden=8))
    finally:
        torch.serialization.set_crc32_options(True)
    load_checkpoint(tmp_path / "nocrc.pt")


def test_build_model_without_a_tensor_count_counts_no_operations():
    """build_model(name, config, source, weight_bytes), the call before the op count was added, built a Glow of
    32 steps; a default of 0 tensors capped it at 1,024 operations and refused it, blaming the config."""
    model = Glow(3, 32, levels=3, steps=32, hidden=8)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert isinstance(build_model("Glow", dict(model.config), "my.json", nbytes), Glow)


@pytest.mark.parametrize("fmt", ["checkpoint", "pretrained"])
def test_a_config_declaring_a_billion_tiny_layers_is_refused_at_once(tmp_path, fmt):
    """A one-element weight per layer: bytes alone tripped the budget after about 81,000 layers (minutes, and
    gigabytes of Python objects); the tensor operations are counted too."""
    import fastflow.allocation_budget as budget

    model = TabularFlow(4, transforms=2, hidden=8)
    huge = dict(model.config, transforms=10**9, hidden=1)
    path = tmp_path / ("flow.pt" if fmt == "checkpoint" else "flow")
    if fmt == "checkpoint":
        save_checkpoint(path, model)
        _write_payload(path, config=huge, model_class="TabularFlow", state_dict=model.state_dict())
    else:
        save_pretrained(path, model)
        edit_pretrained_config(path, saved_with=True, **huge)
    with pytest.raises(ValueError, match=r"building this TabularFlow would run more than \d+ tensor operations"):
        (load_checkpoint if fmt == "checkpoint" else load_pretrained)(path)
    assert budget.construction_ops(len(model.state_dict())) < 2000


def test_ops_allowed_cover_every_model_class_built_for_its_own_weights(tmp_path):
    """Every class builds within the operations its own weights allow, with 3x to spare at the per-tensor rate
    alone (these models are small enough for the slack to cover them whole); a model of thousands of operations
    loads in both formats (the loaders pass their tensor count: the slack alone is 1,024)."""
    from fastflow.allocation_budget import CONSTRUCTION_OPS_PER_TENSOR, AllocationBudget
    from fastflow.models import NICE, NSF, Jet

    for make in (
        lambda: Glow(3, 16, levels=2, steps=4, hidden=16, num_classes=10),
        lambda: RealNVP(3, 16, scales=2, hidden=8),
        lambda: NICE(1, 8),
        lambda: TabularFlow(5, context=3, transforms=3, hidden=8),
        lambda: NSF(3, transforms=2, autoregressive=True),
        lambda: NSF(4, context=2, transforms=2),
        lambda: Jet(3, 16, patch_size=4, couplings=2, width=16, depth=1, heads=2),
    ):
        tensors = len(make().state_dict())
        with AllocationBudget(2**40, None, "it") as budget:
            make()
        assert 0 < 3 * budget.ops <= CONSTRUCTION_OPS_PER_TENSOR * tensors
    model = Glow(1, 8, levels=3, steps=24, hidden=4)  # 943 tensors, about 2,300 operations
    save_checkpoint(tmp_path / "deep.pt", model)
    save_pretrained(tmp_path / "deep", model)
    assert load_checkpoint(tmp_path / "deep.pt")[0].config == load_pretrained(tmp_path / "deep").config == model.config


def test_loading_into_a_compiled_or_data_parallel_model_loads_the_model_inside(tmp_path):
    """save_checkpoint took wrapped models; load_checkpoint refused them ('holds a Glow, which does not match the
    OptimizedModule model')."""
    model = _trained_glow()
    save_checkpoint(tmp_path / "ckpt.pt", model)
    x = torch.rand(3, 1, 4, 4) - 0.5
    for wrapped in (torch.nn.DataParallel(Glow(1, 4, levels=2, steps=2, hidden=8, n_bins=17)),):
        load_checkpoint(tmp_path / "ckpt.pt", wrapped)
        torch.testing.assert_close(wrapped.module.eval().log_prob(x), model.log_prob(x), rtol=0, atol=0)
    fresh = Glow(1, 4, levels=2, steps=2, hidden=8, n_bins=17)
    loaded, _ = load_checkpoint(tmp_path / "ckpt.pt", torch.compile(fresh))
    assert loaded is fresh
    torch.testing.assert_close(fresh.eval().log_prob(x), model.log_prob(x), rtol=0, atol=0)


def test_a_missing_safetensors_path_is_called_missing(tmp_path):
    """Its name alone made it 'not a PyTorch checkpoint but a file of a shared model folder'."""
    with pytest.raises(ValueError, match="No such file or directory"):
        load_checkpoint(tmp_path / "nope" / "model.safetensors")


@pytest.mark.skipif(os.name != "posix", reason="orphans are found by process id on POSIX")
def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """SIGKILL skips atomic_file's cleanup: a full-size hidden .tmp stayed beside the checkpoint, and one more per
    killed run (a review: the run folder grew until the disk was full). A live writer's file is kept."""
    import subprocess
    import sys

    from fastflow.atomic_file import _host

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    orphan = tmp_path / f".ckpt.pt.{_host()}-{dead}-0123456789ab.tmp"
    live = tmp_path / f".ckpt.pt.{_host()}-{os.getppid()}-0123456789ab.tmp"
    other_file = tmp_path / f".other.pt.{_host()}-{dead}-0123456789ab.tmp"
    other_host = tmp_path / f".ckpt.pt.{_host()}x-{dead}-0123456789ab.tmp"  # its pids mean nothing here
    for path in (orphan, live, other_file, other_host):
        path.write_bytes(b"partial")
    save_checkpoint(tmp_path / "ckpt.pt", TabularFlow(2, transforms=1, hidden=4))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt.pt", live.name, other_file.name, other_host.name]
    )


def test_loading_a_checkpoint_on_a_torch_with_weights_only_escapes_warns(tmp_path, monkeypatch):
    """torch < 2.6 (code execution) and < 2.10 (memory corruption) have published escapes from the weights-only
    loader, which the package's torch >= 2.4 admits: the README's 'a crafted file cannot run code' needs the fixes."""
    import fastflow.checkpoint as checkpoint

    save_checkpoint(tmp_path / "ckpt.pt", TabularFlow(2, transforms=1, hidden=4))
    assert checkpoint.weights_only_loader_patched() == (torch.torch_version.TorchVersion(torch.__version__) >= (2, 10))
    monkeypatch.setattr(checkpoint, "weights_only_loader_patched", lambda: False)
    with pytest.warns(
        UserWarning, match=r"CVE-2025-32434 below 2\.6.*load only checkpoints you wrote or trust"
    ) as seen:
        load_checkpoint(tmp_path / "ckpt.pt")
    assert seen[0].filename == __file__
    monkeypatch.setattr(checkpoint, "weights_only_loader_patched", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path / "ckpt.pt")
