"""A training step makes no host sync: fastflow.train runs whole steps (forward, backward, clipping, optimizer)
with every way of reading a tensor on the host patched to raise, and still reports a non-finite loss and a
reversible drift when it reads the device."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow.train as train_module
from fastflow.models import Glow
from fastflow.nn.reversible import ReconstructionError
from fastflow.train import TrainConfig, TrainingDiverged, initialize_actnorm, train

N_BINS = 17
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
SYNC_OPS = (
    "_local_scalar_dense", "equal", "allclose", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive", "bincount",
)  # fmt: skip
"""ATen ops whose result depends on tensor data read on the host (a device sync on a GPU), whichever Python call
reached them: ``torch.equal``, ``torch.allclose``, ``nonzero``, ``unique``, and every scalar conversion; also
(:func:`_reads_data`) indexing with a boolean mask and ``repeat_interleave`` by a tensor of repeats without an
``output_size``."""


def _reads_data(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the ATen call ``func(*args, **kwargs)`` reads tensor data on the host (see :data:`SYNC_OPS`): on the
    CPU a boolean mask reaches ``aten.index`` / ``index_put`` (its ``nonzero`` is inside), which the name alone
    does not tell."""
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        mask = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
        # a mask put of one value is a masked_fill: nothing read
        values = args[2] if len(args) > 2 else kwargs.get("values")
        return mask and not (name != "index" and isinstance(values, torch.Tensor) and values.numel() == 1)
    # repeat_interleave(x, repeats) reaches repeat_interleave.Tensor(repeats, output_size=...): the sum of the
    # repeats is read unless given
    return name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None


