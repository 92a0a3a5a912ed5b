"""Quickstart: one network, three heads, each with its own loss, on generated images.

The Mathematica answer in Python: a regression head with an MAE override, a binary head
weighted 5 (``Scaled[5]``), and a categorical head with its default cross-entropy.

    python examples/quickstart.py
"""

from torch import nn

import manyheads as mh

df = mh.datasets.shapes(1500, size=48, seed=0)  # columns: image, size, filled, shape

trunk = nn.Sequential(  # any module mapping a batch to [B, D] features
    nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(),
)  # fmt: skip
net = mh.MultiHeadNet(
    trunk,
    {"size": mh.Regression(), "filled": mh.Binary(), "shape": mh.Categorical(mh.datasets.SHAPES)},
    image_size=48,
)
result = mh.fit(
    net,
    df,
    validation=0.2,
    losses={"size": "mae"},  # override the default "mse"
    weights={"filled": 5},  # Scaled[5]
    epochs=8,
    lr=3e-3,
    schedule="onecycle",
    seed=0,
)
print(result.losses)
print(result.history.filter(regex="^val/").tail(1).T)
print(net.predict(df["image"][:4].tolist()))
