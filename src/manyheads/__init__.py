"""manyheads: train one network on many targets at once.

import manyheads as mh
net = mh.MultiHeadNet("mobilenet_v2", {"age": mh.Regression(), "gender": mh.Binary(["male", "female"])})
result = mh.fit(net, df, losses={"age": "mae"}, weights={"gender": 5})
"""

from manyheads import datasets, streams
from manyheads.compare import compare
from manyheads.heads import Binary, Categorical, Distribution, Head, MultiLabel, Ordinal, Regression
from manyheads.inference import calibrate, evaluate
from manyheads.net import MultiHeadNet, load, set_coverage
from manyheads.reports import write_comparison
from manyheads.result import TrainResult
from manyheads.training import fit

__version__ = "0.1.0"

__all__ = [
    "Binary", "Categorical", "Distribution", "Head", "MultiHeadNet", "MultiLabel", "Ordinal", "Regression",
    "TrainResult", "calibrate", "compare", "datasets", "evaluate", "fit", "load", "set_coverage", "streams",
    "write_comparison",
]  # fmt: skip
