"""Data-parallel trials: one trial trained by N processes of one torch.distributed group.

With ``training.gpus_per_trial = N`` (N > 1) the worker process is rank 0 of every trial
it runs: it alone claims, heartbeats, reports, checkpoints and tells. For each trial it
starts N - 1 follower processes (``follower_main``; they get SIGTERM when the
worker dies, however it dies: ``hpo.launcher.die_with_parent``), which join a TCP
rendezvous on 127.0.0.1 (NCCL on GPUs, gloo on CPU) and receive the trial from rank 0 by
broadcast: the spec, the sampled parameters, the seed, the checkpoint directory. Every
rank therefore trains the same configuration.

The searched batch size is the global batch B. Every rank draws the same shuffled global
batch (the same seeded generator) and trains its own B/N slice of it (``shard``): the
shards are disjoint and together the global batch, so the update is the single-process
update on B (to float tolerance; BatchNorm normalizes each shard by its own statistics,
as under DDP). With ``training.above_cap = "accumulate"`` a slice above the device's cap
runs as micro-batches. One all-reduce per update carries the gradients, the floating
buffers (BatchNorm's running statistics, averaged) and each rank's local squared
gradient norm: the local gradient is the small batch (B/N) and the all-reduced one the big
batch (B) of the gradient noise scale (McCandlish et al. 2018, App. A), so B_simple is
measured on every update with no extra backward pass and no extra collective.

Faults: a follower that dies (kill -9, an error, out of memory) or a collective that times
out (``$HPO_COLLECTIVE_TIMEOUT_S``) fails the trial with ``RankFailed`` naming the rank and
why; the worker re-queues it (``hpo.worker.run_one``) to resume from its checkpoint. The
followers of a trial are always stopped when rank 0 leaves it, however it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hpo.context import Budget, Diverged, TrialContext, load_trainer
from hpo.device import DeviceSetup, DeviceUnavailable, autocast, is_out_of_memory
from hpo.errors import UserError
from hpo.launcher import start_child, stop_children
from hpo.noise import NoiseScaleEstimate
from hpo.retry import RequeueTrial
from hpo.settings import collective_timeout_s, environment, survive_nccl_errors
from hpo.spec import StudySpec, TrainingSpec, TrialParams

__all__ = ["RankFailed", "RankGroup", "check_devices_per_trial", "data_parallel_group"]

# Begins a follower's reason file when it ran out of memory: the trial then ends as an OOM
# (the device's batch cap lowered, no retry), not as a re-queued rank failure.
OOM_MARK = "oom\n"
# A follower process, the working directory dropped from ``sys.path`` as for workers
# (``hpo.launcher.python_module_command``): a stray module there is never imported.
FOLLOWER_COMMAND = [
    sys.executable, "-c",
    "import sys; del sys.path[0]; from hpo.distributed import follower_main; follower_main()",
]  # fmt: skip
# How long rank 0 waits at least for its followers to start and join (a process importing
# torch took 3-8 s on the loaded 2-core box), whatever the collective timeout.
FOLLOWER_START_S = 300.0
# How long rank 0 waits for its followers to end on their own after a trial completed.
FOLLOWER_EXIT_GRACE_S = 30.0


class RankFailed(RequeueTrial):
    """A rank of a data-parallel trial died, failed or hung: the trial is re-queued."""


def check_devices_per_trial(training: TrainingSpec, setup: DeviceSetup) -> None:
    """DeviceUnavailable (exit 2) when a trial needs more GPUs than this worker sees; for
    data-parallel trials on GPUs, NCCL errors made survivable (``survive_nccl_errors``).
    The worker's main calls it once, before its first trial."""
    wanted = training.gpus_per_trial
    if setup.device.type != "cuda" or wanted == 1:
        return
    survive_nccl_errors()
    visible = torch.cuda.device_count()
    if wanted > visible:
        raise DeviceUnavailable(
            f"training.gpus_per_trial = {wanted} but this worker sees {visible} GPU(s); "
            f"give it {wanted} (hpo worker --gpus groups them per trial)"
        )


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """A collective's failure (a peer gone, ``$HPO_COLLECTIVE_TIMEOUT_S`` passed: gloo and
    NCCL raise plain RuntimeErrors) as RankFailed, told apart from the trainer's errors."""
    try:
        yield
    except RuntimeError as error:
        raise RankFailed(f"a collective failed: {str(error).splitlines()[0][:300]}") from error


