"""Data-parallel training on the CPU with the gloo backend and two processes: ActNorm's initialisation uses the
statistics of both shards, both ranks end with the same parameters, and those match a single process that
trains on the whole global batch."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.multiprocessing as mp

from fastflow import distributed
from fastflow.checkpoint import load_checkpoint
from fastflow.cli import main
from fastflow.data import TensorImages, batch_at_step
from fastflow.models import FlowModel, Glow, Jet
from fastflow.nn import ActNorm
from fastflow.nn.reversible import ReconstructionError
from fastflow.step import BitsPerDim, TrainStep, make_adam
from fastflow.train import TrainConfig, initialize_actnorm, train
from tests.helpers import perturb_parameters

BATCH, N_BINS, STEPS = 8, 17, 3
# Adam moves a parameter whose gradient is rounding noise by +-lr whatever its size, so the order of a sum
# (two shards or one batch, one thread or two) decides those moves: a small lr keeps them small.
LR = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODELS = {
    "glow": lambda: Glow(1, 4, levels=2, steps=2, hidden=8, n_bins=N_BINS),
    # two reversible chains: each parameter's gradient must reach DDP once ("mark a variable ready only once")
    "glow_reversible": lambda: Glow(1, 4, levels=2, steps=2, hidden=8, n_bins=N_BINS, reversible=True),
    # coupling networks in 1x1 tiles (4 at the first level): one gradient per parameter for all the tiles
    "glow_reversible_tiled": lambda: _tiled(Glow(1, 4, levels=2, steps=2, hidden=8, n_bins=N_BINS, reversible=True)),
    # reversible: the walk's nested backward calls accumulate the parameter gradients that DDP reduces
    "jet_reversible": lambda: Jet(
        1, 4, patch_size=2, couplings=3, width=8, depth=1, heads=2, n_bins=N_BINS, reversible=True
    ),
}


def _tiled(model: FlowModel) -> FlowModel:
    model.set_tiling(tile_size=1)
    return model


def _model(name: str) -> FlowModel:
    torch.manual_seed(0)
    return MODELS[name]()


def _source() -> TensorImages:
    return TensorImages(torch.randint(0, N_BINS, (40, 1, 4, 4), generator=torch.Generator().manual_seed(5)))


def _actnorm_state(model: FlowModel) -> list[torch.Tensor]:
    return [torch.cat([m.bias.flatten(), m.logs.flatten()]) for m in model.modules() if isinstance(m, ActNorm)]


def _join(rank: int, world_size: int, port: int) -> distributed.Context:
    """This process as ``rank`` of ``world_size`` gloo ranks on ``port`` (one thread)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    return distributed.setup("cpu")


