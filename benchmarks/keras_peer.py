"""A peer: Keras 3 (torch backend) training the same three-head MobileNetV2 on the same UTKFace subset.

Keras: ``keras.applications.MobileNetV2(include_top=False, weights=None, pooling="avg")`` plus
three Dense outputs, compiled with AdamW and per-output losses and metrics. manyheads:
``mh.MultiHeadNet("mobilenet_v2", heads)``. Same images (decoded once), same split, batch,
learning rate, weight decay and epochs; augmentation off on both sides. Each contender trains
``--epochs`` epochs in turn, for ``--rounds`` rounds; seconds per epoch after the first.

    pip install keras; python benchmarks/keras_peer.py --limit 1500
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # must precede the first import of keras

import common
import numpy as np
import torch

import manyheads as mh
from manyheads import images
from manyheads.datasets import UTKFACE_GENDERS, UTKFACE_RACES

WEIGHT_DECAY = 0.01  # torch's AdamW default; Keras's own default (0.004) is overridden to match


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--data", default=str(common.DEFAULT_UTKFACE), help="UTKFace folder (file names carry labels)")
    parser.add_argument("--limit", type=int, default=None, help="evenly spaced images to use (default 1500)")
    parser.add_argument("--validation", type=float, default=0.2, help="held-out fraction, the same rows for both")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 128)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per contender and round (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of Keras then manyheads (default 2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: Keras policy mixed_bfloat16 and mh precision='bf16'")  # fmt: skip
    parser.add_argument("--keras-age", choices=["standardized", "raw"], default="standardized",
                        help="Keras age targets: standardized by the training mean/std, as mh does inside its "
                             "age head (default), or raw years")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in dict(limit=24, size=32, batch=8, epochs=2, rounds=1, workers=1).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.limit = args.limit or 1500
    args.size = args.size or 128
    args.batch = args.batch or 64
    args.epochs = args.epochs or 3
    args.rounds = args.rounds or 2
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch of every run is discarded as warm-up")
    if not Path(args.data).is_dir():
        parser.error(f"UTKFace folder {args.data} not found; pass --data FOLDER")
    return args


def load(args: argparse.Namespace) -> dict:
    """Decode the subset once; split it; the arrays each side gets."""
    df = mh.datasets.utkface(args.data, limit=args.limit)
    cache = images.build_cache(df["image"].tolist(), args.size, workers=args.workers, progress=False, on_bad="skip")
    df = df.iloc[cache.kept.numpy()].reset_index(drop=True)
    order = np.random.default_rng(args.seed).permutation(len(df))
    held = max(1, int(round(len(df) * args.validation)))
    parts = {"train": np.sort(order[held:]), "val": np.sort(order[:held])}
    mean = torch.tensor(images.IMAGENET_MEAN).view(1, 1, 1, 3)
    std = torch.tensor(images.IMAGENET_STD).view(1, 1, 1, 3)
    out = {}
    for part, rows in parts.items():
        uint8 = cache.images[torch.as_tensor(rows)]
        sub = df.iloc[rows]
        out[part] = {
            # manyheads: the uint8 images and the label columns as a user has them
            "table": {
                "image": uint8,
                "age": sub["age"].tolist(),
                "gender": sub["gender"].tolist(),
                "race": sub["race"].tolist(),
            },  # fmt: skip
            # Keras: channels_last float32, /255 then ImageNet mean/std, as mh normalises on the device
            "x": ((uint8.permute(0, 2, 3, 1).float() / 255 - mean) / std).numpy(),
            "age": sub["age"].to_numpy(np.float32),
            "gender": (sub["gender"] == UTKFACE_GENDERS[1]).to_numpy(np.float32),
            "race": sub["race"].map(UTKFACE_RACES.index).to_numpy(np.int64),
        }
    return out


def keras_run(data: dict, args: argparse.Namespace, device: torch.device, seed: int) -> tuple[list[float], dict]:
    """Build, compile and fit the Keras model; seconds per epoch (validation included) and val metrics."""
    import keras

    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if args.precision == "bf16" else "float32")
    train, val = data["train"], data["val"]
    center, scale = float(train["age"].mean()), float(train["age"].std())
    if args.keras_age == "raw":
        center, scale = 0.0, 1.0

    def targets(part: dict) -> dict:
        return {"age": (part["age"] - center) / scale, "gender": part["gender"], "race": part["race"]}

    s = args.size
    base = keras.applications.MobileNetV2(input_shape=(s, s, 3), include_top=False, weights=None, pooling="avg")
    h = base.output
    outputs = {
        "age": keras.layers.Dense(1, name="age", dtype="float32")(h),
        "gender": keras.layers.Dense(1, activation="sigmoid", name="gender", dtype="float32")(h),
        "race": keras.layers.Dense(len(UTKFACE_RACES), activation="softmax", name="race", dtype="float32")(h),
    }
    model = keras.Model(base.input, outputs)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=args.lr, weight_decay=WEIGHT_DECAY),
        loss={"age": "mae", "gender": "binary_crossentropy", "race": "sparse_categorical_crossentropy"},
        loss_weights={"age": 1.0, "gender": 1.0, "race": 1.0},
        metrics={"age": ["mae"], "gender": ["accuracy"], "race": ["accuracy"]},
    )
    seconds: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = common.clock(device)

        def on_epoch_end(self, epoch, logs=None):  # Keras calls this after the epoch's validation
            seconds.append(common.clock(device) - self.t0)

    model.fit(
        train["x"], targets(train), batch_size=args.batch, epochs=args.epochs, shuffle=True,
        validation_data=(val["x"], targets(val)), callbacks=[EpochTimer()], verbose=0,
    )  # fmt: skip
    predicted = model.predict(val["x"], batch_size=256, verbose=0)
    age = np.asarray(predicted["age"], dtype=np.float64).reshape(-1) * scale + center
    metrics = {
        "age_mae": float(np.abs(age - val["age"]).mean()),
        "gender_acc": float(((np.asarray(predicted["gender"]).reshape(-1) > 0.5) == (val["gender"] > 0.5)).mean()),
        "race_acc": float((np.asarray(predicted["race"]).argmax(axis=1) == val["race"]).mean()),
    }
    keras.mixed_precision.set_global_policy("float32")
    return seconds, metrics


def mh_run(data: dict, args: argparse.Namespace, device: torch.device, seed: int) -> tuple[list[float], dict]:
    """mh.fit on the same rows; seconds per epoch (validation included) and the last epoch's val metrics."""
    torch.manual_seed(seed)
    heads = common.flagship_heads()
    net = mh.MultiHeadNet("mobilenet_v2", heads, pretrained=False, image_size=args.size)
    result = mh.fit(
        net, data["train"]["table"], validation=data["val"]["table"], losses={"age": "mae"}, epochs=args.epochs,
        batch_size=args.batch, lr=args.lr, weight_decay=WEIGHT_DECAY, augment=False, precision=args.precision,
        device=device, seed=seed, progress=False,
    )  # fmt: skip
    last = result.history.iloc[-1]
    metrics = {
        "age_mae": float(last["val/age/mae"]),
        "gender_acc": float(last["val/gender/accuracy"]),
        "race_acc": float(last["val/race/accuracy"]),
    }
    return result.history["seconds"].tolist(), metrics


