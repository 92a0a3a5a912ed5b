"""The training loop, written once: it serves the API, the command line, comparisons and torchrun.

Read :func:`fit` top to bottom: set-up (data, objective, optimizer, precision, the resumable
state), then for each epoch the steps (forward, loss, backward, step, record), the history
row, model selection and a checkpoint. The pieces live where they belong: the data stage in
:func:`manyheads.encoding.prepare`, autocast and the fp16 grad scaler in
:class:`~manyheads.precision.Precision`, the per-epoch loss sums in
:class:`~manyheads.metrics.EpochLosses`, the checkpoint in :class:`~manyheads.state.TrainingState`,
and everything about ranks in :class:`~manyheads.distributed.Cluster`.

    result = mh.fit(net, df, losses={"age": "mae"}, weights={"gender": 5}, epochs=10)
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manyheads import balancing, checkpoint, columns, encoding, streams
from manyheads import loggers as tracking  # fit's own `loggers` is the list of trackers
from manyheads import validation as validation_rules  # fit's own `validation` is the validation data
from manyheads.allocator import keep_freed_memory
from manyheads.distributed import Cluster
from manyheads.heads import Head
from manyheads.images import Augment
from manyheads.inference import calibrate as calibrate_net
from manyheads.inference import score
from manyheads.losses import fit_to_data, resolve, trivial_losses
from manyheads.metrics import EpochLosses, EpochOutputs
from manyheads.net import MultiHeadNet
from manyheads.optim import WeightAverage, build_optimizer
from manyheads.optim import schedule as lr_schedule
from manyheads.precision import Precision
from manyheads.result import TrainResult
from manyheads.rows import BadRow
from manyheads.selection import Selector
from manyheads.state import TrainingState


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
    steps_per_epoch: int | None = None,
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
    loggers: list[Any] | None = None,
    allow_unlabelled_heads: bool = False,
    calibration: Any = None,
    coverage: float = 0.9,
    interval: str = "adaptive",
    abstain: Mapping[str, float] | None = None,
) -> TrainResult:
    """Train every head of ``net`` jointly on ``train`` and return a :class:`TrainResult`.

        result = mh.fit(net, df, validation=0.15, losses={"age": "mae"}, weights={"gender": 5})

    Data and heads:
        net: a :class:`MultiHeadNet`, or any module returning a dict of outputs, with ``heads=``.
        train, validation: a dict of columns, a DataFrame or a Dataset of dicts; ``validation``
            may be a fraction of ``train`` (a seeded split). Rows missing a head's label (None,
            NaN, pd.NA) still train the other heads. Errors and ``result.skipped`` name rows of
            the table passed in: by position, or by index label for a DataFrame whose index is
            not the default ``0..n-1``. ``train`` may also be a stream, for data larger than the
            image cache (see :mod:`manyheads.streams`): WebDataset shards (a URL pattern such as
            ``"shards/{000000..000099}.tar"`` or ``mh.streams.from_webdataset(urls)``), a Hugging
            Face ``datasets.IterableDataset`` or a torch ``IterableDataset`` of dicts; ``validation``
            is then a table (or None), and ``steps_per_epoch`` says how many batches per process
            make an epoch. ``workers`` DataLoader processes decode the stream (default: the cores).
        inputs: the input column (default: the one column that is not a head).
        image_size, augment, cache_dir, workers: image columns are decoded once into a uint8
            cache (on disk under ``cache_dir``), then augmented (``augment=True`` or an
            :class:`~manyheads.images.Augment`) and normalised on the device.
        on_bad: ``"error"`` stops at a bad image or label naming it; ``"skip"`` drops and lists it.
        allow_unlabelled_heads: a head without a single labelled training row is refused (a
            ValueError naming it); True trains the other heads, with a warning (its loss is NaN).

    Objective:
        losses: per head, a registered name, a torch loss module or a callable ``(output, target)``.
        weights: per-head constant multipliers, or a balancing strategy name (``"uncertainty"``,
            ``"dwa"``, ``"gradnorm"``, ``"upgrad"``, ``"mgda"``, ... see :mod:`manyheads.balancing`).
        normalize: divide each head's loss by its loss under a constant predictor.
        on_nonfinite: ``"error"`` stops at a NaN/inf loss naming head and step; ``"skip"`` skips the batch.

    Optimisation:
        epochs, steps_per_epoch (streams only), batch_size, lr, optimizer (a name or a torch optimizer class),
        weight_decay, trunk_lr (a separate rate for the trunk), freeze_trunk_epochs, schedule (``"cosine"``,
        ``"onecycle"`` with ``warmup`` as the rising fraction and momentum cycled 0.95-0.85-0.95 as
        torch's ``OneCycleLR`` does, or None), precision (``"fp32"``, ``"bf16"``, ``"fp16"``),
        channels_last (None: on for named backbones), compile, device, seed.
        A final training batch of exactly one row is dropped each epoch (as ``drop_last`` would,
        for that case only): BatchNorm cannot normalise one row. Training data of one row is refused.
        ema: keep an exponential moving average of the weights with this decay per step (e.g.
            0.999); validation, selection and the returned net then use the average.

    Selection and records:
        monitor: the history column to pick the best epoch by (``"age/mae"``, default the total
            loss) or a mapping column -> weight for a weighted mix; patience: early stopping;
            keep_best_per_head: also keep each head's best weights (``result.net_for(head)``).
        train_metrics: per-head metrics on training batches too; progress: a bar per epoch.
        run_dir: write model, history, curves and checkpoints there (``checkpoint_every`` steps
            too); resume: continue the run in that folder where it stopped (refused when an
            option that matters differs from the run's, see :func:`manyheads.validation.check_resume`).
        callbacks: called with each epoch's history row; returning False stops training.
        loggers: experiment trackers by name (``"tensorboard"``, ``"mlflow"``, see :mod:`manyheads.loggers`)
            or objects with ``start``, ``log_epoch`` and ``finish``; only rank 0 logs, and a resume
            continues the trackers' run.

    Calibration (after training, on rows it did not train on; see :func:`manyheads.calibrate`):
        calibration: ``"validation"`` (the validation rows), a fraction of ``train`` held out for
            it (seeded), or a table of labelled rows; None (default): the net answers as trained.
        coverage, interval, abstain: the intervals' coverage (0.9) and kind (``"adaptive"`` or
            ``"plain"``), and per-head thresholds below which an answer is marked uncertain.
    """
    given = dict(locals())  # the arguments as passed: checked before any work, recorded in checkpoints
    validation_rules.check_fit_options(**given)
    stream = streams.of(train)  # None for a table
    validation_rules.check_data_options(stream is not None, steps_per_epoch=steps_per_epoch, validation=validation,
                                        calibration=calibration)  # fmt: skip
    net = _wrap_net(net, heads)
    heads, names = net.heads, list(net.heads)
    # losses and weights are checked before any (possibly long) image decoding
    resolved = resolve(heads, losses, weights if isinstance(weights, Mapping) else None)
    device, cluster = _join(device)
    saved, run_dir, seed = _resume_point(resume, run_dir, seed, cluster)
    torch.manual_seed(seed)
    train, calibration_rows = _calibration_rows(train, calibration, validation, seed)

    image_size = image_size or net.image_size
    options = validation_rules.options_record(
        **{name: given[name] for name in RECORDED}, image_size=image_size, inputs=inputs, seed=seed,
        heads={n: h.spec() for n, h in heads.items()}, losses={n: loss.name for n, loss in resolved.items()},
        validation=_fraction_or_table(validation), calibration=_fraction_or_table(calibration),
        **({"stream": stream.record(cluster.world, _stream_workers(workers))} if stream is not None else {}),
    )  # fmt: skip
    if saved is not None:  # a resume with other settings is refused before the (possibly long) data stage
        TrainingState.check_resumable(saved, options, ema is not None, run_dir)

    # ---- data: table -> encoded tensors, on the device when they fit; or a stream, read as it trains ----
    data = _prepare(
        train, stream, validation, heads, steps_per_epoch, inputs=inputs, seed=seed, image_size=image_size,
        on_bad=on_bad, cache_dir=cache_dir, workers=workers, progress=progress and cluster.is_main,
        warn=cluster.is_main, allow_unlabelled_heads=allow_unlabelled_heads,
    )  # fmt: skip
    _ready_net(net, data, device, image_size)
    data = data.on(device)

    # ---- objective, optimizer, schedule, precision -------------------------------------------
    amp = Precision.create(precision, device)
    balancer = _balancer(weights, resolved, data.stats, net, normalize, amp).to(device)
    opt, trunk_params = build_optimizer(
        net, optimizer, lr=lr, trunk_lr=trunk_lr, weight_decay=weight_decay, extra=list(balancer.parameters())
    )
    channels_last = _channels_last(channels_last, net, data.images)
    batches = data.batches(
        batch_size, device, seed=seed, augment=_augment(augment), channels_last=channels_last,
        shard=(cluster.rank, cluster.world), drop_single=True,
    )  # fmt: skip
    scheduler = lr_schedule(opt, schedule, epochs * len(batches), warmup)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    average = WeightAverage(net, ema) if ema is not None else None
    scored = average.module if average is not None else net  # what validation and selection see
    forward = _forward_pass(net, cluster.wrap(net), compile, balancer.needs_features and cluster.single)
    selector = Selector(monitor, data.validation is not None, heads=heads, per_head=keep_best_per_head)

    # ---- the resumable state: fresh, or where the run in run_dir stopped ----------------------
    state = TrainingState(net, opt, scheduler, balancer, selector, seed, average, options=options, device=device)
    if saved is not None:
        state.restore(saved)
    path = run_dir / checkpoint.NAME if run_dir is not None else None
    trackers = tracking.create(loggers, main=cluster.is_main)  # told the start, each epoch's row and the end

    def calibrate(best: MultiHeadNet) -> dict[str, dict[str, float]]:
        rows = data.validation if _is_validation(calibration) else calibration_rows
        settings = {"coverage": coverage, "interval": interval, "abstain": abstain, "inputs": data.input_column}
        return {} if rows is None else calibrate_net(best, rows, batch_size=batch_size, on_bad=on_bad, **settings)

    # ---- the loop ---------------------------------------------------------------------------
    run = tracking.Run(options, run_dir, resumed=saved is not None, epoch=state.epoch)
    with trackers.running(run):  # a run that raises is marked failed in the trackers, then the error goes on
        first, partial = state.step, state.partial  # a resumed run starts mid-epoch: at this step, with these sums
        for epoch in range(state.epoch, epochs):
            t0 = time.perf_counter()
            _start_epoch(state, epoch, trunk_params, frozen=epoch < freeze_trunk_epochs)
            tally = EpochLosses(names, device, epoch=epoch, steps=len(batches), partial=partial, main=cluster.is_main)
            seen = EpochOutputs(batches.rows_per_rank)
            bar = _Bar(len(batches), first, epoch, epochs, progress and cluster.is_main)
            for step, (x, targets, labelled) in enumerate(batches.epoch(epoch, first), start=first):
                with amp.autocast():
                    outputs, features = forward(x)
                    head_losses = {n: resolved[n](outputs[n], targets[n], labelled[n]) for n in names}
                values = tally.stack(head_losses)
                # one host sync per step, the price of skipping; summed so that all ranks skip alike
                if on_nonfinite == "skip" and cluster.any(~torch.isfinite(values)):
                    tally.skipped += 1
                    continue
                opt.zero_grad(set_to_none=True)
                balancer.backward(head_losses, features)
                state.advance(amp)  # optimizer (through the grad scaler under fp16), schedule, weight average
                tally.add(step, values, labelled)
                if train_metrics:
                    seen.add(outputs, targets, labelled)
                bar.update(tally)
                if _checkpoint_due(step, checkpoint_every, len(batches)):
                    totals = tally.partial(cluster.sum)  # every rank: the checkpoint holds all ranks' sums
                    cluster.on_main(state.save, path, epoch=epoch, step=step + 1, partial=totals)
            bar.close()
            tally.finish(cluster.sum)

            # ---- epoch end: history row, model selection, checkpoint ------------------------
            current = balancer.weights()
            row = {"epoch": epoch + 1, **_train_columns(tally, seen, heads, current, cluster)}
            row |= _validation_columns(scored, data.validation, resolved, current, batch_size, amp)
            row |= _epoch_columns(current, scheduler, t0, tally.skipped if on_nonfinite == "skip" else None)
            state.rows.append(row)
            trackers.log_epoch(row)
            selector.update(row, scored)
            if progress:
                cluster.on_main(print, _summary(row, names), flush=True)
            stop = _callbacks_stop(callbacks, row) or selector.should_stop(epoch + 1, patience)
            cluster.on_main(state.save, path, epoch=epoch + 1, step=0, partial=tally.cleared())
            if stop:
                break
            first, partial = 0, None

        result = _finish(state, scored, resolved, data.bad, cluster, run_dir, calibrate)
        trackers.finish(result)  # after the run folder is written: its files are the trackers' artifacts
    return result


# ---- set-up ----------------------------------------------------------------------------------

# fit's options a checkpoint records as given (with the resolved image_size, the given inputs, seed, heads,
# loss names and validation fraction); a resume that changes one that matters is refused
RECORDED = (
    "weights", "normalize", "epochs", "steps_per_epoch", "batch_size", "lr", "trunk_lr", "weight_decay", "optimizer",
    "schedule", "warmup", "freeze_trunk_epochs", "ema", "augment", "precision", "on_bad", "on_nonfinite", "monitor",
    "patience", "keep_best_per_head",
)  # fmt: skip


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


def _join(device: str | torch.device | None) -> tuple[torch.device, Cluster]:
    """The training device and the processes training together (torchrun's, or this one alone)."""
    device = torch.device(device) if device is not None else _default_device()
    cluster = Cluster.from_env(device)
    device = cluster.local_device(device)
    if device.type == "cpu":
        keep_freed_memory()  # activations are reused, not unmapped and faulted in again every step
    return device, cluster


def _resume_point(
    resume: str | Path | None, run_dir: str | Path | None, seed: int | None, cluster: Cluster
) -> tuple[dict | None, Path | None, int]:
    """(the checkpoint to resume from or None, the run folder, the seed); read first: the run's seed decides
    the split and the batches. Without a seed every rank takes rank 0's random one."""
    saved = None
    if resume is not None:
        run_dir = resume
        saved = checkpoint.load(Path(resume) / checkpoint.NAME)
        if seed is not None and saved.get("seed", seed) != seed:
            warnings.warn(f"resume: continuing with the run's seed {saved['seed']}, not seed={seed}", stacklevel=3)
        seed = saved.get("seed", seed)
    if seed is None:
        seed = cluster.agree(random.randrange(2**31))  # ranks must share the seed, or their shards overlap
    return saved, Path(run_dir) if run_dir is not None else None, seed


def _prepare(
    train: Any, stream: streams.Stream | None, validation: Any, heads: Mapping[str, Head], steps_per_epoch: int | None,
    **options: Any,
) -> encoding.Prepared | streams.PreparedStream:  # fmt: skip
    """The data stage: a table encoded once (:func:`encoding.prepare`), or a stream's statistics and validation."""
    if stream is None:
        return encoding.prepare(train, validation, heads, **options)
    return streams.prepare(stream, validation, heads, steps_per_epoch=steps_per_epoch, **options)


def _stream_workers(workers: int | None) -> int:
    """The DataLoader workers asked for a stream (None: the cores); 0 reads in this process, as one worker."""
    return max(1, streams.default_workers() if workers is None else workers)


def _ready_net(
    net: MultiHeadNet, data: encoding.Prepared | streams.PreparedStream, device: torch.device, image_size: int | None
) -> None:
    """Move the net to the device, record its image size, and materialise lazy head layers with one dry batch."""
    if data.images and net.image_size is None:
        net.image_size = image_size
    net.to(device)
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in net.modules()):
        with torch.no_grad():
            was = net.training
            net.eval()
            net(data.probe(device))
            net.train(was)


def _balancer(weights: Any, resolved, stats: Any, net: MultiHeadNet, normalize: bool, amp: Precision):
    """The losses fitted to the training targets' statistics (regression scales, class weights), combined by a
    balancer. ``stats`` has each head's ``targets`` and ``labelled`` flags: the table's, or a stream's sample."""
    targets, labelled = stats.targets, stats.labelled
    fit_to_data(resolved, targets, labelled, net.fit_target_scales(targets, labelled))
    normalizers = trivial_losses(resolved, targets, labelled) if normalize else None
    return balancing.create(weights, resolved, normalizers, scale=amp.grad_scale)


def _channels_last(channels_last: bool | None, net: MultiHeadNet, images: bool) -> bool:
    # named conv backbones run about 2x faster channels-last, on CPU and GPU alike
    return bool(net.backbone is not None and images) if channels_last is None else channels_last


def _augment(augment: Augment | bool | None) -> Augment | None:
    if isinstance(augment, bool):
        return Augment() if augment else None
    return augment


def _fraction_or_table(validation: Any) -> float | str | None:
    """What the options record says of ``validation``: its fraction, "table", or None."""
    return validation if validation is None or isinstance(validation, float) else "table"


def _forward_pass(
    net: MultiHeadNet, model: nn.Module, compiled: bool, features_too: bool
) -> Callable[[torch.Tensor], tuple[dict, torch.Tensor | None]]:
    """The step's forward pass ``x -> (outputs, features)``.

    Balancers that take gradients themselves need the trunk's shared features; only a
    MultiHeadNet whose trunk returns features, in one process, has them (else features are None).
    """
    if features_too and not net.outputs_dict:

        def with_features(x: torch.Tensor) -> tuple[dict, torch.Tensor]:
            features = net.features(x)
            return net.head_outputs(features), features

        return with_features
    step_model = torch.compile(model) if compiled else model
    return lambda x: (step_model(x), None)


# ---- the loop's pieces -------------------------------------------------------------------


def _start_epoch(state: TrainingState, epoch: int, trunk_params: list[nn.Parameter], frozen: bool) -> None:
    """Freeze or thaw the trunk, put the net in training mode and tell the balancer the past epochs' losses."""
    net = state.net
    frozen = frozen and bool(trunk_params)
    for p in trunk_params:
        p.requires_grad_(not frozen)
    net.train()
    if frozen:
        net.trunk.eval()  # keep pretrained normalisation statistics while the trunk is frozen
    names = list(net.heads)
    state.balancer.start_epoch(epoch, [{n: r[columns.name("train", n, "loss")] for n in names} for r in state.rows])


def _checkpoint_due(step: int, every: int | None, steps: int) -> bool:
    """Whether a mid-epoch checkpoint follows this step (the epoch's end writes its own)."""
    return bool(every) and (step + 1) % every == 0 and step + 1 < steps


class _Bar:
    """An epoch's progress bar with the running mean losses (rank 0, ``progress=True``; else it does nothing).

    Twice a second it refreshes, reading the losses back: also when a NaN is noticed early.
    """

    def __init__(self, total: int, initial: int, epoch: int, epochs: int, enabled: bool) -> None:
        self.bar = _progress(total, initial, epoch, epochs, enabled)
        self.last_refresh = time.perf_counter()

    def update(self, tally: EpochLosses) -> None:
        if self.bar is None:
            return
        if time.perf_counter() - self.last_refresh > 0.5:
            self.last_refresh = time.perf_counter()
            tally.check()
            self.bar.set_postfix({n: f"{v:.3g}" for n, v in zip(tally.names, tally.means())})
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_columns(
    tally: EpochLosses, seen: EpochOutputs, heads: Mapping[str, Head], current: Mapping[str, float], cluster: Cluster
) -> dict[str, Any]:
    """The history's train/<head>/... columns and the weighted train/total/loss."""
    row: dict[str, Any] = {}
    total = 0.0
    for i, (n, head) in enumerate(heads.items()):
        loss_value = tally.loss(i)
        row[columns.name("train", n, "loss")] = loss_value
        row[columns.name("train", n, "labels")] = tally.labels(i)
        total += current[n] * (0.0 if math.isnan(loss_value) else loss_value)  # a head without labels adds 0
        if seen:  # over all ranks' rows (every rank holds as many)
            out, target, mask = seen[n]
            mask = cluster.gather(mask.to(torch.uint8)).bool()
            out = cluster.gather(out.float())[mask]
            for key, value in head.metrics(out, cluster.gather(target)[mask]).items():
                row[columns.name("train", n, key)] = value
    row[columns.name("train", columns.TOTAL, "loss")] = total
    return row


def _validation_columns(
    scored: nn.Module, data: encoding.Encoded | None, resolved, current: Mapping[str, float], batch_size: int, amp
) -> dict[str, float]:
    """The history's val/... columns (none without validation data), computed as evaluation computes them."""
    if data is None:
        return {}
    return score(scored, data, resolved, current, batch_size=max(batch_size, 256), autocast=amp.autocast())


def _epoch_columns(current: Mapping[str, float], scheduler, t0: float, skipped: int | None) -> dict[str, Any]:
    """weight/<head>, lr, seconds, and skipped_nonfinite (with ``on_nonfinite="skip"``)."""
    row: dict[str, Any] = {columns.weight(n): w for n, w in current.items()}
    row["lr"] = scheduler.get_last_lr()[-1]
    row["seconds"] = time.perf_counter() - t0
    if skipped is not None:
        row["skipped_nonfinite"] = skipped
    return row


def _callbacks_stop(callbacks: list[Callable[[dict], Any]] | None, row: dict) -> bool:
    """Call every callback with the row; True if any returned False."""
    said = [callback(row) for callback in callbacks or []]  # a list, not any(...): every callback is called
    return any(answer is False for answer in said)


def _is_validation(calibration: Any) -> bool:
    return isinstance(calibration, str) and calibration == "validation"  # not == on a table: elementwise


def _calibration_rows(train: Any, calibration: Any, validation: Any, seed: int) -> tuple[Any, Any]:
    """(training rows, calibration rows or None): a fraction is held out of ``train`` by a seeded split.

    A DataFrame keeps its index, so errors still name the user's rows; rows of other tables are
    then named by their position among the rows kept for training (a Dataset's images stay lazy).
    """
    if _is_validation(calibration):
        if validation is None:
            raise ValueError("calibration='validation' needs validation rows: pass validation= (a fraction or a "
                             "table), or give calibration a fraction or a table of its own")  # fmt: skip
        return train, None
    if not isinstance(calibration, float):
        return train, calibration
    import pandas as pd

    seed += 1  # not the validation split's draw
    if isinstance(train, pd.DataFrame):
        kept, held = encoding.split_rows(len(train), calibration, seed)
        return train.iloc[kept], train.iloc[held]
    table = encoding.columns_of(train, "train")
    kept, held = encoding.split_rows(encoding.n_rows(table), calibration, seed)
    return encoding.take(table, kept), encoding.take(table, held)


def _finish(
    state: TrainingState, scored: nn.Module, resolved, bad: list[BadRow], cluster: Cluster, run_dir: Path | None,
    calibrate: Callable[[MultiHeadNet], dict],
) -> TrainResult:  # fmt: skip
    """The net at its best epoch (or the average), calibrated, the result, and the run folder written (rank 0)."""
    net, selector = state.net, state.selector
    if selector.state is not None or state.average is not None:
        net.load_state_dict(selector.state if selector.state is not None else scored.state_dict())
    calibrated = calibrate(net)
    cluster.barrier()
    import pandas as pd

    result = TrainResult(
        net=net.eval(), history=pd.DataFrame(state.rows), losses=resolved, best_epoch=selector.epoch,
        monitor=selector.name, skipped=bad, seed=state.seed,
        best_per_head=_best_per_head(selector, net, calibrate if calibrated else None), calibration=calibrated,
    )  # fmt: skip
    if run_dir is not None:
        cluster.on_main(result.write, run_dir)
    return result


def _best_per_head(selector: Selector, net: MultiHeadNet, calibrate: Callable[[MultiHeadNet], dict] | None) -> dict:
    """Each head's best epoch and weights (keep_best_per_head); with a calibration, also that head's net
    calibrated on those weights: a temperature fitted at another epoch does not fit them."""
    kept = {h: {"epoch": b["epoch"], "state": b["state"]} for h, b in selector.head_best.items()}
    for best in kept.values() if calibrate is not None else ():
        own = copy.deepcopy(net)
        own.load_state_dict(best["state"])
        best["calibration"], best["net"] = calibrate(own), own.eval()
    return kept


def _progress(total: int, initial: int, epoch: int, epochs: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)


def _summary(row: dict, names: list[str]) -> str:
    parts = [f"epoch {row['epoch']}"]
    for n in names:
        parsed = [columns.parse(k) for k in row]
        shown = [c for c in parsed if c and c[:2] == ("val", n) and c.metric not in ("loss", "labels")]
        bit = f"{n} {row[columns.name('train', n, 'loss')]:.4g}"
        if shown:
            bit += f" (val {shown[0].metric} {row[columns.name(*shown[0])]:.4g})"
        parts.append(bit)
    weights = {n: row[columns.weight(n)] for n in names if columns.weight(n) in row}
    if any(w != 1 for w in weights.values()):
        parts.append("weights " + " ".join(f"{n}={w:.3g}" for n, w in weights.items()))
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)