@contextlib.contextmanager
def _recorded_grad_norms() -> Iterator[list[float]]:
    """The gradient norm of each training step ``train()`` runs in the block (before clipping: the backward's,
    all-reduced under DDP), read after each step (a host read the tests can afford)."""
    import fastflow.train as train_module

    norms: list[float] = []
    step = train_module._train_step

    def recording(*args: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss, norm = step(*args)  # type: ignore[arg-type]
        assert norm is not None
        norms.append(float(norm))
        return loss, norm

    train_module._train_step = recording  # type: ignore[assignment]
    try:
        yield norms
    finally:
        train_module._train_step = step


def _worker(rank: int, world_size: int, port: int, folder: str, name: str) -> None:
    context = _join(rank, world_size, port)
    try:
        model, source = _model(name), _source()
        x = distributed.shard(batch_at_step(source, 0, BATCH, N_BINS)[0], context.rank, context.world_size)
        initialised = copy.deepcopy(model)
        initialize_actnorm(initialised, x)
        seen, log_prob = [], model.log_prob

        def recording_log_prob(batch: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(batch.clone())
            return log_prob(batch, y)

        model.log_prob = recording_log_prob  # what each rank trains on: ActNorm init, then each step
        with warnings.catch_warnings(record=True) as caught, _recorded_grad_norms() as norms:
            warnings.simplefilter("always")
            history = train(model, source, TrainConfig(steps=STEPS, batch=BATCH, lr=LR, warmup=1, progress=False))
        del model.log_prob
        result = {"init": _actnorm_state(initialised), "state": model.state_dict(), "history": history, "seen": seen}
        result["grad_norms"] = norms
        result["warnings"] = [str(w.message) for w in caught]
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


def _perturbed_glow(seed: int) -> FlowModel:
    model = _model("glow")
    torch.manual_seed(seed)
    perturb_parameters(model, 0.05)
    return model


def _settings_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """Per-rank ``progress``/``quiet`` train; differing settings raise on every rank (ranks that disagreed on them
    called collectives at different steps: both waited out the process group's timeout); ActNorm initialises from
    rank 0's weights when the ranks start from different ones (DDP hands out rank 0's only when it is built)."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    context = _join(rank, world_size, port)
    outcome: dict[str, object] = {}
    try:
        import fastflow.train as train_module

        model = _perturbed_glow(10 + rank)  # each rank its own weights
        initialise, states = train_module.initialize_actnorm, []

        def recording(m: FlowModel, *args: object, **kwargs: object) -> None:
            initialise(m, *args, **kwargs)  # type: ignore[arg-type]
            states.append(_actnorm_state(m))

        train_module.initialize_actnorm = recording  # type: ignore[assignment]
        try:
            config = TrainConfig(steps=2, batch=BATCH, lr=LR, warmup=1, progress=context.rank == 0, quiet=rank == 1)
            with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
                train(model, _source(), config)
        finally:
            train_module.initialize_actnorm = initialise
        outcome["init"] = states[0]
        for name, config in (
            ("lr", TrainConfig(steps=2, batch=BATCH, lr=LR * (1 + rank), progress=False)),
            ("out", TrainConfig(steps=2, batch=BATCH, progress=False, out=folder if rank == 0 else None)),
            ("batch", TrainConfig(steps=2, batch=BATCH + 1, progress=False)),
        ):
            try:
                train(_model("glow"), _source(), config)
                outcome[name] = "returned"
            except ValueError as err:
                outcome[name] = str(err)
        torch.save(outcome, f"{folder}/settings{rank}.pt")
    finally:
        distributed.teardown()


def test_ranks_check_their_settings_agree_and_actnorm_starts_from_rank_0s_weights(tmp_path):
    mp.spawn(_settings_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"settings{r}.pt") for r in range(2)]
    for result in ranks:
        assert "different lr:" in result["lr"] and "different out:" in result["out"], result
        assert result["batch"] == "config.batch = 9 does not split evenly over the 2 ranks", result
    rank0 = _perturbed_glow(10)  # rank 0's weights, initialised on the global batch
    initialize_actnorm(rank0, batch_at_step(_source(), 0, BATCH, N_BINS)[0])
    for result in ranks:
        torch.testing.assert_close(result["init"], _actnorm_state(rank0), rtol=1e-5, atol=1e-6)


def _skip_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """A NaN in rank 0's shard only: every rank must skip the update (DDP's reduced gradients are NaN on all)."""
    context = _join(rank, world_size, port)
    try:
        model = _model("glow")
        x = (batch_at_step(_source(), 0, BATCH, N_BINS)[0].float() + 0.5) / N_BINS - 0.5
        shard = distributed.shard(x, context.rank, context.world_size).clone()
        initialize_actnorm(model, shard)
        objective = torch.nn.parallel.DistributedDataParallel(BitsPerDim(model))
        step = TrainStep(objective, model, make_adam(model.parameters(), LR), clip=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        if context.rank == 0:
            shard[0, 0, 0, 0] = float("nan")
        loss = step(shard, None, LR)
        unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        torch.save({"skip": float(step.skip), "loss": float(loss), "unchanged": unchanged}, f"{folder}/skip{rank}.pt")
    finally:
        distributed.teardown()


def _drift_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """Rank 1's chains alone drift beyond a tightened max_drift on step 2: every rank must raise (the record was a
    buffer DDP overwrote with rank 0's, and the ranks read their guards apart: rank 1 alone raised, or none)."""
    context = _join(rank, world_size, port)
    try:
        model = _model("glow_reversible")
        drifting = model.bits_per_dim

        def bits_per_dim(batch: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            for block in model.blocks:  # the third call is step 2 (after ActNorm's init and step 1)
                block.max_drift = 1e-30 if context.rank == 1 and len(calls) == 2 else None
            calls.append(1)
            return drifting(batch, y)

        calls: list[int] = []
        model.bits_per_dim = bits_per_dim
        try:
            train(model, _source(), TrainConfig(steps=STEPS, batch=BATCH, lr=LR, warmup=1, progress=False))
            outcome = "returned"
        except ReconstructionError as err:
            outcome = str(err)
        torch.save({"outcome": outcome}, f"{folder}/drift{rank}.pt")
    finally:
        distributed.teardown()


def _no_sync_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """Two micro-batches per rank, the first under DDP's ``no_sync()``: each rank's gradients, standard and
    reversible (float64)."""
    _join(rank, world_size, port)
    try:
        grads = {}
        for reversible in (False, True):
            torch.manual_seed(0)  # the same weights on every rank
            model = Glow(1, 4, levels=2, steps=2, hidden=8, n_bins=N_BINS).double()
            with torch.no_grad():
                model.bits_per_dim(torch.rand(8, 1, 4, 4, dtype=torch.float64) - 0.5)  # ActNorm's initialisation
                for p in model.parameters():  # off the identity start, so every gradient counts
                    p.add_(0.05 * torch.randn_like(p))
            model.reversible = reversible
            objective = torch.nn.parallel.DistributedDataParallel(BitsPerDim(model))
            g = torch.Generator().manual_seed(10 + rank)  # each rank its own micro-batches
            first, second = (torch.rand(4, 1, 4, 4, dtype=torch.float64, generator=g) - 0.5 for _ in range(2))
            with objective.no_sync():
                objective(first, None).mean().backward()
            objective(second, None).mean().backward()
            grads[reversible] = [p.grad.clone() for p in model.parameters()]
        torch.save(grads, f"{folder}/nosync{rank}.pt")
    finally:
        distributed.teardown()


def test_gradient_accumulation_under_no_sync_is_reduced_whole_in_reversible_mode(tmp_path):
    """The walk had set .grad aside and added it back after DDP's reduction: the micro-batch accumulated under
    no_sync() was never all-reduced, and the ranks' gradients (so their weights) drifted apart."""
    mp.spawn(_no_sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"nosync{r}.pt") for r in range(2)]
    for standard, reversible in zip(ranks[0][False], ranks[0][True]):
        torch.testing.assert_close(reversible, standard, rtol=1e-9, atol=1e-12)
    for mine, theirs in zip(ranks[0][True], ranks[1][True]):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
    assert any(g.abs().max() > 0 for g in ranks[0][True])


def test_a_drift_on_one_rank_raises_on_every_rank(tmp_path):
    mp.spawn(_drift_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f"drift{r}.pt")["outcome"] for r in range(2)]
    assert "another rank" in outcomes[0], outcomes
    assert "times its max_drift" in outcomes[1] and "another rank" not in outcomes[1], outcomes


