"""``tabular``: fastflow's TabularFlow against zuko on vector data, on the CPU (issue 14).

Unconditional rows, per dataset: two moons (2-D, 8,192 training / 2,048 validation / 2,048 held-out points),
scikit-learn's 8x8 digits as 64-D vectors (levels 0..16 dequantized as ``(k + u) / 17``) and the 30-D
breast-cancer set (both split 64/16/20 into training, validation and held-out sets with a fixed seed: 1,150 /
288 / 359 digits, 364 / 91 / 114 tumours), each standardised with its training split's mean and standard
deviation. At
matched size (:data:`MATCHED`: the same number of transforms, conditioner width and hidden layers) and the
same batches (one shared draw per step), Adam at 1e-3 with cosine decay trains:

- ``fastflow``: :class:`fastflow.models.TabularFlow` (ActNorm, LU linear map, affine coupling per transform);
- ``zuko_realnvp``: ``zuko.flows.RealNVP`` (affine couplings on alternating checkered masks);
- ``zuko_nsf``: ``zuko.flows.NSF(passes=2)`` (rational-quadratic spline couplings, 8 bins; not in ``--quick``,
  its 64-D step is several times the others');
- ``fastflow_nsf``: :class:`fastflow.models.NSF` (LU linear map, spline coupling with 8 bins per transform; not
  in ``--quick``), against ``zuko_nsf``.

``heldout_nll`` is the mean ``-log p(x)`` in nats per example on the held-out split, in the standardised
space (``nll_per_dim`` divides by ``D``), of each model's weights at ``best_step``: the step, among
:data:`VALIDATIONS` evenly spaced ones and the last, of its lowest validation NLL (the small training sets are
over-fitted within a few hundred steps by every model: without this selection the last step's held-out NLL
measures over-fitting, not the flow). ``ms_per_step`` is the median wall time of one training step (forward,
backward, Adam), the models timed round-robin one step each in turn so that a shared machine's noise falls on
all alike; ``time_vs_zuko_realnvp`` is the ratio of medians (< 1: faster than zuko's RealNVP).

Conditional rows: a simulator ``p(x | theta)`` with ``theta`` in :data:`THETAS`, ``u ~ N(0, 1)`` and
``x = (u, theta * (u^2 - 1) + 0.25 * eps)``, whose true NLL is known (``true_nll``). One
``TabularFlow(2, context=1)`` trained on every ``theta`` (batches of ``batch`` per ``theta`` per step, ``theta``
as its context) against one unconditional TabularFlow per ``theta`` (``batch`` per step), the same number of
steps. ``gap_vs_per_condition`` is ``(nll_conditional - nll_per_condition) / |nll_per_condition|``; the target is
``<= 0.05`` (``target_met``).

Seed rows (``moons, seeds``): ``fastflow`` and ``zuko_realnvp`` on two moons trained from each of
:data:`SPREAD_SEEDS` (model initialisation and batches): the mean held-out NLL and each seed's, the spread a
one-seed difference should be read against. A seed whose training the time box cut short is left out of the mean
(``truncated_seeds`` counts them); with no complete seed the row says ``skipped``. Unconditional rows give the
``steps`` each model trained.

A model whose training stops on an error (a non-finite loss) gets its error in the row instead of numbers.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from benchmarks.common import SKIPPED, Budget
from fastflow.examples.toy_data import two_moons
from fastflow.models import NSF, TabularFlow

__all__ = [
    "MATCHED",
    "THETAS",
    "conditional_rows",
    "seed_spread_rows",
    "simulate",
    "tabular_datasets",
    "tabular_rows",
    "unconditional_rows",
]

MATCHED = {"transforms": 5, "hidden": 64, "hidden_layers": 2}
"""The size every model is built at: transforms, conditioner width, conditioner hidden layers."""

SETTINGS = {
    "quick": {"steps": 100, "batch": 256, "libraries": ("fastflow", "zuko_realnvp")},
    "full": {"steps": 1000, "batch": 256, "libraries": ("fastflow", "zuko_realnvp", "zuko_nsf", "fastflow_nsf")},
}
VALIDATIONS = 20  # validation passes over a run (model selection against over-fitting the small sets)
WARMUP_STEPS = 5  # not timed: allocator and thread pools, ActNorm's data-dependent initialisation
THETAS = (-1.0, -0.5, 0.5, 1.0)
SPREAD_SEEDS = (0, 1, 2, 3, 4)
"""Model seeds of :func:`seed_spread_rows` (full runs; quick runs take the first two)."""
SIMULATOR_NOISE = 0.25
Loss = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(train, validation, test)``."""


