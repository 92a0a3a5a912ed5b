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

from manyheads import balancing, checkpoint
from manyheads import data as datasets
from manyheads.distributed import Cluster
from manyheads.heads import Head, HeadLayer, Regression
from manyheads.images import Augment
from manyheads.losses import resolve
from manyheads.net import MultiHeadNet
from manyheads.result import TrainResult

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOWER_IS_BETTER = ("loss", "mae", "rmse", "mae_bins")


def _schedule(kind: str | None, total_steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor per step: constant, cosine decay, or one-cycle (warm-up then cosine)."""
    if kind in (None, "constant"):
        return lambda step: 1.0
    if kind not in ("cosine", "onecycle"):
        raise ValueError(f"schedule must be None, 'cosine' or 'onecycle', got {kind!r}")
    warm = int(total_steps * (warmup if kind == "onecycle" else 0.0))

    def factor(step: int) -> float:
        if step < warm:
            return 0.04 + 0.96 * step / warm  # one-cycle starts at lr / 25, as torch's OneCycleLR
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _optimizer(name: Any, groups: list[dict], lr: float, weight_decay: float | None) -> torch.optim.Optimizer:
    cls = OPTIMIZERS.get(name.lower()) if isinstance(name, str) else name
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; available: {sorted(OPTIMIZERS)} or a torch optimizer class")
    kwargs = {"lr": lr}
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    return cls(groups, **kwargs)


def _monitor(monitor: str | None, has_validation: bool) -> tuple[str, bool]:
    """History column to select the best epoch on, and whether lower is better."""
    prefix = "val" if has_validation else "train"
    if monitor is None:
        return f"{prefix}/total/loss", True
    column = monitor if monitor.startswith(("val/", "train/")) else f"{prefix}/{monitor}"
    if column.count("/") == 1:  # "age" alone: that head's loss
        column += "/loss"
    return column, column.rsplit("/", 1)[-1] in LOWER_IS_BETTER


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


def _standardize(net: MultiHeadNet, losses, train: datasets.Encoded) -> None:
    """Regression heads learn in units of the targets' spread (set once, on a fresh net)."""
    for name, head in net.heads.items():
        if not isinstance(head, Regression) or not head.standardize:
            continue
        values = train.targets[name][train.labelled[name]]
        if values.numel() < 2:
            continue
        layer = net.head_layers[name] if name in net.head_layers else None
        if isinstance(layer, HeadLayer) and not layer.fitted:
            layer.center.fill_(values.mean())
            layer.scale.fill_(values.std().clamp(min=1e-6))
            layer.fitted.fill_(True)
        losses[name].scale = float(layer.scale) if isinstance(layer, HeadLayer) else float(values.std().clamp(min=1e-6))


def _trivial_losses(losses, train: datasets.Encoded) -> dict[str, float]:
    """Each head's loss under a constant predictor (mean, or label prior): for normalize=True."""
    out = {}
    for name, loss in losses.items():
        target = train.targets[name][train.labelled[name]]
        if target.numel() == 0:
            continue
        head = loss.kind
        if head.kind == "regression":
            constant = torch.full_like(target, float(target.mean()))
        elif head.kind in ("binary", "multilabel"):
            p = target.float().mean(dim=0).clamp(1e-4, 1 - 1e-4)
            constant = torch.log(p / (1 - p)).expand_as(target).clone()
        else:
            prior = torch.bincount(target.long(), minlength=len(head.labels)).float().clamp(min=1)
            prior = prior / prior.sum()
            if head.kind == "ordinal":  # CORN logits of the prior: P(rank > j | rank >= j)
                tail = prior.flip(0).cumsum(0).flip(0)
                p = (tail[1:] / tail[:-1]).clamp(1e-4, 1 - 1e-4)
                logits = torch.log(p / (1 - p))
            else:
                logits = prior.log()
            constant = logits.expand(len(target), -1).clone()
        with torch.no_grad():
            value = float(loss(constant, target, torch.ones(len(target), dtype=torch.bool)))
        out[name] = max(value, 1e-6)
    return out


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
    augment: Augment | bool = True,
    image_size: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    monitor: str | None = None,
    patience: int | None = None,
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

    ``net`` is a :class:`MultiHeadNet`, or any module returning a dict of outputs with
    ``heads=`` naming their kinds. ``losses`` and ``weights`` override per head (a weight may
    also be a balancing strategy name). Rows missing a head's label still train the others.

        result = mh.fit(net, df, validation=0.15, losses={"age": "mae"}, weights={"gender": 5})
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if on_nonfinite not in ("error", "skip"):
        raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    net = _wrap_net(net, heads)
    heads = net.heads
    device = torch.device(device) if device is not None else _default_device()
    cluster = Cluster.from_env(device)
    if cluster.world > 1 and device.type == "cuda":
        device = torch.device("cuda", cluster.local_rank)
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
    table = datasets.columns_of(train, "train")
    input_name = datasets.input_column(table, heads, inputs)
    if isinstance(validation, float):
        table, val_table = datasets.split(table, validation, seed)
    else:
        val_table = None if validation is None else datasets.columns_of(validation, "validation")
    image_size = image_size or net.image_size
    encode = dict(
        image_size=image_size,
        on_bad=on_bad,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress and cluster.is_main,
    )
    train_data = datasets.encode(table, heads, input_name, **encode)
    val_data = datasets.encode(val_table, heads, input_name, **encode) if val_table is not None else None
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
            probe = next(datasets.Batches(train_data, 2, device, shuffle=False).epoch(0))[0]
            net(probe)
            net.train(was)
    for data_ in (train_data, val_data):
        if data_ is not None and device.type == "cuda":
            data_.__dict__.update(data_.to(device).__dict__)  # the whole set lives on the GPU
    if isinstance(augment, bool):
        augment = Augment() if augment else None

    # ---- objective ---------------------------------------------------------------------
    resolved = resolve(heads, losses, weights if isinstance(weights, Mapping) else None)
    _standardize(net, resolved, train_data)
    for name, loss in resolved.items():
        if loss.builtin and loss.kind.class_weights is not None:
            loss.class_weight = loss.kind.class_weight_vector(train_data.targets[name], train_data.labelled[name])
            if loss.class_weight is not None:
                loss.class_weight = loss.class_weight.to(device)
    normalizers = _trivial_losses(resolved, train_data) if normalize else None
    balancer = balancing.create(weights, resolved, normalizers).to(device)

    # ---- optimizer and schedule -----------------------------------------------------------
    trunk_params = [p for p in net.trunk.parameters()] if not net.outputs_dict else []
    trunk_ids = {id(p) for p in trunk_params}
    head_params = [p for p in net.parameters() if id(p) not in trunk_ids]
    groups = [{"params": head_params + list(balancer.parameters())}]
    if trunk_params:
        groups.append({"params": trunk_params, "lr": trunk_lr if trunk_lr is not None else lr})
    opt = _optimizer(optimizer, groups, lr, weight_decay)
    batches = datasets.Batches(
        train_data, batch_size, device, seed=seed, augment=augment, channels_last=channels_last,
        shard=(cluster.rank, cluster.world),
    )  # fmt: skip
    total_steps = epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, total_steps, warmup))
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
    autocast = (
        torch.autocast(device.type, dtype=PRECISIONS[precision]) if PRECISIONS[precision] else contextlib.nullcontext()
    )
    if channels_last:
        net.to(memory_format=torch.channels_last)
    model = cluster.wrap(net)
    step_model = torch.compile(model) if compile else model
    monitor_column, lower_better = _monitor(monitor, val_data is not None)

    # ---- state, possibly resumed -----------------------------------------------------------
    names = list(heads)
    rows: list[dict] = []
    best = {"score": None, "epoch": None, "state": None}
    start_epoch, start_step, partial = 0, 0, None
    run_dir = Path(run_dir) if run_dir is not None else None
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        balancer.load_state_dict(state["balancer"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        rows = json.loads(state["history"])
        best.update(score=state["best"]["score"], epoch=state["best"]["epoch"], state=state["best"]["state"])
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
                "best": {"score": best["score"], "epoch": best["epoch"], "state": best["state"]},
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
        outputs_seen: dict[str, list] = {n: [] for n in names}
        targets_seen: dict[str, list] = {n: [] for n in names}
        labelled_seen: dict[str, list] = {n: [] for n in names}
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
            stacked = torch.stack([head_losses[n].detach().float() for n in names])
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
            n_labelled = torch.stack([labelled[n] for n in names]).sum(dim=1)
            sums += stacked * n_labelled
            counts += n_labelled
            finite = torch.isfinite(stacked)
            first_bad = (bad_step < 0) & ~finite.all()
            bad_heads = torch.where(first_bad, ~finite, bad_heads)
            bad_step = torch.where(first_bad, step, bad_step)
            if train_metrics:
                for n in names:
                    outputs_seen[n].append(outputs[n].detach())
                    targets_seen[n].append(targets[n])
                    labelled_seen[n].append(labelled[n])
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
            if train_metrics and outputs_seen[n]:  # over all ranks' rows (every rank holds as many)
                mask = cluster.gather(torch.cat(labelled_seen[n]).to(torch.uint8)).bool()
                out = cluster.gather(torch.cat(outputs_seen[n]).float())[mask]
                for key, value in heads[n].metrics(out, cluster.gather(torch.cat(targets_seen[n]))[mask]).items():
                    row[f"train/{n}/{key}"] = value
        row["train/total/loss"] = total
        if val_data is not None:
            row.update(evaluate(net, val_data, resolved, current, batch_size=max(batch_size, 256), autocast=autocast))
        for n in names:
            row[f"weight/{n}"] = current[n]
        row["lr"] = scheduler.get_last_lr()[-1]
        row["seconds"] = time.perf_counter() - t0
        if on_nonfinite == "skip":
            row["skipped_nonfinite"] = nonfinite_skipped
        rows.append(row)
        score = row.get(monitor_column)
        if score is None:
            raise ValueError(f"monitor={monitor!r}: no history column {monitor_column!r}; columns: {sorted(row)}")
        improved = best["score"] is None or (score < best["score"] if lower_better else score > best["score"])
        if improved and not math.isnan(score):
            best.update(
                score=score, epoch=epoch + 1, state={k: v.detach().clone() for k, v in net.state_dict().items()}
            )
        if progress and cluster.is_main:
            print(_summary(row, names), flush=True)
        for callback in callbacks or []:
            if callback(row) is False:
                stop = True
        if patience is not None and best["epoch"] is not None and epoch + 1 - best["epoch"] > patience:
            stop = True
        save_checkpoint(epoch + 1, 0, torch.zeros_like(sums), torch.zeros_like(counts))
        if stop:
            break

    if best["state"] is not None:
        net.load_state_dict(best["state"])
    if cluster.world > 1:
        cluster.barrier()
    import pandas as pd

    history = pd.DataFrame(rows)
    result = TrainResult(
        net=net.eval(), history=history, losses=resolved, best_epoch=best["epoch"], monitor=monitor_column,
        skipped=bad, seed=seed,
    )  # fmt: skip
    if run_dir is not None and cluster.is_main:
        result.write(run_dir)
    return result


@torch.no_grad()
def evaluate(
    net: MultiHeadNet,
    data: datasets.Encoded,
    resolved,
    weights: Mapping[str, float] | None = None,
    *,
    batch_size: int = 256,
    autocast: Any = None,
    prefix: str = "val",
) -> dict[str, float]:
    """Loss and metrics per head (and the weighted total) over an encoded set, in one pass."""
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    outputs: dict[str, list] = {n: [] for n in net.heads}
    for x, _, _ in datasets.Batches(data, batch_size, device, shuffle=False).epoch(0):
        with autocast or contextlib.nullcontext():
            out = net(x)
        for n in net.heads:
            outputs[n].append(out[n].float())
    net.train(was)
    row: dict[str, float] = {}
    total = 0.0
    for n, head in net.heads.items():
        out = torch.cat(outputs[n])
        target, labelled = data.targets[n].to(device), data.labelled[n].to(device)
        loss = float(resolved[n](out, target, labelled)) if labelled.any() else float("nan")
        row[f"{prefix}/{n}/loss"] = loss
        row[f"{prefix}/{n}/labels"] = int(labelled.sum())
        for key, value in head.metrics(out[labelled], target[labelled]).items():
            row[f"{prefix}/{n}/{key}"] = value
        total += (weights or {}).get(n, 1.0) * (0.0 if math.isnan(loss) else loss)
    row[f"{prefix}/total/loss"] = total
    return row


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
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)
