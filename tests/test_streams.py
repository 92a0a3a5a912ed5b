"""Streaming: WebDataset shards and iterable data sets trained on without the image cache.

Shards written by ``manyheads shard`` train to the same targets and images as their table; processes
and DataLoader workers read disjoint shares that make up the set; a resumed run continues at its
step; a stream of a million generated samples trains in flat memory; a Hugging Face IterableDataset
trains, and a stream without ``steps_per_epoch`` is refused with the option named.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import manyheads as mh
from conftest import RACES, make_heads
from manyheads import checkpoint, encoding, shards, streams
from manyheads import images as imaging
from manyheads.cli import main
from manyheads.rows import RowError
from manyheads.validation import OptionError

pytest.importorskip("webdataset")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

SIZE = 16
CPU = torch.device("cpu")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny_net(trunk_first: nn.Module | None = None) -> mh.MultiHeadNet:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return mh.MultiHeadNet(nn.Sequential(*([trunk_first] if trunk_first else []), *layers), make_heads(),
                           image_size=SIZE)  # fmt: skip


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict:
    """100 small JPEG and PNG files of varied shapes, a CSV with partial labels, and its shards (7 of up to 16)."""
    folder = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(100):
        name = f"f{i:03d}.{'png' if i % 10 == 0 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (20 + i % 9, 18 + (7 * i) % 13, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file": name, "age": "" if i % 4 == 0 else 10 + i % 60, "gender": ["male", "female", ""][i % 3],
                     "race": ["a", "b", "c", ""][i % 5 % 4]})  # fmt: skip
    csv = folder / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = tmp_path_factory.mktemp("shards") / "faces"
    assert main(["shard", str(csv), "--image-column", "file", "--out", str(out), "--shard-size", "16", "--quiet"]) == 0
    table = mh.datasets.from_csv(csv, image_column="file")
    even = shards.write_shards(table, out.parent / "even", shard_size=10)  # 10 shards of 10
    return {"csv": csv, "out": out, "pattern": f"{out}/{{000000..000006}}.tar", "even": even.pattern, "table": table}


def test_shards_train_to_the_same_targets_and_images_as_their_table(faces):
    heads = make_heads()
    cached = encoding.encode(encoding.columns_of(faces["table"]), heads, "image", image_size=SIZE)
    stream = streams.from_webdataset(faces["pattern"], shuffle=0)
    data = streams.prepare(stream, None, heads, steps_per_epoch=10, image_size=SIZE, workers=0)
    seen = {}
    for batch in data.batches(10, CPU, seed=0).collated(0):  # 10 steps of 10 on one process: every sample once
        for i, key in enumerate(batch["keys"]):
            seen[int(key)] = batch["inputs"][i], {n: (batch["targets"][n][i], batch["labelled"][n][i]) for n in heads}
    assert sorted(seen) == list(range(100))  # keys are the table's rows
    for row, (image, targets) in seen.items():
        assert torch.equal(image, cached.inputs[row]), f"row {row}: the stream decoded another image than the cache"
        for name, (target, labelled) in targets.items():
            assert bool(labelled) == bool(cached.labelled[name][row]), (row, name)
            assert torch.equal(target, cached.targets[name][row]), (row, name)
    assert sum(not bool(cached.labelled["age"][r]) for r in range(100)) == 25  # partial labels stay partial
    # the targets' statistics come from the label index: every sample's labels, as the table's
    assert "label index" in data.stats.where and data.stats.rows == 100
    for name in heads:
        assert torch.equal(data.stats.labelled[name], cached.labelled[name])
        assert torch.equal(data.stats.targets[name], cached.targets[name])
    # on the device the batches are normalised as the cache's (no augmentation here)
    x, _, _ = next(data.batches(10, CPU, seed=0).epoch(0))
    first = next(data.batches(10, CPU, seed=0).collated(0))["keys"]
    assert torch.equal(x, imaging.normalize(cached.inputs[[int(k) for k in first]]))


def test_processes_and_workers_read_disjoint_shares_that_make_up_the_set(faces):
    stream = streams.from_webdataset(faces["pattern"])  # 7 shards of 16, 16, ..., 4 samples
    for processes, workers in ((1, 1), (2, 2), (3, 2)):
        assert stream.readers(processes, workers) == workers
        for epoch in (0, 1):
            readers = [streams.Reader(r, processes, w, workers) for r in range(processes) for w in range(workers)]
            keys = [sample["__key__"] for reader in readers for sample in stream.lap(epoch, 0, 5, reader)]
            assert len(keys) == len(set(keys)) == 100, (processes, workers, epoch)
    with pytest.raises(streams.StreamError, match="7 shards for 8 processes"):
        stream.readers(8, 1)

    # through the DataLoader: 2 processes (shard=(rank, 2)) of 2 worker processes each, 10 shards of 10 samples
    data = streams.prepare(streams.from_webdataset(faces["even"]), None, make_heads(), steps_per_epoch=5,
                           image_size=SIZE, workers=2)  # fmt: skip
    seen = {(epoch, rank): [batch["keys"] for batch in data.batches(10, CPU, shard=(rank, 2)).collated(epoch)]
            for epoch in (0, 3) for rank in (0, 1)}  # fmt: skip
    for epoch in (0, 3):
        keys = [key for rank in (0, 1) for batch in seen[epoch, rank] for key in batch]
        assert len(keys) == len(set(keys)) == 100, epoch
    assert seen[0, 0] != seen[3, 0]  # each epoch has its own order

    # a Hugging Face IterableDataset is split by datasets' split_dataset_by_node over the same readers
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"id": list(range(40))}).to_iterable_dataset(num_shards=4)
    stream = streams.from_hf(hf)
    readers = [streams.Reader(rank, 2, worker, 2) for rank in (0, 1) for worker in (0, 1)]
    ids = [row["id"] for reader in readers for row in stream.lap(2, 0, 7, reader)]
    assert sorted(ids) == list(range(40))


class Stop(Exception):
    """A crash, on purpose."""


class Recorder(nn.Module):
    """Records a hash of every training batch it sees; raises once it has seen ``stop_at`` of them (a crash)."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        self.seen, self.stop_at = [], stop_at

    def forward(self, x):
        if self.training:
            self.seen.append(hashlib.sha1(x.detach().contiguous().numpy().tobytes()).hexdigest())
            if len(self.seen) == self.stop_at:
                raise Stop(f"stopped at step {self.stop_at}")
        return x


