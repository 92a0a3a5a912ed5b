"""Training-time metric bookkeeping: each head's outputs over an epoch, gathered for its metrics once.

What a metric means is the head kind's (``Head.metrics``, torchmetrics does the maths); this module
keeps the epoch's outputs without a host sync per step, and says which metric names fall as they improve.

    seen = EpochOutputs(len(data)); seen.add(outputs, targets, labelled); head.metrics(*seen["age"][:2])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# History metrics where lower is better (everything else, e.g. accuracy, is higher-better).
LOWER_IS_BETTER = ("loss", "mae", "rmse", "mae_bins")


class EpochOutputs:
    """Each head's outputs, targets and labelled flags over one epoch's training batches.

    Buffers for ``rows`` rows are allocated at the first batch and filled in place: keeping one
    small tensor per step instead scatters long-lived blocks among the freed activations, and the
    heap grows (BENCHMARKS.md, training overhead: peak memory).

        seen = EpochOutputs(len(data)); seen.add(outputs, targets, labelled); out, target, labelled = seen["age"]
    """

    def __init__(self, rows: int) -> None:
        self.rows, self.filled = rows, 0
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def add(self, outputs: dict, targets: dict, labelled: dict) -> None:
        size = len(next(iter(labelled.values())))
        if not self.buffers:
            self.buffers = {
                name: tuple(torch.empty((self.rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in parts)
                for name, parts in ((n, (outputs[n].detach(), targets[n], labelled[n])) for n in labelled)
            }
        for name, buffers in self.buffers.items():
            for buffer, part in zip(buffers, (outputs[name].detach(), targets[name], labelled[name])):
                buffer[self.filled : self.filled + size] = part
        self.filled += size

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outputs, targets and labelled flags of the rows added so far."""
        return tuple(buffer[: self.filled] for buffer in self.buffers[name])

    def __bool__(self) -> bool:
        return self.filled > 0


class EpochLosses:
    """Each head's loss sum and label count over one epoch's steps, and its first non-finite step.

    Everything stays on the device: :meth:`add` only queues tensor ops, so a step costs no host
    sync; :meth:`check` (on a progress refresh, a checkpoint and the epoch's end) reads back and
    raises ``FloatingPointError`` naming the heads and the first step whose loss was NaN or inf.
    ``skipped`` counts the steps ``on_nonfinite="skip"`` dropped.

        tally = EpochLosses(["age", "race"], device, epoch=0, steps=len(batches))
        values = tally.stack(head_losses); tally.add(step, values, labelled); tally.finish(cluster.sum)
    """

    def __init__(
        self,
        names: list[str],
        device: torch.device,
        *,
        epoch: int,
        steps: int,
        partial: dict | None = None,
        main: bool = True,
    ) -> None:
        """``partial``: a mid-epoch checkpoint's ``{"sums", "counts", "nonfinite"}`` to resume from.

        Its sums are all ranks' already: only rank 0 (``main``) adds them, so the epoch's total counts them once.
        """
        self.names, self.epoch, self.steps = names, epoch, steps
        self.sums = torch.zeros(len(names), device=device)
        self.counts = torch.zeros(len(names), device=device)
        self.bad_step = torch.full((), -1, device=device, dtype=torch.long)
        self.bad_heads = torch.zeros(len(names), device=device, dtype=torch.bool)  # which heads at bad_step
        self.skipped = 0
        if partial is not None and main:
            self.sums += partial["sums"].to(device)
            self.counts += partial["counts"].to(device)
        if partial is not None:
            self.skipped = int(partial.get("nonfinite", 0))

    def stack(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's head losses as one detached float tensor, in head order."""
        return torch.stack([losses[n] for n in self.names]).detach().float()

    def add(self, step: int, values: torch.Tensor, labelled: dict[str, torch.Tensor]) -> None:
        """Add a step's losses (from :meth:`stack`), each weighted by its labelled rows; note a first NaN/inf."""
        n_labelled = torch.stack([labelled[n] for n in self.names]).sum(dim=1)
        self.sums += values * n_labelled
        self.counts += n_labelled
        finite = torch.isfinite(values)
        first_bad = (self.bad_step < 0) & ~finite.all()
        self.bad_heads = torch.where(first_bad, ~finite, self.bad_heads)
        self.bad_step = torch.where(first_bad, step, self.bad_step)

    def means(self) -> list[float]:
        """Each head's mean loss so far (one host sync: for the progress bar)."""
        return (self.sums / self.counts.clamp(min=1)).tolist()

    def check(self, sums: torch.Tensor | None = None) -> None:
        """Raise if a step of this epoch had a NaN/inf loss here, or on another rank (``sums`` over all ranks).

        One host sync; the heads named are those non-finite at the first bad step.
        """
        step = int(self.bad_step)
        where = f"step {step + 1} of {self.steps}"
        bad_heads = self.bad_heads
        if step < 0:
            if sums is None or bool(torch.isfinite(sums).all()):
                return
            bad_heads, where = ~torch.isfinite(sums), "a step of another process"
        which = [n for n, bad in zip(self.names, bad_heads.tolist()) if bad] or self.names
        raise FloatingPointError(
            f"non-finite loss for head(s) {which} at epoch {self.epoch + 1}, {where}; the last checkpoint is kept. "
            f"Lower the learning rate, check the targets, or pass on_nonfinite='skip'."
        )

    def partial(self, total: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """What a mid-epoch checkpoint keeps: sums and counts over all ranks (``total``: ``cluster.sum``), checked.

        Every rank calls it (``total`` is a collective); rank 0 saves it, and a resumed run adds it once.
        """
        totals = total(torch.stack([self.sums, self.counts]))
        self.check(totals[0])
        return {"sums": totals[0].cpu(), "counts": totals[1].cpu(), "nonfinite": self.skipped}

    def cleared(self) -> dict:
        """What an epoch-end checkpoint keeps: nothing summed yet of the next epoch."""
        zeros = torch.zeros(len(self.names))
        return {"sums": zeros, "counts": zeros.clone(), "nonfinite": 0}

    def finish(self, total: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """At the epoch's end: sum over all ranks in place (``total``: ``cluster.sum``), then :meth:`check`."""
        total(self.sums)
        total(self.counts)
        self.check(self.sums)

    def loss(self, i: int) -> float:
        """Head ``i``'s mean loss over its labelled rows (NaN without any)."""
        return float(self.sums[i] / self.counts[i]) if self.counts[i] > 0 else float("nan")

    def labels(self, i: int) -> int:
        """How many labelled rows head ``i`` saw."""
        return int(self.counts[i])
