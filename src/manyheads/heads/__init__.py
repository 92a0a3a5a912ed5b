"""Head kinds: what each output of a multi-head net predicts, and everything that follows from it.

One kind per file, registered by name (``base.register``); ``base.Head`` is the interface each
kind answers (encoding, losses that suit it, metrics, answers, read-out, spec). The layers live
in :class:`manyheads.MultiHeadNet`.

    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]),
             "race": mh.Categorical(["White", "Black", "Asian", "Indian", "Others"])}
"""

from manyheads.heads.base import (
    REGISTRY,
    Classifier,
    Encoded,
    Head,
    head_from_spec,
    is_missing,
    register,
    row_error,
)
from manyheads.heads.binary import Binary
from manyheads.heads.categorical import Categorical
from manyheads.heads.distribution import Distribution
from manyheads.heads.multilabel import MultiLabel
from manyheads.heads.ordinal import Ordinal
from manyheads.heads.regression import Regression

__all__ = [
    "REGISTRY", "Binary", "Categorical", "Classifier", "Distribution", "Encoded", "Head", "MultiLabel",
    "Ordinal", "Regression", "head_from_spec", "is_missing", "register", "row_error",
]  # fmt: skip