def test_a_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    mp.spawn(_skip_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"skip{r}.pt") for r in range(2)]
    assert math.isnan(ranks[0]["loss"]) and math.isfinite(ranks[1]["loss"])
    assert all(r["skip"] == 1.0 and r["unchanged"] for r in ranks), ranks


def test_channels_last_with_a_ddp_objective_needs_the_layout_first():
    from fastflow.step import convolutions_channels_last

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = _model("glow")
        objective = torch.nn.parallel.DistributedDataParallel(BitsPerDim(model))
        with pytest.raises(ValueError, match="channels_last=True with a DistributedDataParallel objective"):
            TrainStep(objective, model, make_adam(model.parameters(), LR), channels_last=True)
        laid_out = _model("glow")
        convolutions_channels_last(laid_out)
        objective = torch.nn.parallel.DistributedDataParallel(BitsPerDim(laid_out))
        TrainStep(objective, laid_out, make_adam(laid_out.parameters(), LR), channels_last=True)  # accepted
    finally:
        torch.distributed.destroy_process_group()


def test_shards_are_disjoint_and_cover_the_batch():
    x = torch.arange(12)
    torch.testing.assert_close(torch.cat([distributed.shard(x, r, 3) for r in range(3)]), x)
    with pytest.raises(ValueError, match="does not split evenly over 5 ranks"):
        distributed.shard(x, 0, 5)
    with pytest.raises(ValueError, match="world_size must be"):
        distributed.shard(x, 0, 0)
    for rank in (3, -1):  # an empty shard before
        with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size = 3\)"):
            distributed.shard(x, rank, 3)


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "1", "RANK": "3"}, {"WORLD_SIZE": "0"}, {"LOCAL_RANK": "-1"}])
def test_an_impossible_rank_environment_is_refused(monkeypatch, env):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"WORLD_SIZE must be >= 1 and RANK in \[0, WORLD_SIZE\)"):
        distributed.setup("cpu")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_ranks_match_one_process_on_the_global_batch(tmp_path, name):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), name), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    batches = [batch_at_step(_source(), step, BATCH, N_BINS)[0] for step in range(STEPS)]
    has_actnorm = bool(_actnorm_state(_model(name)))  # its initialisation sees the first batch once more
    for rank, result in enumerate(ranks):
        init = [distributed.shard(batches[0], rank, 2)] if has_actnorm else []
        expected = init + [distributed.shard(b, rank, 2) for b in batches]
        torch.testing.assert_close(result["seen"], expected, rtol=0, atol=0, msg=f"rank {rank} trained on")
    single = _model(name)
    initialize_actnorm(single, batches[0])  # the union of both shards
    for rank in ranks:
        torch.testing.assert_close(rank["init"], _actnorm_state(single), rtol=1e-5, atol=1e-6)
    single = _model(name)
    with _recorded_grad_norms() as norms:
        history = train(single, _source(), TrainConfig(steps=STEPS, batch=BATCH, lr=LR, warmup=1, progress=False))

    for result in ranks:  # the model is laid out (channels-last on the CPU) before DDP builds its buckets
        assert not [w for w in result["warnings"] if "bucket view strides" in w]
    assert ranks[0]["history"] == ranks[1]["history"]
    torch.testing.assert_close(torch.tensor(ranks[0]["history"]), torch.tensor(history), rtol=1e-4, atol=0)
    # the gradients themselves (Adam's normalised updates below would hide one off by a constant factor, e.g. the
    # ranks' gradients summed rather than averaged, or each rank's own half-batch gradient)
    assert ranks[0]["grad_norms"] == ranks[1]["grad_norms"] and len(norms) == STEPS
    got, want = torch.tensor(ranks[0]["grad_norms"]), torch.tensor(norms)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)  # at the same weights
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)  # later: at weights up to 2 lr apart per step
    # Adam's first steps move each parameter by about +-lr whatever the gradient's size, so a near-zero gradient
    # summed in another order can move a parameter by up to 2 lr per step: compare at that scale.
    step_bound = 2 * LR * STEPS
    for name, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], value, rtol=0, atol=0, msg=f"ranks differ at {name}")
        torch.testing.assert_close(value, single.state_dict()[name], rtol=0, atol=step_bound, msg=name)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_cli_trains_like_one_process_and_only_rank_0_writes(tmp_path, capsys):
    args = ["--levels", "1", "--steps", "1", "--hidden", "8", "--batch", "8", "--iterations", "3", "--device", "cpu"]
    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launcher, "-m", "fastflow.cli", "train", *args, "--reversible", "--out", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1, done.stdout
    assert "2 rank(s)" in done.stdout
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.pt", "samples-000003.png"]

    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    heldout = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(heldout) == 1 and heldout == [line for line in done.stdout.splitlines() if line.startswith("step ")]
    ddp, _ = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    one, _ = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    for name, value in one.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[name], value, rtol=0, atol=2 * TrainConfig().lr * 3, msg=name)
