"""The resumable state of a training run: what a checkpoint holds, saved and restored in one place.

A checkpoint (:mod:`manyheads.checkpoint` writes it atomically) holds the net, optimizer,
schedule, balancer and weight-average states, the RNG states, the seed, where the run is
(epoch, step, the epoch's loss sums so far), the history, the model selector, the net's spec
and, as ``"options"``, a JSON string of the fit options a resume must agree with
(:func:`manyheads.validation.options_record`; :func:`manyheads.validation.check_resume` compares).

    state = TrainingState(net, opt, scheduler, balancer, selector, seed=0, options=options_record(lr=1e-3))
    state.save(run_dir / checkpoint.NAME, epoch=1, step=0, partial=tally.cleared())
    saved = checkpoint.load(run_dir / checkpoint.NAME)
    TrainingState.check_resumable(saved, state.options, state.average is not None, run_dir); state.restore(saved)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from manyheads import checkpoint, validation


@dataclass
class TrainingState:
    """Everything a run needs to continue bit for bit where it stopped.

    ``epoch``, ``step`` and ``partial`` say where it continues (after :meth:`restore`): the
    first epoch to run, the first step in it, and that epoch's loss sums so far; ``rows`` is
    the history. A fresh run starts at epoch 0, step 0, with no history.
    """

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    balancer: nn.Module
    selector: Any
    seed: int
    average: Any = None  # a WeightAverage (ema=), or None
    options: dict = field(default_factory=dict)  # validation.options_record(...) of fit's options
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rows: list[dict] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    partial: dict | None = None

    def advance(self, precision: Any) -> None:
        """One optimizer step through ``precision`` (fp16: unscaled, skipped on overflow); then schedule and average."""
        precision.step(self.optimizer)
        self.scheduler.step()
        if self.average is not None:
            self.average.update_parameters(self.net)

    def save(self, path: str | os.PathLike | None, *, epoch: int, step: int, partial: dict) -> None:
        """Write a checkpoint at ``path`` (None: no run folder, nothing written) for a resume at (epoch, step).

        ``partial`` is the epoch's loss sums so far over all ranks (``EpochLosses.partial``).
        Call it on rank 0 only.
        """
        if path is None:
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        checkpoint.save(
            path,
            {
                "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "balancer": self.balancer.state_dict(), "rng": rng,
                "epoch": epoch, "step": step, "partial": partial, "history": json.dumps(self.rows), "seed": self.seed,
                "best": self.selector.state_dict(),
                **({"average": self.average.state_dict()} if self.average is not None else {}),
                "spec": json.dumps(self.net.spec()),
                "options": json.dumps(self.options),
            },
        )  # fmt: skip

    @staticmethod
    def check_resumable(saved: Mapping[str, Any], options: Mapping[str, Any], averaged: bool, where: Any) -> None:
        """Refuse a resume of ``saved`` with these options before any work (e.g. decoding images) is done.

        A ValueError when the run had a weight average and this one has none (or the reverse), or
        when an option that matters differs from the run's (``validation.check_resume``;
        checkpoints from before options were recorded are not checked).
        """
        if averaged != ("average" in saved):
            raise ValueError(
                f"resume: the run in {where} was started {'with' if 'average' in saved else 'without'} "
                f"a weight average (ema=); resume it with the same ema= it was started with"
            )
        if "options" in saved:
            validation.check_resume(json.loads(saved["options"]), options, where)

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Load a checkpoint's states into these objects, the RNG states too, and continue where it stopped.

        Call :meth:`check_resumable` first (``fit`` does, before its data stage): this only loads.
        """
        self.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.balancer.load_state_dict(saved["balancer"])
        if self.average is not None:
            self.average.load_state_dict(saved["average"])
        torch.set_rng_state(saved["rng"]["torch"].cpu())
        if self.device.type == "cuda" and "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"].cpu(), self.device)
        self.rows = json.loads(saved["history"])
        self.selector.load_state_dict(saved["best"])
        self.epoch, self.step, self.partial = saved["epoch"], saved["step"], saved["partial"]