@dataclasses.dataclass
class RankGroup:
    """One trial's process group as seen from one rank; rank 0 holds the followers."""

    rank: int
    world_size: int
    followers: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)
    reasons: Path | None = None  # where followers write why they failed
    out_of_memory: bool = False  # a follower's failure was an out-of-memory error

    @classmethod
    def start(cls, world_size: int, setup: DeviceSetup) -> RankGroup:
        """Rank 0: start the followers, wait until each joined the rendezvous (a follower
        that dies before is a RankFailed at once, not a timeout), form the group."""
        timeout = collective_timeout_s()
        store = dist.TCPStore("127.0.0.1", 0, world_size, True, timedelta(seconds=timeout),
                              wait_for_workers=False)  # fmt: skip
        backend = "nccl" if setup.device.type == "cuda" else "gloo"
        group = cls(0, world_size, reasons=Path(tempfile.mkdtemp(prefix="hpo-ranks-")))
        try:  # a stop signal too, arriving while a rank starts: no follower outlives this
            for rank in range(1, world_size):
                group._start_follower(rank, store.port, backend)
            group._wait_for_followers(store, max(timeout, FOLLOWER_START_S))
            dist.init_process_group(backend, store=store, rank=0, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))  # fmt: skip
        except BaseException:
            group.close(completed=False)
            raise
        return group

    def _start_follower(self, rank: int, port: int, backend: str) -> None:
        command = [*FOLLOWER_COMMAND, str(rank), str(self.world_size), str(port), backend,
                   str(self.reasons)]  # fmt: skip
        try:
            start_child(self.followers, command, environment())
        except OSError as error:
            raise RankFailed(f"could not start rank {rank}: {error.strerror}") from None

    def _wait_for_followers(self, store: dist.TCPStore, timeout: float) -> None:
        keys = [f"joined-{rank}" for rank in range(1, self.world_size)]
        deadline = time.monotonic() + timeout
        while not store.check(keys):
            failure = self.failure(wait_s=0.0)
            if failure is None and time.monotonic() > deadline:
                failure = f"the ranks did not join within {timeout:.0f} s"
            if failure is not None:
                raise RankFailed(failure)
            time.sleep(0.05)

    def broadcast(self, value: Any) -> Any:
        """``value`` from rank 0 on every rank (any picklable object)."""
        box = [value if self.rank == 0 else None]
        with collective():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch's indices (disjoint, equal sizes)."""
        size = len(indices) // self.world_size
        return indices[self.rank * size : (self.rank + 1) * size]

    def average_gradients(
        self,
        model: torch.nn.Module,
        noise: NoiseScaleEstimate | None,
        local_batch: int,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """Replace every gradient by its mean over the ranks and every floating buffer by
        its mean, in one all-reduce, which also carries this rank's squared gradient norm:
        the noise scale's small batch (``local_batch``) against the big (all ranks)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        tensors = grads + buffers
        count = sum(g.numel() for g in grads)
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors] + [
            torch.zeros(1, device=grads[0].device)])  # fmt: skip
        if noise is not None:
            flat[-1] = flat[:count].square().sum()
        with collective():
            dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
        if noise is not None and self.world_size > 1:
            unscale = (
                scaler.get_scale() ** -2 if scaler is not None and scaler.is_enabled() else 1.0
            )
            big_sq = flat[:count].square().sum()
            noise.update(flat[-1] * unscale, big_sq * unscale, local_batch,
                         local_batch * self.world_size)  # fmt: skip

    def update(
        self,
        run: Any,
        setup: DeviceSetup,
        images: torch.Tensor,
        targets: torch.Tensor,
        micro_batch_size: int | None,
        *,
        measure_noise: bool = True,
    ) -> torch.Tensor:
        """One optimizer update of a ``hpo.train.TrainingRun`` on this rank's shard
        (micro-batches of ``micro_batch_size`` when given), gradients averaged over the
        ranks, the noise scale measured into ``run.tally.noise`` (unless ``measure_noise``
        is off: benchmarks/ddp.py times the difference); returns the shard's mean loss,
        detached."""
        run.optimizer.zero_grad(set_to_none=True)
        local = images.shape[0]
        loss_sum = torch.zeros((), device=images.device)
        micro = micro_batch_size or local
        for part_images, part_targets in zip(images.split(micro), targets.split(micro),
                                             strict=True):  # fmt: skip
            with autocast(setup):
                loss = F.cross_entropy(run.model(part_images).float(), part_targets)
            weighted = loss * (part_images.shape[0] / local)
            run.scaler.scale(weighted).backward()
            loss_sum += weighted.detach()
        noise = run.tally.noise if measure_noise else None
        self.average_gradients(run.model, noise, local, run.scaler)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        return loss_sum

    def failure(self, wait_s: float = 2.0) -> str | None:
        """Why a follower ended, if one did (waiting up to ``wait_s`` for its exit status:
        a dead peer's closed socket can reach rank 0 before its exit does)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, child in enumerate(self.followers, start=1):
                code = child.poll()
                if code is not None and code != 0:
                    return f"rank {rank} of {self.world_size} {self._ended(rank, code)}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _ended(self, rank: int, code: int) -> str:
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        said = ""
        if self.reasons is not None and (self.reasons / f"rank-{rank}").is_file():
            said = (self.reasons / f"rank-{rank}").read_text()
            self.out_of_memory = said.startswith(OOM_MARK)
            said = ": " + said.removeprefix(OOM_MARK)[:300]
        return f"exited with code {code}{said}"

    def close(self, *, completed: bool) -> None:
        """Rank 0: wait for the followers after a completed trial, else stop them now;
        then leave the group. No follower outlives this call."""
        if completed:
            deadline = time.monotonic() + FOLLOWER_EXIT_GRACE_S
            for child in self.followers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=max(0.0, deadline - time.monotonic()))
        stop_children(self.followers, grace_s=5.0)
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.reasons is not None:
            for path in self.reasons.glob("rank-*"):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.reasons.rmdir()


@dataclasses.dataclass(frozen=True)
class TrialPackage:
    """What rank 0 broadcasts to its followers: the trial as the trainer sees it."""

    spec: StudySpec
    params: dict[str, Any]
    trial_params: TrialParams
    budget: Budget
    seed: int
    trial_number: int
    checkpoint_dir: Path | None
    retry_of: int | None

    @classmethod
    def of(cls, ctx: TrialContext) -> TrialPackage:
        return cls(ctx.spec, ctx.params, ctx.trial_params, ctx.budget, ctx.seed,
                   ctx.trial_number, ctx.checkpoint_dir, ctx.retry_of)  # fmt: skip

    def context(self, device: torch.device, group: RankGroup) -> TrialContext:
        """A follower's context: it reports and records nothing (rank 0 does)."""
        return TrialContext(
            params=self.params, trial_params=self.trial_params, device=device,
            budget=self.budget, seed=self.seed, trial_number=self.trial_number,
            spec=self.spec, checkpoint_dir=self.checkpoint_dir, retry_of=self.retry_of,
            on_report=lambda *args: None, set_attr=lambda key, value: None,
            rank=group.rank, world_size=group.world_size, group=group,
        )  # fmt: skip


@contextlib.contextmanager
def data_parallel_group(ctx: TrialContext, setup: DeviceSetup) -> Iterator[None]:
    """Rank 0's side of one trial: with ``training.gpus_per_trial`` > 1, the followers
    started, the trial broadcast and ``ctx`` made rank 0 of the group for the block; a
    follower's death or a failed collective inside it becomes RankFailed; the followers
    are gone when it exits, however it exits (a stop signal included)."""
    world = ctx.spec.training.gpus_per_trial
    if world == 1:
        yield
        return
    group = RankGroup.start(world, setup)
    completed = False
    try:
        group.broadcast(TrialPackage.of(ctx))
        ctx.rank, ctx.world_size, ctx.group = 0, world, group
        yield
        completed = True
    except Exception as error:
        # A collective's error can reach rank 0 before a dead peer's exit status does.
        suspect = isinstance(error, RuntimeError) and not isinstance(error, Diverged)
        failure = group.failure(wait_s=2.0 if suspect else 0.0)
        if failure is None and isinstance(error, dist.DistError):  # the trainer's own DDP
            failure = f"a collective failed: {str(error).splitlines()[0][:300]}"
        if failure is not None and group.out_of_memory:  # as an OOM on rank 0 (objective)
            raise torch.OutOfMemoryError(failure) from error
        if failure is not None:  # the rank that died says more than the collective
            raise RankFailed(failure) from error
        raise
    finally:
        group.close(completed=completed)


def run_follower(group: RankGroup) -> None:
    """A follower's trial: the package from rank 0, this node's device, the trainer
    (hpo's own on the study's splits, or the user's), run to the end of its budget."""
    from hpo.device import start_on_this_node

    package: TrialPackage = group.broadcast(None)
    spec = package.spec
    setup = start_on_this_node(spec.training)
    if spec.trainer.function is not None:
        trainer = load_trainer(spec.trainer.function)
    else:
        from hpo.cnn_trainer import CnnTrainer
        from hpo.data import study_splits

        trainer = CnnTrainer(setup, study_splits(spec))
    ctx = package.context(setup.device, group)
    if not getattr(trainer, "records_own_attrs", False):  # as hpo.objective does for rank 0
        torch.manual_seed(ctx.seed)
        ctx.load_saved_state()
    trainer(ctx)


def follower_main(argv: list[str] | None = None) -> None:
    """``FOLLOWER_COMMAND RANK WORLD PORT BACKEND REASONS``: join rank 0's
    rendezvous, run the trial it broadcasts, exit 0; on an error, write why to
    ``REASONS/rank-RANK`` (rank 0 names it in the trial's fail reason) and exit 1."""
    parser = argparse.ArgumentParser(prog="hpo-rank")
    for name in ("rank", "world", "port"):
        parser.add_argument(name, type=int)
    parser.add_argument("backend")
    parser.add_argument("reasons", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.backend == "nccl":
            torch.cuda.set_device(args.rank)
        timeout = timedelta(seconds=collective_timeout_s())
        store = dist.TCPStore("127.0.0.1", args.port, args.world, False, timeout)
        store.set(f"joined-{args.rank}", "1")
        dist.init_process_group(args.backend, store=store, rank=args.rank,
                                world_size=args.world, timeout=timeout)  # fmt: skip
        run_follower(RankGroup(args.rank, args.world))
    except (Exception, UserError) as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        mark = OOM_MARK if is_out_of_memory(error) else ""
        with contextlib.suppress(OSError):
            (args.reasons / f"rank-{args.rank}").write_text(mark + reason[:300])
        print(f"rank {args.rank}: {reason}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