def _standardised(train: torch.Tensor, *others: torch.Tensor) -> Split:
    mean, std = train.mean(0), train.std(0)
    return tuple((t - mean) / std for t in (train, *others))


def _split(data: np.ndarray, seed: int, heldout: float = 0.2) -> Split:
    """``(train, validation, test)`` float32 of a fixed shuffle of ``data``: ``heldout`` of it for the test
    split, ``heldout`` of the rest for the validation split."""
    order = np.random.default_rng(seed).permutation(len(data))
    points = torch.from_numpy(data[order]).float()
    n_test = int(round(heldout * len(data)))
    n_val = int(round(heldout * (len(data) - n_test)))
    return points[n_test + n_val :], points[n_test : n_test + n_val], points[:n_test]


def tabular_datasets(seed: int = 0) -> dict[str, Split]:
    """``{name: (train, validation, test)}`` of the unconditional datasets, standardised (module docstring)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    digits = load_digits().data
    dequantized = (digits + np.random.default_rng(seed).random(digits.shape)) / 17.0
    return {
        "moons": _standardised(two_moons(8192, seed), two_moons(2048, seed + 2), two_moons(2048, seed + 1)),
        "digits": _standardised(*_split(dequantized, seed)),
        "breast_cancer": _standardised(*_split(load_breast_cancer().data, seed)),
    }


def simulate(theta: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws ``(n, 2)`` of ``x = (u, theta * (u^2 - 1) + 0.25 * eps)`` with ``u, eps ~ N(0, 1)``."""
    u, eps = torch.randn(2, n, generator=generator)
    return torch.stack([u, theta * (u.square() - 1) + SIMULATOR_NOISE * eps], dim=1)


def simulator_true_nll() -> float:
    """The simulator's entropy in nats, the same for every ``theta``: ``H(u) + H(0.25 * eps)``."""
    gaussian = 0.5 * math.log(2 * math.pi * math.e)
    return 2 * gaussian + math.log(SIMULATOR_NOISE)


