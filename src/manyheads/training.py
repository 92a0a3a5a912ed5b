"""The training loop, written once: it serves the API, the command line, comparisons and torchrun.

Read top to bottom: resolve heads and data, encode, build optimizer and schedule, then for
each epoch run the steps, evaluate, record history, select the best epoch, checkpoint.

    result = mh.fit(net, df, losses={"age": "mae"}, weights={"gender": 5}, epochs=10)
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manyheads import balancing, checkpoint, encoding
from manyheads.allocator import keep_freed_memory
from manyheads.distributed import Cluster
from manyheads.encoding import fits_on_device
from manyheads.heads import Head
from manyheads.images import Augment
from manyheads.inference import score
from manyheads.losses import fit_to_data, resolve, trivial_losses
from manyheads.metrics import EpochOutputs
from manyheads.net import MultiHeadNet
from manyheads.optim import WeightAverage, build_optimizer
from manyheads.optim import schedule as lr_schedule
from manyheads.precision import PRECISIONS
from manyheads.result import TrainResult
from manyheads.selection import Selector


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _wrap_net(net: nn.Module, heads: Mapping[str, Head] | None) -> MultiHeadNet:
    if isinstance(net, MultiHeadNet):
        if heads is not None and set(heads) != set(net.heads):
            raise ValueError(f"heads= {sorted(heads)} do not match the net's heads {sorted(net.heads)}")
        return net
    if not heads:
        raise ValueError("a plain nn.Module needs heads={name: mh.Regression(), ...} naming its outputs")
    return MultiHeadNet(net, heads, outputs_dict=True)


def fit(
    net: nn.Module,
    train: Any,
    *,
    validation: Any = None,
    heads: Mapping[str, Head] | None = None,
    inputs: str | None = None,
    losses: Mapping | None = None,
    weights: Mapping[str, float] | str | None = None,
    normalize: bool = False,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    trunk_lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: Any = "adamw",
    schedule: str | None = None,
    warmup: float = 0.3,
    freeze_trunk_epochs: int = 0,
    ema: float | None = None,
    augment: Augment | bool = True,
    image_size: int | None = None,
    precision: str = "fp32",
    channels_last: bool | None = None,
    compile: bool = False,
    monitor: str | Mapping[str, float] | None = None,
    patience: int | None = None,
    keep_best_per_head: bool = False,
    device: str | torch.device | None = None,
    seed: int | None = None,
    progress: bool = True,
    on_bad: str = "error",
    on_nonfinite: str = "error",
    train_metrics: bool = True,
    run_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    callbacks: list[Callable[[dict], Any]] | None = None,
) -> TrainResult:
    """Train every head of ``net`` jointly on ``train`` and return a :class:`TrainResult`.

        result = mh.fit(net, df, validation=0.15, losses={"age": "mae"}, weights={"gender": 5})

    Data and heads:
        net: a :class:`MultiHeadNet`, or any module returning a dict of outputs, with ``heads=``.
        train, validation: a dict of columns, a DataFrame or a Dataset of dicts; ``validation``
            may be a fraction of ``train`` (a seeded split). Rows missing a head's label (None,
            NaN, pd.NA) still train the other heads.
        inputs: the input column (default: the one column that is not a head).
        image_size, augment, cache_dir, workers: image columns are decoded once into a uint8
            cache (on disk under ``cache_dir``), then augmented (``augment=True`` or an
            :class:`~manyheads.images.Augment`) and normalised on the device.
        on_bad: ``"error"`` stops at a bad image or label naming it; ``"skip"`` drops and lists it.

    Objective:
        losses: per head, a registered name, a torch loss module or a callable ``(output, target)``.
        weights: per-head constant multipliers, or a balancing strategy name (``"uncertainty"``,
            ``"dwa"``, ``"gradnorm"``, ``"upgrad"``, ``"mgda"``, ... see :mod:`manyheads.balancing`).
        normalize: divide each head's loss by its loss under a constant predictor.
        on_nonfinite: ``"error"`` stops at a NaN/inf loss naming head and step; ``"skip"`` skips the batch.

    Optimisation:
        epochs, batch_size, lr, optimizer (a name or a torch optimizer class), weight_decay,
        trunk_lr (a separate rate for the trunk), freeze_trunk_epochs, schedule (``"cosine"``,
        ``"onecycle"`` with ``warmup`` as the rising fraction and momentum cycled 0.95-0.85-0.95 as
        torch's ``OneCycleLR`` does, or None), precision (``"fp32"``, ``"bf16"``, ``"fp16"``),
        channels_last (None: on for named backbones), compile, device, seed.
        ema: keep an exponential moving average of the weights with this decay per step (e.g.
            0.999); validation, selection and the returned net then use the average.

    Selection and records:
        monitor: the history column to pick the best epoch by (``"age/mae"``, default the total
            loss) or a mapping column -> weight for a weighted mix; patience: early stopping;
            keep_best_per_head: also keep each head's best weights (``result.net_for(head)``).
        train_metrics: per-head metrics on training batches too; progress: a bar per epoch.
        run_dir: write model, history, curves and checkpoints there (``checkpoint_every`` steps
            too); resume: continue the run in that folder where it stopped.
        callbacks: called with each epoch's history row; returning False stops training.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if on_nonfinite not in ("error", "skip"):
        raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
    if ema is not None and not 0 <= ema < 1:
        raise ValueError(f"ema must be a decay in [0, 1), e.g. 0.999, got {ema}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    net = _wrap_net(net, heads)
    heads = net.heads
    # losses and weights are checked before any (possibly long) image decoding
    resolved = resolve(heads, losses, weights if isinstance(weights, Mapping) else None)
    device = torch.device(device) if device is not None else _default_device()
    cluster = Cluster.from_env(device)
    if cluster.world > 1 and device.type == "cuda":
        device = torch.device("cuda", cluster.local_rank)
    if device.type == "cpu":
        keep_freed_memory()  # activations are reused, not unmapped and faulted in again every step
    state = None
    if resume is not None:  # read first: the run's own seed decides the split and the batches
        run_dir = Path(resume)
        state = checkpoint.load(run_dir / checkpoint.NAME)
        if seed is not None and state.get("seed", seed) != seed:
            warnings.warn(f"resume: continuing with the run's seed {state['seed']}, not seed={seed}", stacklevel=2)
        seed = state.get("seed", seed)
    if seed is None:
        seed = cluster.agree(random.randrange(2**31))  # ranks must share the seed, or their shards overlap
    torch.manual_seed(seed)

    # ---- data: table -> encoded tensors -> batches on the device -------------------------
    table = encoding.columns_of(train, "train")
    input_name = encoding.input_column(table, heads, inputs)
    train_rows = val_rows = None  # positions in the user's table, which errors name
    if isinstance(validation, float):
        train_rows, val_rows = encoding.split_rows(encoding.n_rows(table), validation, seed)
        table, val_table = encoding.take(table, train_rows), encoding.take(table, val_rows)
    else:
        val_table = None if validation is None else encoding.columns_of(validation, "validation")
    image_size = image_size or net.image_size
    encode = dict(
        image_size=image_size,
        on_bad=on_bad,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress and cluster.is_main,
    )
    train_data = encoding.encode(table, heads, input_name, row_numbers=train_rows, **encode)
    val_data = None
    if val_table is not None:
        val_data = encoding.encode(val_table, heads, input_name, row_numbers=val_rows, **encode)
    bad = train_data.bad + ([{**b, "split": "validation"} for b in val_data.bad] if val_data else [])
    if bad and cluster.is_main:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in Counter(b["kind"] for b in bad).most_common())
        warnings.warn(
            f"on_bad='skip': skipped {len(bad)} bad rows ({kinds}), e.g. {bad[0]['reason']}; result.skipped lists all",
            stacklevel=2,
        )
    if len(train_data) == 0:
        raise ValueError("no training rows left after encoding")
    if train_data.images and net.image_size is None:
        net.image_size = image_size
    net.to(device)
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in net.modules()):
        with torch.no_grad():  # materialise lazy head layers with one dry batch
            was = net.training
            net.eval()
            probe = next(encoding.Batches(train_data, 2, device, shuffle=False).epoch(0))[0]
            net(probe)
            net.train(was)
    if device.type == "cuda" and fits_on_device(train_data, val_data, device=device):
        train_data = train_data.to(device)  # the whole set lives on the GPU: no copies per step
        val_data = val_data.to(device) if val_data is not None else None
    if isinstance(augment, bool):
        augment = Augment() if augment else None

    # ---- objective ---------------------------------------------------------------------
    targets, labelled = train_data.targets, train_data.labelled
    fit_to_data(resolved, targets, labelled, net.fit_target_scales(targets, labelled))
    normalizers = trivial_losses(resolved, targets, labelled) if normalize else None
    balancer = balancing.create(weights, resolved, normalizers).to(device)

    # ---- optimizer and schedule -----------------------------------------------------------
    opt, trunk_params = build_optimizer(
        net, optimizer, lr=lr, trunk_lr=trunk_lr, weight_decay=weight_decay, extra=list(balancer.parameters())
    )
    if channels_last is None:  # named conv backbones run about 2x faster channels-last, on CPU and GPU alike
        channels_last = net.backbone is not None and train_data.images
    batches = encoding.Batches(
        train_data, batch_size, device, seed=seed, augment=augment, channels_last=channels_last,
        shard=(cluster.rank, cluster.world),
    )  # fmt: skip
    total_steps = epochs * len(batches)
    scheduler = lr_schedule(opt, schedule, total_steps, warmup)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
    autocast = (
        torch.autocast(device.type, dtype=PRECISIONS[precision]) if PRECISIONS[precision] else contextlib.nullcontext()
    )
    if channels_last:
        net.to(memory_format=torch.channels_last)
    average = WeightAverage(net, ema) if ema is not None else None
    scored = average.module if average is not None else net  # what validation and selection see
    model = cluster.wrap(net)
    step_model = torch.compile(model) if compile else model
    selector = Selector(monitor, val_data is not None, heads=heads, per_head=keep_best_per_head)

    # ---- state, possibly resumed -----------------------------------------------------------
    names = list(heads)
    rows: list[dict] = []
    start_epoch, start_step, partial = 0, 0, None
    run_dir = Path(run_dir) if run_dir is not None else None
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        balancer.load_state_dict(state["balancer"])
        if (average is not None) != ("average" in state):
            raise ValueError(
                f"resume: the run in {run_dir} was started {'with' if 'average' in state else 'without'} "
                f"a weight average (ema=); resume it with the same ema= it was started with"
            )
        if average is not None:
            average.load_state_dict(state["average"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        rows = json.loads(state["history"])
        selector.load_state_dict(state["best"])
        start_epoch, start_step = state["epoch"], state["step"]
        partial = state["partial"]

    def save_checkpoint(epoch: int, step: int, sums: torch.Tensor, counts: torch.Tensor, nonfinite: int = 0) -> None:
        if run_dir is None or not cluster.is_main:
            return
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        checkpoint.save(
            run_dir / checkpoint.NAME,
            {
                "model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
                "balancer": balancer.state_dict(), "rng": rng, "epoch": epoch, "step": step,
                "partial": {"sums": sums.cpu(), "counts": counts.cpu(), "nonfinite": nonfinite},
                "history": json.dumps(rows), "seed": seed,
                "best": selector.state_dict(),
                **({"average": average.state_dict()} if average is not None else {}),
                "spec": json.dumps(net.spec()),
            },
        )  # fmt: skip

    # ---- the loop ---------------------------------------------------------------------------
    stop = False
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        frozen = epoch < freeze_trunk_epochs and bool(trunk_params)
        for p in trunk_params:
            p.requires_grad_(not frozen)
        net.train()
        if frozen:
            net.trunk.eval()  # keep pretrained normalisation statistics while the trunk is frozen
        balancer.start_epoch(epoch, [{n: r[f"train/{n}/loss"] for n in names} for r in rows])
        sums = torch.zeros(len(names), device=device)
        counts = torch.zeros(len(names), device=device)
        first = start_step if epoch == start_epoch else 0
        resumed = partial is not None and epoch == start_epoch
        if resumed and cluster.is_main:  # saved summed over ranks: add them once
            sums += partial["sums"].to(device)
            counts += partial["counts"].to(device)
        nonfinite_skipped = int(partial.get("nonfinite", 0)) if resumed else 0
        seen = EpochOutputs(batches.rows_per_rank)
        bar = _progress(len(batches), first, epoch, epochs, progress and cluster.is_main)
        last_refresh = time.perf_counter()
        bad_step = torch.full((), -1, device=device, dtype=torch.long)
        bad_heads = torch.zeros(len(names), device=device, dtype=torch.bool)  # which heads at bad_step
        for step, (x, targets, labelled) in enumerate(batches.epoch(epoch, first), start=first):
            features = None
            with autocast:
                if balancer.needs_features and cluster.world == 1 and not net.outputs_dict:
                    features = net.features(x)
                    outputs = net.head_outputs(features)
                else:
                    outputs = step_model(x)
                head_losses = {n: resolved[n](outputs[n], targets[n], labelled[n]) for n in names}
            stacked = torch.stack([head_losses[n] for n in names]).detach().float()
            # one host sync per step, the price of skipping; summed so that all ranks skip alike
            if on_nonfinite == "skip" and bool(cluster.sum((~torch.isfinite(stacked)).sum()) > 0):
                nonfinite_skipped += 1
                continue
            opt.zero_grad(set_to_none=True)
            balancer.backward(head_losses, features, scaler.scale if scaler else None)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            scheduler.step()
            if average is not None:
                average.update_parameters(net)
            n_labelled = torch.stack([labelled[n] for n in names]).sum(dim=1)
            sums += stacked * n_labelled
            counts += n_labelled
            finite = torch.isfinite(stacked)
            first_bad = (bad_step < 0) & ~finite.all()
            bad_heads = torch.where(first_bad, ~finite, bad_heads)
            bad_step = torch.where(first_bad, step, bad_step)
            if train_metrics:
                seen.add(outputs, targets, labelled)
            if bar is not None and time.perf_counter() - last_refresh > 0.5:
                last_refresh = time.perf_counter()
                _check_finite(bad_step, bad_heads, names, epoch, len(batches))
                bar.set_postfix({n: f"{v:.3g}" for n, v in zip(names, (sums / counts.clamp(min=1)).tolist())})
            if bar is not None:
                bar.update(1)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < len(batches):
                totals = cluster.sum(torch.stack([sums, counts]))  # the checkpoint holds all ranks' sums
                _check_finite(bad_step, bad_heads, names, epoch, len(batches), totals[0])
                save_checkpoint(epoch, step + 1, totals[0], totals[1], nonfinite_skipped)
        if bar is not None:
            bar.close()
        cluster.sum(sums)
        cluster.sum(counts)
        _check_finite(bad_step, bad_heads, names, epoch, len(batches), sums)

        # ---- epoch end: history row, model selection, checkpoint ----------------------------
        row: dict[str, Any] = {"epoch": epoch + 1}
        total = 0.0
        current = balancer.weights()
        for i, n in enumerate(names):
            loss_value = float(sums[i] / counts[i]) if counts[i] > 0 else float("nan")
            row[f"train/{n}/loss"] = loss_value
            row[f"train/{n}/labels"] = int(counts[i])
            total += current[n] * (0.0 if math.isnan(loss_value) else loss_value)
            if seen:  # over all ranks' rows (every rank holds as many)
                out, target, mask = seen[n]
                mask = cluster.gather(mask.to(torch.uint8)).bool()
                out = cluster.gather(out.float())[mask]
                for key, value in heads[n].metrics(out, cluster.gather(target)[mask]).items():
                    row[f"train/{n}/{key}"] = value
        row["train/total/loss"] = total
        if val_data is not None:
            batch = max(batch_size, 256)
            row.update(score(scored, val_data, resolved, current, batch_size=batch, autocast=autocast))
        for n in names:
            row[f"weight/{n}"] = current[n]
        row["lr"] = scheduler.get_last_lr()[-1]
        row["seconds"] = time.perf_counter() - t0
        if on_nonfinite == "skip":
            row["skipped_nonfinite"] = nonfinite_skipped
        rows.append(row)
        selector.update(row, scored)
        if progress and cluster.is_main:
            print(_summary(row, names), flush=True)
        for callback in callbacks or []:
            if callback(row) is False:
                stop = True
        stop = stop or selector.should_stop(epoch + 1, patience)
        save_checkpoint(epoch + 1, 0, torch.zeros_like(sums), torch.zeros_like(counts))
        if stop:
            break

    if selector.state is not None or average is not None:
        net.load_state_dict(selector.state if selector.state is not None else scored.state_dict())
    if cluster.world > 1:
        cluster.barrier()
    import pandas as pd

    history = pd.DataFrame(rows)
    result = TrainResult(
        net=net.eval(), history=history, losses=resolved, best_epoch=selector.epoch, monitor=selector.name,
        skipped=bad, seed=seed, best_per_head={h: {"epoch": b["epoch"], "state": b["state"]}
                                               for h, b in selector.head_best.items()},
    )  # fmt: skip
    if run_dir is not None and cluster.is_main:
        result.write(run_dir)
    return result


def _check_finite(
    bad_step: torch.Tensor,
    bad_heads: torch.Tensor,
    names: list[str],
    epoch: int,
    steps: int,
    sums: torch.Tensor | None = None,
) -> None:
    """Raise if a step of this epoch had a NaN/inf loss here, or on another rank (its ``sums`` over all ranks).

    Checked lazily, one host sync per check; ``bad_heads`` are the heads at the first bad step.
    """
    step = int(bad_step)
    where = f"step {step + 1} of {steps}"
    if step < 0:
        if sums is None or bool(torch.isfinite(sums).all()):
            return
        bad_heads, where = ~torch.isfinite(sums), "a step of another process"
    which = [n for n, bad in zip(names, bad_heads.tolist()) if bad] or names
    raise FloatingPointError(
        f"non-finite loss for head(s) {which} at epoch {epoch + 1}, {where}; the last checkpoint is kept. "
        f"Lower the learning rate, check the targets, or pass on_nonfinite='skip'."
    )


def _progress(total: int, initial: int, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def _summary(row: dict, names: list[str]) -> str:
    parts = [f"epoch {row['epoch']}"]
    for n in names:
        metric = next((k for k in row if k.startswith(f"val/{n}/") and not k.endswith(("/loss", "/labels"))), None)
        bit = f"{n} {row[f'train/{n}/loss']:.4g}"
        if metric:
            bit += f" (val {metric.split('/')[2]} {row[metric]:.4g})"
        parts.append(bit)
    weights = {n: row[f"weight/{n}"] for n in names if f"weight/{n}" in row}
    if any(w != 1 for w in weights.values()):
        parts.append("weights " + " ".join(f"{n}={w:.3g}" for n, w in weights.items()))
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)