def test_a_resumed_streaming_run_continues_with_the_batches_of_an_uninterrupted_run(faces, tmp_path, monkeypatch):
    monkeypatch.setattr(mh.TrainResult, "plot", lambda self, path=None: None)  # seconds of matplotlib, not tested here
    settings = dict(epochs=2, steps_per_epoch=5, batch_size=8, seed=3, workers=2, progress=False, checkpoint_every=3)
    full = Recorder()
    reference = mh.fit(tiny_net(full), faces["pattern"], **settings)
    stopped = Recorder(stop_at=9)  # the 9th step: epoch 2, step 4; the last checkpoint is at epoch 2, step 3
    with pytest.raises(Stop):
        mh.fit(tiny_net(stopped), faces["pattern"], run_dir=tmp_path / "run", **settings)
    state = checkpoint.load(tmp_path / "run" / checkpoint.NAME)
    assert (state["epoch"], state["step"]) == (1, 3)
    resumed_trunk = Recorder()
    resumed = mh.fit(tiny_net(resumed_trunk), faces["pattern"], resume=tmp_path / "run", **settings)
    assert stopped.seen == full.seen[:9]
    assert resumed_trunk.seen == full.seen[8:]  # the documented point: epoch 2, step 4 on, batch for batch
    for a, b in zip(reference.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    losses = [c for c in reference.history.columns if c.endswith(("/loss", "/labels"))]
    assert reference.history[losses].equals(resumed.history[losses])
    with pytest.raises(ValueError, match="stream="):  # other workers would read another order: refused
        mh.fit(tiny_net(), faces["pattern"], resume=tmp_path / "run", **{**settings, "workers": 1})


class Generated(torch.utils.data.IterableDataset):
    """``n`` small images made on the fly (never stored), with a regression and a class label; RSS every 500."""

    def __init__(self, n: int, size: int = 8) -> None:
        self.n, self.size, self.rss = n, size, []

    def __iter__(self):
        rng = np.random.default_rng(0)
        for i in range(self.n):
            if i % 500 == 0:
                self.rss.append(resident_mib())
            image = rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
            yield {"image": image, "age": float(image.mean()), "race": RACES[i % 3] if i % 7 else None}


def generated_net() -> mh.MultiHeadNet:
    """A small net for ``Generated``'s samples (8 px): an age and a race head, seeded: ``generated_net()``."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return mh.MultiHeadNet(trunk, {"age": mh.Regression(), "race": mh.Categorical(RACES)}, image_size=8)


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_a_million_sample_stream_trains_in_flat_memory():
    stream = Generated(1_000_000)
    result = mh.fit(generated_net(), stream, steps_per_epoch=300, epochs=1, batch_size=32, workers=0, progress=False)
    assert result.history["train/age/labels"].tolist() == [300 * 32]
    start = stream.rss[0]  # the first sample read: the statistics' (5000 samples), then training's
    assert max(stream.rss) - start < 200, f"resident memory grew from {start:.0f} to {max(stream.rss):.0f} MiB"


def test_a_hugging_face_iterable_dataset_trains_and_a_stream_needs_steps_per_epoch():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = [imaging_png(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)) for _ in range(40)]
    table = datasets.Dataset.from_dict({"image": images, "age": [float(i) if i % 3 else None for i in range(40)],
                                        "race": [i % 3 for i in range(40)]})  # fmt: skip
    table = table.cast_column("race", datasets.ClassLabel(names=RACES))
    iterable = table.to_iterable_dataset(num_shards=4)
    heads = {"age": mh.Regression(), "race": mh.Categorical(RACES)}
    torch.manual_seed(0)
    net = mh.MultiHeadNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), heads,
                          image_size=SIZE)  # fmt: skip
    result = mh.fit(net, iterable, steps_per_epoch=3, epochs=2, batch_size=8, workers=2, progress=False)
    assert len(result.history) == 2 and result.history["train/race/labels"].tolist() == [3 * 8] * 2
    assert 0 < result.history["train/age/labels"][0] < 3 * 8  # partial labels: the None ages do not count
    with pytest.raises(OptionError, match=r"The 'steps_per_epoch' parameter of fit must be an integer >= 1; got None "
                       r"\(a stream has no length: say how many steps make an epoch\)\.$"):  # fmt: skip
        mh.fit(net, iterable, epochs=1, progress=False)
    with pytest.raises(OptionError, match=r"The 'validation' parameter of fit must be a table of labelled rows"):
        mh.fit(net, iterable, validation=0.2, steps_per_epoch=3, progress=False)
    with pytest.raises(OptionError, match=r"The 'steps_per_epoch' parameter of fit must be None for a table"):
        mh.fit(net, {"image": images, "age": list(range(40)), "race": ["a"] * 40}, steps_per_epoch=3, progress=False)


class WithoutAges(Generated):
    """``Generated``'s samples with every age missing: a head that no sample labels."""

    def __iter__(self):
        for sample in super().__iter__():
            yield {**sample, "age": None}


def test_a_head_that_no_sample_labels_is_refused_or_if_allowed_the_others_train():
    net = generated_net()
    with pytest.raises(ValueError, match=r"head\(s\) \['age'\] have no labelled sample in the first samples of "
                       r"the stream \(60 samples\).*pass stats= a table of labels"):  # fmt: skip
        mh.fit(net, WithoutAges(60), steps_per_epoch=2, batch_size=8, workers=0, progress=False)
    with pytest.warns(UserWarning, match=r"head\(s\) \['age'\] have no labelled sample"):
        result = mh.fit(net, WithoutAges(60), steps_per_epoch=2, epochs=1, batch_size=8, workers=0, progress=False,
                        allow_unlabelled_heads=True)  # fmt: skip
    assert result.history["train/age/labels"].tolist() == [0]
    assert 0 < result.history["train/race/labels"][0] <= 2 * 8  # the other head trains


def imaging_png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_are_named_by_key_and_shard_or_skipped_and_listed(tmp_path):
    wds = pytest.importorskip("webdataset")
    rng = np.random.default_rng(1)
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path), encoder=False) as tar:
        for i in range(12):
            data = imaging_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            label = b'{"age": "abc"}' if i == 9 else b'{"age": %d}' % i
            tar.write({"__key__": f"s{i:02d}", "png": data[:40] if i == 5 else data, "json": label})
    heads = {"age": mh.Regression()}
    net = mh.MultiHeadNet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), heads,
                          image_size=SIZE)  # fmt: skip
    options = dict(epochs=1, steps_per_epoch=2, batch_size=6, workers=0, progress=False)
    with pytest.raises(RowError, match=r"head 'age', column 'age', row 's09' \(a sample of .*bad.tar\): .*'abc'"):
        mh.fit(net, streams.from_webdataset(str(path), shuffle=0), **options)  # met among the statistics' rows
    with pytest.raises(RowError, match=r"'s05' \(a sample of .*bad.tar\): not an image.*on_bad='skip'"):
        mh.fit(net, streams.from_webdataset(str(path), shuffle=0, stats=4), **options)  # met in training's batch 1
    with pytest.warns(UserWarning, match="skipping bad samples"):
        result = mh.fit(net, streams.from_webdataset(str(path), shuffle=0), on_bad="skip", **options)
    assert sorted(b.row for b in result.skipped) == ["s05", "s09"]
    assert result.history["train/age/labels"].tolist() == [10]
    with pytest.raises(TypeError, match="pass its shards' URLs instead"):  # manyheads splits the shards itself
        mh.fit(net, wds.WebDataset(str(path), shardshuffle=False), **options)


SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from torch import nn
    import manyheads as mh


    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            if self.training:
                self.seen.append(hashlib.sha1(x.detach().contiguous().numpy().tobytes()).hexdigest())
            return x


    torch.set_num_threads(1)
    torch.manual_seed(0)
    recorder = Recorder()
    trunk = nn.Sequential(recorder, nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]), "race": mh.Categorical(["a", "b", "c"])}
    net = mh.MultiHeadNet(trunk, heads, image_size=16)
    mh.fit(net, sys.argv[1], steps_per_epoch=3, epochs=1, batch_size=8, seed=1, workers=0, progress=False,
           train_metrics=False)
    with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as file:
        json.dump(recorder.seen, file)
    torch.distributed.destroy_process_group()
    """
)


def test_torchrun_processes_train_on_their_own_shares_of_the_shards(faces, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run([*command, faces["even"], str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = streams.prepare(streams.from_webdataset(faces["even"]), None, make_heads(), steps_per_epoch=3,
                           image_size=SIZE, workers=0)  # fmt: skip
    keys = []
    for rank in (0, 1):  # what rank r of 2 reads, simulated in this process: the batches it trained on, bit for bit
        batches = data.batches(8, CPU, seed=1, augment=imaging.Augment(), shard=(rank, 2))
        expected = [hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest() for x, _, _ in batches.epoch(0)]
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected, rank
        keys += [key for batch in batches.collated(0) for key in batch["keys"]]
    assert len(keys) == len(set(keys)) == 2 * 3 * 8  # the two processes read disjoint samples
