"""``TrialContext``: everything a trainer function sees of its trial.

A study file's ``[trainer] function = "package.module:function"`` names the user's training
code; hpo calls ``function(ctx)`` once per trial and takes the value it returns (or, when it
returns None, the last value it reported) as the trial's result. hpo's own CNN loop is such
a trainer too (``hpo.cnn_trainer``), so both see the same context and neither knows Optuna:

- ``ctx.params``: ``batch_size``, ``lr``, ``weight_decay`` as drawn for this trial, and
  each ``[search.extra.NAME]`` of the study file under its NAME (int, float or a choice);
- ``ctx.device`` (a ``torch.device``), ``ctx.seed`` (torch is seeded with it before the
  call; a retry replays its original's seed) and ``ctx.budget`` (unit, amount, reports);
- ``ctx.report(value, samples=..., updates=...)`` after each evaluation: the value goes on
  the study's budget axis as report 1, 2, … ``budget.reports``, and the call raises the
  pruning exception when the pruner stops the trial (let it propagate), or ``Diverged`` for
  a value that is not finite;
- ``ctx.save_checkpoint(state)`` and ``ctx.resume``: a retried trial (its worker died) gets
  back the last state saved, and its report count with it; ``ctx.checkpoint_dir`` is the
  trial's own directory for anything else;
- ``ctx.noise``: the gradient noise scale B_simple from two gradient norms of one step, so
  the report's critical batch size works for the user's code too (``GradientNoise``);
- data-parallel trials (``training.gpus_per_trial`` = N > 1, ``hpo.distributed``): the
  trainer runs once in each of N processes, ``ctx.rank`` of ``ctx.world_size``, on
  ``ctx.device`` (its own GPU); ``ctx.params["batch_size"]`` is the global batch and
  ``ctx.local_batch_size`` this rank's share. Every rank calls ``report`` at the same
  points, but only rank 0's reaches the study (and checkpoints: ``save_checkpoint`` writes
  on rank 0 only, ``resume`` is loaded on every rank). ``ctx.average_gradients(model)``
  after the backward pass averages the gradients over the ranks and measures the noise
  scale from that same all-reduce; ``ctx.broadcast(value)`` gives rank 0's value to all.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from hpo.errors import UserError
from hpo.noise import NoiseScaleEstimate, gradient_sq_norm, record_split_measurement
from hpo.settings import kill_point
from hpo.spec import StudySpec, TrialParams
from hpo.train import Diverged
from hpo.trust import check_trusted

STATE_FILE = "trainer-state.pt"

__all__ = [
    "Budget",
    "Diverged",
    "GradientNoise",
    "TrainerError",
    "TrialContext",
    "gradient_sq_norm",
    "load_trainer",
]


class TrainerError(UserError):
    """``[trainer] function`` cannot be imported on this node, or is not callable."""


class Trainer(Protocol):
    def __call__(self, ctx: TrialContext) -> float | None: ...


def load_trainer(path: str) -> Trainer:
    """The function named by ``package.module:function``; TrainerError (one line, exit 2)
    naming the field and what to do when this node cannot import it."""
    module_name, _, function_name = path.partition(":")
    check_trusted(module_name, "trainer.function")  # a study row must not run code by itself
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # a module that exits at import is one line too
        raise TrainerError(
            f"trainer.function: cannot import module {module_name!r} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "install it on this node or put its directory on PYTHONPATH"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TrainerError(
            f"trainer.function: module {module_name!r} has no function {function_name!r}"
        )
    return function


@dataclass(frozen=True)
class Budget:
    """A trial's training budget: ``amount`` in ``unit`` (epochs, optimizer steps or
    training seconds), to be spent evenly over ``reports`` calls of ``ctx.report``."""

    unit: Literal["epochs", "steps", "seconds"]
    amount: float
    reports: int

    @property
    def per_report(self) -> float:
        """The budget between two reports, in ``unit``."""
        return self.amount / self.reports


class GradientNoise:
    """The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al., 2018), from the
    squared gradient norms of one step at two batch sizes (``hpo.noise``). Call one of:

    - ``record_split(first_sq, total_sq, first_size, total_size)`` when the step's batch is
      run as passes whose losses are weighted by their share of the batch (two
      micro-batches): ``first_sq`` = ``gradient_sq_norm(model)`` after the first pass's
      backward, ``total_sq`` after the last;
    - ``record(small_sq, big_sq, small_batch, big_batch)`` with the norms of two mean
      gradients, e.g. one rank's and the all-reduced one over every rank's samples.

    Every few steps is enough (hpo's own loop measures one update in 32). The estimate at
    each report is stored on the trial (user attrs ``b_simple``, ``b_simple_per_epoch``)."""

    def __init__(self) -> None:
        self.estimate = NoiseScaleEstimate()
        self._unscaled = torch.amp.GradScaler("cpu", enabled=False)

    def record(
        self, small_sq: torch.Tensor, big_sq: torch.Tensor, small_batch: int, big_batch: int
    ) -> None:
        self.estimate.update(torch.as_tensor(small_sq), torch.as_tensor(big_sq),
                             small_batch, big_batch)  # fmt: skip

    def record_split(
        self, first_sq: torch.Tensor, total_sq: torch.Tensor, first_size: int, total_size: int
    ) -> None:
        record_split_measurement(
            self.estimate, self._unscaled, torch.as_tensor(first_sq),
            torch.as_tensor(total_sq), first_size, total_size,
        )  # fmt: skip

    def b_simple(self) -> float | None:
        return self.estimate.b_simple()


@dataclass
class TrialContext:
    """One trial as its trainer sees it (see the module docstring). Built by
    ``hpo.objective``; ``on_report`` and ``set_attr`` are how the context talks to the trial
    without the trainer knowing Optuna."""

    params: dict[str, Any]
    trial_params: TrialParams  # the same values as hpo's own loop uses them
    device: torch.device
    budget: Budget
    seed: int
    trial_number: int
    spec: StudySpec
    checkpoint_dir: Path | None
    retry_of: int | None  # the trial this one retries (its worker died), else None
    on_report: Callable[[float, int, bool, int], None]  # value, number, last, samples
    set_attr: Callable[[str, Any], None]
    # Many attrs in one write (all or none); None: one ``set_attr`` each.
    set_attrs: Callable[[dict[str, Any]], None] | None = None
    noise: GradientNoise = field(default_factory=GradientNoise)
    reported: list[float] = field(default_factory=list)
    samples: int = 0
    updates: int = 0
    b_simple: list[float | None] = field(default_factory=list)
    # Updates done at each report of this attempt (user attr ``updates_at_report``: the
    # steps-to-target measurement's clock, hpo.report.steps_to_target).
    updates_at_report: list[int] = field(default_factory=list)
    save_failures: int = 0  # checkpoint saves of this trial that failed
    # Device-seconds of training and evaluation the trainer measured itself (hpo's own loop:
    # {"train": s, "eval": s}), stored with the trial's device time in one write
    # (``hpo.objective.record_device_time``).
    busy_seconds: dict[str, float] = field(default_factory=dict)
    # Data-parallel trials (hpo.distributed): this process's rank, the group's size, and
    # the group itself (a ``hpo.distributed.RankGroup``; None in a single-process trial).
    rank: int = 0
    world_size: int = 1
    group: Any = None
    _resume: Any = None

    @property
    def local_batch_size(self) -> int:
        """The samples this rank trains of every global batch (``params["batch_size"]``)."""
        return self.trial_params.batch_size // self.world_size

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object); ``value`` itself in a
        single-process trial. A collective: every rank must call it."""
        return value if self.group is None else self.group.broadcast(value)

    def average_gradients(
        self, model: torch.nn.Module, scaler: torch.amp.GradScaler | None = None
    ) -> None:
        """After the backward pass of every rank: each gradient (and floating buffer)
        becomes its mean over the ranks, and the noise scale is measured from this rank's
        gradient (``local_batch_size``) against the mean (the global batch) in the same
        all-reduce. Pass the fp16 ``scaler`` when gradients are scaled. Nothing in a
        single-process trial."""
        if self.group is not None:
            self.group.average_gradients(model, self.noise.estimate, self.local_batch_size,
                                         scaler)  # fmt: skip

    def report(
        self, value: float, *, samples: int | None = None, updates: int | None = None
    ) -> None:
        """Record ``value`` (the study's objective metric) as the next report; ``samples``
        and ``updates`` say how much training it took so far (stored on the trial, and the
        step a tracker plots against). Raises the pruning exception when the pruner stops
        the trial (never at the last report: the budget is spent by then) and ``Diverged``
        when ``value`` is not finite."""
        value = float(value)
        if samples is not None:
            self.samples = int(samples)
        if updates is not None:
            self.updates = int(updates)
        number = len(self.reported) + 1
        if not math.isfinite(value):
            raise Diverged(f"{self.spec.objective.metric} is {value} at report {number}")
        self.reported.append(value)
        self.b_simple.append(self.noise.b_simple())
        self.updates_at_report.append(self.updates)
        kill_point("report")  # tests only: a kill -9 between reports ($HPO_TEST_KILL_AT)
        if self.rank == 0:  # one report per trial step, whatever the number of ranks
            self.on_report(value, number, number >= self.budget.reports, self.samples)

    def set_user_attr(self, key: str, value: Any) -> None:
        """Store a JSON-serializable value on the trial (shown by the dashboard)."""
        self.set_attr(key, value)

    def set_user_attrs(self, attrs: dict[str, Any]) -> None:
        """Store several values on the trial at once: in one transaction where the storage
        allows (every one lands or none does), else one ``set_user_attr`` each."""
        if self.set_attrs is not None:
            self.set_attrs(attrs)
            return
        for key, value in attrs.items():
            self.set_attr(key, value)

    @property
    def resume(self) -> Any:
        """The state the trial this one retries last passed to ``save_checkpoint`` (None on
        a first attempt, or when nothing was saved): load it and go on from there. The
        report count, samples, updates and noise estimate are restored with it."""
        return self._resume

    def save_checkpoint(self, state: Any) -> None:
        """Save ``state`` (tensors, state dicts, numbers, lists, dicts) atomically for a
        retry of this trial, with the report count; call it right after ``report``. A
        failed write is a warning on the trial (``checkpoint_save_error``), never its end.
        Rank 0 writes; the other ranks of a data-parallel trial return at once."""
        if self.checkpoint_dir is None or self.rank != 0:
            return
        payload = {
            "reports": list(self.reported), "samples": self.samples, "updates": self.updates,
            "b_simple": list(self.b_simple), "noise": self.noise.estimate.to_dict(),
            "state": state,
        }  # fmt: skip
        path = self.checkpoint_dir / STATE_FILE
        temporary = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            self.save_failures += 1
            self.set_attr("checkpoint_save_failures", self.save_failures)
            self.set_attr("checkpoint_save_error", f"{path}: {error.strerror}"[:500])

    def load_saved_state(self) -> int:
        """On a retry, read what its predecessor saved into ``resume`` and the counters;
        returns the reports it had made (0: nothing saved, or unreadable: starts afresh)."""
        if self.checkpoint_dir is None or self.retry_of is None:
            return 0
        path = self.checkpoint_dir / STATE_FILE
        if not path.is_file():
            return 0
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            reports = [float(value) for value in saved["reports"]]
            noise = NoiseScaleEstimate.from_dict(saved["noise"])
        except Exception as error:  # torch.load raises many kinds
            self.set_attr("checkpoint_unreadable", f"{path}: {type(error).__name__}"[:500])
            return 0
        self.reported, self.samples, self.updates = reports, saved["samples"], saved["updates"]
        self.b_simple, self.noise.estimate = list(saved["b_simple"]), noise
        self._resume = saved["state"]
        return len(reports)