class _Trainee:
    """A model with its loss ``-log p(x | context)`` per example, its Adam and its cosine learning-rate decay."""

    def __init__(self, model: nn.Module, nll: Loss, steps: int, lr: float = 1e-3) -> None:
        self.model = model
        self.nll = nll
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, steps + WARMUP_STEPS)
        self.times_ms: list[float] = []
        self.error: str | None = None
        self.best: tuple[float, int, dict[str, Any]] | None = None

    def validate(self, step: int, x: torch.Tensor) -> None:
        """Keep the weights of ``step`` if their NLL on the validation points ``x`` is the best so far."""
        nll = self.heldout_nll(x)
        if math.isfinite(nll) and (self.best is None or nll < self.best[0]):
            self.best = (nll, step, copy.deepcopy(self.model.state_dict()))

    def restore_best(self) -> int | None:
        """Load the weights :meth:`validate` kept; returns their step (None: none kept, weights unchanged)."""
        if self.best is None:
            return None
        self.model.load_state_dict(self.best[2])
        return self.best[1]

    def step(self, x: torch.Tensor, context: torch.Tensor | None = None) -> None:
        """One training step on ``x``; its wall time goes to :attr:`times_ms`, an error to :attr:`error`."""
        self.model.train()
        start = time.perf_counter()
        try:
            loss = self.nll(x, context).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        except (FloatingPointError, RuntimeError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"[:200]
        self.schedule.step()
        self.times_ms.append((time.perf_counter() - start) * 1e3)

    def heldout_nll(self, x: torch.Tensor, context: torch.Tensor | None = None) -> float:
        """Mean ``-log p(x | context)`` in nats per example, in eval mode, by chunks of 4,096."""
        self.model.eval()
        chunks = range(0, len(x), 4096)
        with torch.no_grad():
            total = sum(
                float(self.nll(x[i : i + 4096], None if context is None else context[i : i + 4096]).sum())
                for i in chunks
            )
        return total / len(x)

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _fastflow(features: int, context: int, steps: int) -> _Trainee:
    model = TabularFlow(features, context, transforms=MATCHED["transforms"], hidden=MATCHED["hidden"])
    return _Trainee(model, lambda x, c: -model.log_prob(x, c), steps)


def _zuko(kind: str, features: int, context: int, steps: int) -> _Trainee:
    import zuko

    hidden = (MATCHED["hidden"],) * MATCHED["hidden_layers"]
    if kind == "zuko_realnvp":
        flow = zuko.flows.RealNVP(features, context, transforms=MATCHED["transforms"], hidden_features=hidden)
    else:
        flow = zuko.flows.NSF(features, context, transforms=MATCHED["transforms"], passes=2, hidden_features=hidden)
    return _Trainee(flow, lambda x, c: -flow(c).log_prob(x), steps)


def _fastflow_nsf(features: int, context: int, steps: int) -> _Trainee:
    model = NSF(features, context, transforms=MATCHED["transforms"], hidden=MATCHED["hidden"])
    return _Trainee(model, lambda x, c: -model.log_prob(x, c), steps)


def _trainee(library: str, features: int, context: int, steps: int) -> _Trainee:
    if library == "fastflow_nsf":
        return _fastflow_nsf(features, context, steps)
    return _fastflow(features, context, steps) if library == "fastflow" else _zuko(library, features, context, steps)


def _running(trainees: dict[str, _Trainee]) -> list[_Trainee]:
    return [t for t in trainees.values() if t.error is None]


def _train_round_robin(
    trainees: dict[str, _Trainee],
    train: torch.Tensor,
    steps: int,
    batch: int,
    seed: int,
    budget: Budget,
    validation: torch.Tensor | None = None,
) -> int:
    """Train every model on the same batches, one step of each in turn, after :data:`WARMUP_STEPS` untimed ones;
    returns the steps run (fewer when the budget runs out). With ``validation``, each model's weights are
    validated :data:`VALIDATIONS` times over the run and at its end, untimed (:meth:`_Trainee.restore_best`)."""
    generator = torch.Generator().manual_seed(seed)
    every = max(steps // VALIDATIONS, 1)
    done = steps
    for step in range(1 - WARMUP_STEPS, steps + 1):  # steps <= 0: warm-up
        if step > 1 and budget.expired():
            done = step - 1
            break
        x = train[torch.randint(len(train), (batch,), generator=generator)]
        for trainee in _running(trainees):
            trainee.step(x)
        if validation is not None and step > 0 and step % every == 0:
            for trainee in _running(trainees):
                trainee.validate(step, validation)
    if validation is not None and done % every != 0:
        for trainee in _running(trainees):
            trainee.validate(done, validation)
    return done


def _trained(
    libraries: tuple[str, ...],
    data: tuple[torch.Tensor, torch.Tensor],
    setting: dict[str, Any],
    seed: int,
    budget: Budget,
) -> tuple[dict[str, _Trainee], int]:
    """``libraries``' models built after ``torch.manual_seed(seed)`` and trained round-robin on ``data``
    (training and validation splits) with batches drawn from ``seed``; and the steps run."""
    train, validation = data
    torch.manual_seed(seed)
    trainees = {lib: _trainee(lib, train.shape[1], 0, setting["steps"]) for lib in libraries}
    return trainees, _train_round_robin(trainees, train, setting["steps"], setting["batch"], seed, budget, validation)


def seed_spread_rows(quick: bool, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Two moons, ``fastflow`` and ``zuko_realnvp`` trained from each of :data:`SPREAD_SEEDS` (model
    initialisation and batches; the data split of seed 0): per library the mean held-out NLL and each seed's.
    One seed's gap between two models is only meaningful against this spread."""
    budget = budget or Budget()
    setting = SETTINGS["quick" if quick else "full"]
    train, validation, test = tabular_datasets(0)["moons"]
    nlls: dict[str, list[float]] = {"fastflow": [], "zuko_realnvp": []}
    truncated = 0  # seeds whose training the budget cut short: left out of the mean
    for seed in SPREAD_SEEDS[:2] if quick else SPREAD_SEEDS:
        if budget.expired():
            break
        trainees, steps = _trained(tuple(nlls), (train, validation), setting, seed, budget)
        if steps < setting["steps"]:
            truncated += 1
            continue
        for library, trainee in trainees.items():
            if trainee.error is None:
                trainee.restore_best()
                nlls[library].append(trainee.heldout_nll(test))
    base = {"dataset": "moons, seeds", "features": 2, "batch": setting["batch"], **MATCHED, "steps": setting["steps"]}
    rows = []
    for library, values in nlls.items():
        row = {**base, "library": library, "seeds": len(values)}
        if values:
            row.update(heldout_nll=statistics.fmean(values), heldout_nll_per_seed=" ".join(f"{v:.3f}" for v in values))
        else:
            row.update(SKIPPED)
        if truncated:
            row["truncated_seeds"] = truncated
        rows.append(row)
    return rows


def unconditional_rows(quick: bool, budget: Budget | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """One row per dataset and library: ``heldout_nll``, ``ms_per_step``, ``time_vs_zuko_realnvp``, ``params``."""
    budget = budget or Budget()
    setting = SETTINGS["quick" if quick else "full"]
    threads = torch.get_num_threads()
    rows = []
    for name, (train, validation, test) in tabular_datasets(seed).items():
        base = {"dataset": name, "features": train.shape[1], "batch": setting["batch"], **MATCHED, "threads": threads}
        if budget.expired():
            rows += [{**base, "library": lib, **SKIPPED} for lib in setting["libraries"]]
            continue
        trainees, steps = _trained(setting["libraries"], (train, validation), setting, seed, budget)
        reference = statistics.median(trainees["zuko_realnvp"].times_ms[WARMUP_STEPS:] or [math.nan])
        for library, trainee in trainees.items():
            row = {**base, "library": library, "params": trainee.params(), "steps": steps}
            if trainee.error is not None:
                row["error"] = trainee.error
            else:
                ms = statistics.median(trainee.times_ms[WARMUP_STEPS:])
                best_step = trainee.restore_best()
                nll = trainee.heldout_nll(test)
                row.update(
                    best_step=best_step,
                    heldout_nll=nll,
                    nll_per_dim=nll / train.shape[1],
                    ms_per_step=ms,
                    time_vs_zuko_realnvp=ms / reference,
                )
            rows.append(row)
    return rows


def conditional_rows(quick: bool, budget: Budget | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The simulator rows: one conditional TabularFlow against one TabularFlow per ``theta``."""
    budget = budget or Budget()
    setting = SETTINGS["quick" if quick else "full"]
    steps, batch = setting["steps"], setting["batch"]
    generator = torch.Generator().manual_seed(seed)
    train = {theta: simulate(theta, 4096, generator) for theta in THETAS}
    test = {theta: simulate(theta, 2048, generator) for theta in THETAS}
    base = {"dataset": f"simulator p(x|theta), theta in {list(THETAS)}", "features": 2, "batch": batch, **MATCHED}
    truth = simulator_true_nll()
    if budget.expired():
        return [{**base, "library": f"fastflow {kind}", **SKIPPED} for kind in ("conditional", "per-condition")]

    torch.manual_seed(seed)
    conditional = _fastflow(2, 1, steps)
    sampler = torch.Generator().manual_seed(seed)
    for _ in range(steps + WARMUP_STEPS):
        x = torch.cat([train[t][torch.randint(4096, (batch,), generator=sampler)] for t in THETAS])
        theta = torch.tensor(THETAS).repeat_interleave(batch)[:, None]
        conditional.step(x, theta)
    all_test = torch.cat([test[t] for t in THETAS])
    all_theta = torch.tensor(THETAS).repeat_interleave(2048)[:, None]

    per_condition: list[float] = []
    errors: list[str] = []
    for theta in THETAS:  # not cut by the budget: the comparison needs every condition's full run
        torch.manual_seed(seed)
        single = {"fastflow": _fastflow(2, 0, steps)}
        _train_round_robin(single, train[theta], steps, batch, seed, Budget())
        if single["fastflow"].error is not None:
            errors.append(f"theta={theta}: {single['fastflow'].error}")
        else:
            per_condition.append(single["fastflow"].heldout_nll(test[theta]))

    rows = [{**base, "library": "fastflow conditional", "steps": steps, "true_nll": truth}]
    if conditional.error is None:
        rows[0].update(heldout_nll=conditional.heldout_nll(all_test, all_theta))
    else:
        rows[0]["error"] = conditional.error
    rows.append({**base, "library": "fastflow per-condition", "steps": steps, "true_nll": truth})
    if errors:
        rows[1]["error"] = "; ".join(errors)
    else:
        rows[1].update(heldout_nll=statistics.fmean(per_condition))
    if "heldout_nll" in rows[0] and "heldout_nll" in rows[1]:
        gap = (rows[0]["heldout_nll"] - rows[1]["heldout_nll"]) / abs(rows[1]["heldout_nll"])
        rows[0].update(gap_vs_per_condition=gap, target_met=gap <= 0.05)
    return rows


def tabular_rows(quick: bool, budget: Budget | None = None) -> list[dict[str, Any]]:
    """The ``tabular`` case: :func:`unconditional_rows`, :func:`conditional_rows`, then :func:`seed_spread_rows`."""
    budget = budget or Budget()
    return unconditional_rows(quick, budget) + conditional_rows(quick, budget) + seed_spread_rows(quick, budget)