class _SyncOps(TorchDispatchMode):
    """Fails (and records in ``reads``) every op that reads data (:func:`_reads_data`) while ``reads`` is armed and
    not allowing."""

    def __init__(self, reads: _HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if self.reads.armed and not self.reads.allowed and _reads_data(func, args, kwargs or {}):
            self.reads.attempts.append(f"aten.{name}")
            raise AssertionError(f"host read aten.{name} inside a training step")
        return func(*args, **(kwargs or {}))


class _HostReads:
    """Patches ``torch.Tensor``'s host reads to fail while armed, except inside the functions passed to
    :meth:`allow`; every read attempted is recorded, so that one caught by library code still fails the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.allowed = 0
        self.attempts: list[str] = []
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._guarded(name, getattr(torch.Tensor, name)))

    def _guarded(self, name: str, read: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.armed and not self.allowed:
                self.attempts.append(name)
                raise AssertionError(f"host read Tensor.{name} inside a training step")
            return read(tensor, *args, **kwargs)

        return guarded

    def allow(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def allowed(*args: Any, **kwargs: Any) -> Any:
            self.allowed += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.allowed -= 1

        return allowed


def _data() -> torch.Tensor:
    return torch.randint(0, N_BINS, (32, 2, 4, 4), generator=torch.Generator().manual_seed(3))


def _model(**kw: Any) -> Glow:
    torch.manual_seed(0)
    return Glow(2, 4, levels=2, steps=2, hidden=8, n_bins=N_BINS, **kw)


def _config(steps: int, **kw: Any) -> TrainConfig:
    return TrainConfig(steps=steps, batch=4, lr=1e-2, warmup=2, progress=False, **kw)


def _train_without_host_reads(
    monkeypatch: pytest.MonkeyPatch,
    model: Glow,
    config: TrainConfig,
    labels: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[float], list[int]]:
    """``train()`` with host reads failing from its first step on, except in the loop's reads (``_read_window``),
    the batches' preparation included (a levels tensor is checked once, whole, before the loop: the range check
    per batch read two numbers back, a sync per step for data on a GPU); ActNorm's initialisation before the loop
    reads once. Returns ``(history, the number
    of steps done at each read)``. ``on_batch(step)`` runs as the loop fetches the batch of 0-based ``step``."""
    reads = _HostReads(monkeypatch)
    step, fetch, read_window = train_module._train_step, train_module.batch_at_step, train_module._read_window
    read_at: list[int] = []

    def armed_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        reads.armed = True
        return step(*args, **kwargs)

    def fetch_batch(source: Any, at: int, *args: Any, **kwargs: Any) -> Any:
        if on_batch is not None:
            on_batch(at)
        return fetch(source, at, *args, **kwargs)

    def counted_read(model: Glow, losses: list[torch.Tensor], norms: list[torch.Tensor], first: int, *args: Any) -> Any:
        read_at.append(first + len(losses))
        return read_window(model, losses, norms, first, *args)

    monkeypatch.setattr(train_module, "_train_step", armed_step)
    monkeypatch.setattr(train_module, "batch_at_step", fetch_batch)
    monkeypatch.setattr(train_module, "_read_window", reads.allow(counted_read))
    try:
        with _SyncOps(reads):  # reads that bypass Tensor's Python methods: torch.equal, masks, nonzero, ...
            history = train(model, _data(), config, labels=labels)
    finally:
        reads.armed = False
        assert reads.attempts == [], f"host reads inside training steps: {reads.attempts}"
    return history, read_at


@pytest.mark.parametrize(
    "kind, amp",
    [("standard", None), ("reversible", None), ("conditional", None), ("reversible", "bf16"), ("standard", "fp16")],
)
def test_training_steps_make_no_host_read(monkeypatch, kind, amp):
    model = _model(reversible=kind == "reversible", num_classes=3 if kind == "conditional" else 0)
    labels = torch.arange(len(_data())) % 3 if kind == "conditional" else None
    before = [p.detach().clone() for p in model.parameters()]
    history, read_at = _train_without_host_reads(monkeypatch, model, _config(6, amp=amp), labels)
    assert read_at == [6], "without a progress log the loop reads the device once, after the last step"
    assert len(history) == 6 and all(math.isfinite(v) for v in history)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), "the optimizer stepped"


@pytest.mark.parametrize(
    "read",
    [
        lambda x: x[x > 0],  # a boolean mask: aten.index on the CPU, its nonzero inside
        lambda x: x.clone().index_put_((torch.tensor([True, False, True, False, True]),), torch.ones(3)),
        lambda x: x[(x > 0).to(torch.uint8)],
        lambda x: torch.bincount(torch.tensor([0, 2])),
        lambda x: torch.allclose(x, x),
        lambda x: torch.repeat_interleave(x, torch.ones(len(x), dtype=torch.long)),
        lambda x: x.item() if x.numel() == 1 else x.sum().item(),
    ],
)
def test_the_harness_catches_each_kind_of_host_read(monkeypatch, read):
    """A bool-mask index, allclose and repeat_interleave by a repeats tensor passed unseen through the harness."""
    reads = _HostReads(monkeypatch)
    reads.armed = True
    with pytest.raises(AssertionError, match="host read"), _SyncOps(reads):
        read(torch.randn(5))
    reads.attempts.clear()
    with _SyncOps(reads):  # what reads no data passes, armed
        x = torch.randn(5)
        x[torch.tensor([0, 2])]  # an integer index
        x.clone()[x > 0] = 0.0  # a masked_fill
        torch.repeat_interleave(x, torch.ones(5, dtype=torch.long), output_size=5)
    assert reads.attempts == []


def test_reads_follow_the_logging_steps(monkeypatch):
    _, read_at = _train_without_host_reads(monkeypatch, _model(), _config(7, save_every=3, eval_every=5))
    assert read_at == [3, 5, 6, 7]


def test_a_nan_mid_training_is_reported_at_the_read_naming_its_step_and_layer(monkeypatch):
    model = _model()
    poisoned = model.blocks[1].layers[2].actnorm.logs
    kept: list[torch.Tensor] = []

    def poison(step: int) -> None:
        if step == 3:  # as if the update of step 3 had blown a weight up: the loss of step 4 is NaN
            with torch.no_grad():
                poisoned.fill_(float("nan"))
            kept.extend(p.detach().clone() for p in model.parameters())

    with pytest.raises(TrainingDiverged, match=r"step 4 \(non-finite output at blocks\.1\.layers\.2") as info:
        _train_without_host_reads(monkeypatch, model, _config(6), on_batch=poison)
    assert info.value.step == 4
    for p, before in zip(model.parameters(), kept):  # steps 4-6 updated nothing: the device skipped them
        assert p is poisoned or torch.equal(p, before)


def test_reversible_drift_beyond_max_drift_is_reported_at_the_read(monkeypatch):
    model = _model(reversible=True)
    kept: dict[str, torch.Tensor] = {}

    def tighten(step: int) -> None:
        if step == 2:  # no rebuilt input is this exact: every backward from step 3 on trips the guard
            for block in model.blocks:
                block.max_drift = 1e-30
            kept.update({k: v.clone() for k, v in model.state_dict().items()})

    with pytest.raises(ReconstructionError, match=r"steps 1-5: .*blocks\.0 \(.* times its max_drift, 1e-30 in"):
        _train_without_host_reads(monkeypatch, model, _config(5), on_batch=tighten)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in kept.items()), "the drifted steps' updates were skipped"


def test_guards_record_instead_of_reading_under_torch_compile_tracing(monkeypatch):
    model = _model(num_classes=3)
    x = torch.rand(4, 2, 4, 4) - 0.5
    initialize_actnorm(model, x, torch.tensor([0, 1, 2, 0]))
    with torch.no_grad():
        model.blocks[0].layers[1].actnorm.logs.fill_(float("inf"))
    reads = _HostReads(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    reads.armed = True
    log_p = model.log_prob(x, torch.tensor([0, 1, 2, 0]))
    reads.armed = False
    assert not torch.isfinite(log_p).all() and bool(model.guards_tripped())
    monkeypatch.undo()
    with pytest.raises(FloatingPointError, match=r"blocks\.0\.layers\.1 \(FlowStep\)"):
        model.check_guards(x, torch.tensor([0, 1, 2, 0]))