def main(argv: list[str] | None = None) -> str:
    """Measure, print the Markdown section (append it with --write) and return it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"keras was imported with backend {keras.backend.backend()!r} before this script set torch")
    device = common.device_of(args.device)
    if device.type != ("cuda" if torch.cuda.is_available() else "cpu"):
        raise ValueError("Keras's torch backend picks CUDA whenever it is available; --device must match it")
    allocator_note = common.same_allocator(device)
    data = load(args)
    runs = {"keras": [], "mh": []}
    for r in range(args.rounds):  # Keras E epochs, manyheads E epochs, Keras, manyheads, ...
        for name, run in (("keras", keras_run), ("mh", mh_run)):
            seconds, metrics = run(data, args, device, args.seed + r)
            runs[name].append((seconds, metrics))
            print(
                f"round {r + 1}/{args.rounds} {name}: epochs {[round(s, 2) for s in seconds]} s, {metrics}", flush=True
            )

    per_epoch = {k: [s for seconds, _ in v for s in seconds[1:]] for k, v in runs.items()}
    n_train = len(data["train"]["age"])
    mh_median = common.median(per_epoch["mh"])
    labels = {"keras": f"Keras {keras.__version__} (torch backend) MobileNetV2", "mh": "manyheads mh.fit mobilenet_v2"}
    rows = []
    for k, label in labels.items():
        med = common.median(per_epoch[k])
        quality = {
            m: common.median([metrics[m] for _, metrics in runs[k]]) for m in ("age_mae", "gender_acc", "race_acc")
        }
        rows.append([
            label, med, f"{common.fmt(min(per_epoch[k]))}-{common.fmt(max(per_epoch[k]))}", n_train / med,
            med / mh_median, quality["age_mae"], quality["gender_acc"], quality["race_acc"],
        ])  # fmt: skip
    header = ["contender", "s/epoch (median)", "range", "train images/s", "ratio to mh", "val age MAE (years)",
              "val gender acc", "val race acc"]  # fmt: skip
    age_note = (
        "age targets standardized by the training mean/std (mh does this inside its age head), predictions mapped "
        "back to years"
        if args.keras_age == "standardized"
        else "age targets in raw years"
    )
    notes = [
        f"{len(data['train']['age'])} training and {len(data['val']['age'])} validation UTKFace images "
        f"(limit {args.limit}, seeded split), {args.size} px, batch {args.batch}, AdamW lr {args.lr:g} weight decay "
        f"{WEIGHT_DECAY}, {args.epochs} epochs per run (the first discarded from timing), {args.rounds} rounds, "
        f"precision {args.precision}, device {device}; augmentation off on both sides.",
        "Keras gets float32 NHWC arrays, /255 and ImageNet mean/std normalised once up front; "
        f"losses mae / binary_crossentropy / sparse_categorical_crossentropy, weights 1; {age_note}.",
        "manyheads gets the same uint8 images as an image column and normalises each batch on the device "
        "(/255, ImageNet mean/std); losses mae (on standardized age) / BCE / cross-entropy, weights 1; "
        "no dropout before the heads on either side (mh strips torchvision's classifier dropout; dropout= is 0).",
        "Epoch seconds include the epoch's validation pass on both sides (and Keras's and mh's training metrics). "
        "Validation metrics are after the last epoch, medians over rounds; Keras's MobileNetV2 uses batch-norm "
        "momentum 0.999 (torchvision 0.9), which from scratch makes its inference-mode statistics lag.",
        allocator_note,
    ]
    extra = f"keras {keras.__version__}"
    title = "Peer: Keras 3 vs manyheads, same three-head MobileNetV2"
    return common.publish(title, "keras_peer.py", argv, args, common.table(header, rows), notes, extra)


if __name__ == "__main__":
    main()
