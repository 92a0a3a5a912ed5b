"""Checkpoints: atomic writes, kill-and-resume bit for bit, non-finite losses, and files that carry code."""

import json
import os
import pickle
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import manyheads as mh
from conftest import half_written_save
from manyheads import checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


def small_net(seed: int = 0) -> mh.MultiHeadNet:
    torch.manual_seed(seed)
    return mh.MultiHeadNet(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), {"y": mh.Regression(), "c": mh.Binary()})


def small_table(n: int = 48) -> dict:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    return {"x": x, "y": x.sum(1).tolist(), "c": (x[:, 0] > 0).long().tolist()}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- atomic writes --------------------------------------------------------------------------


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.NAME
    checkpoint.save(path, {"model": {"w": torch.ones(3)}, "step": 1})
    monkeypatch.setattr(torch, "save", half_written_save(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"model": {"w": torch.zeros(1000)}, "step": 2})
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert temp_files(tmp_path) == []


def test_temp_files_of_dead_writers_are_never_read_and_cleaned_up(tmp_path):
    path = tmp_path / checkpoint.NAME
    dead, alive = 4_194_304 + 17, os.getppid()  # above Linux's largest pid; our parent runs
    (tmp_path / f".{checkpoint.NAME}.{dead}-0badc0de.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f".{checkpoint.NAME}.{alive}-0badc0de.tmp").write_bytes(b"being written right now")
    checkpoint.save(path, {"model": {}, "step": 3})
    assert checkpoint.load(path)["step"] == 3
    assert temp_files(tmp_path) == [f".{checkpoint.NAME}.{alive}-0badc0de.tmp"]


def test_the_model_file_is_never_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    net = small_net()
    net(torch.zeros(2, 4))
    path = net.save(tmp_path / "model.safetensors")
    before = load_file(path)

    def crash_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("killed")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_halfway)
    other = small_net(seed=1)
    other(torch.zeros(2, 4))
    with pytest.raises(OSError, match="killed"):
        other.save(path)
    monkeypatch.undo()
    after = load_file(path)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert temp_files(tmp_path) == []
    assert mh.load(path, trunk=nn.Sequential(nn.Linear(4, 8), nn.Tanh())).heads.keys() == {"y", "c"}


# ---- kill and resume --------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    from torch import nn
    import manyheads as mh


    class Slow(nn.Module):
        # sleeps in training steps so the test can kill mid-epoch; changes no number
        delay = 0.0

        def forward(self, x):
            if self.training and self.delay:
                time.sleep(self.delay)
            return x


    def main(run_dir, mode, delay=0.0):
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(0)
        Slow.delay = float(delay)
        rng = np.random.default_rng(0)
        n = 64
        images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(n)]
        age = [float(a) if i % 5 else None for i, a in enumerate(rng.uniform(1, 80, n))]
        kind = [["x", "y", "z"][i % 3] if i % 7 else None for i in range(n)]
        trunk = nn.Sequential(Slow(), nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        heads = {"age": mh.Regression(), "kind": mh.Categorical(["x", "y", "z"])}
        net = mh.MultiHeadNet(trunk, heads, dropout=0.2)  # dropout and augmentation draw random numbers
        table = {"image": images, "age": age, "kind": kind}
        settings = dict(epochs=2, batch_size=8, image_size=16, schedule="cosine", checkpoint_every=2)
        settings.update(progress=False, workers=1)
        if mode == "resume":
            return mh.fit(net, table, resume=run_dir, **settings)  # no seed: the checkpoint has it
        return mh.fit(net, table, run_dir=run_dir, seed=3, **settings)


    if __name__ == "__main__":
        main(*sys.argv[1:])
    """
)


@pytest.fixture
def deterministic():
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(strict)


def test_killed_mid_epoch_and_resumed_gives_bit_identical_weights(tmp_path, deterministic):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(script), str(killed), "train", "0.25"], env=env)
    try:
        main = runpy.run_path(str(script))["main"]
        main(str(reference), "train")  # the uninterrupted run, while the child starts up
        deadline = time.monotonic() + 120
        while not ((killed / checkpoint.NAME).exists() and checkpoint.load(killed / checkpoint.NAME)["step"] > 0):
            assert child.poll() is None, "the training process ended before it could be killed"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint within 120 s"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    state = checkpoint.load(killed / checkpoint.NAME)
    assert state["epoch"] < 2 and state["step"] > 0  # killed mid-epoch, with a mid-epoch checkpoint
    assert not (killed / "model.safetensors").exists()

    resumed = main(str(killed), "resume")
    assert resumed.seed == 3
    expected, got = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the reference"
    losses = [c for c in resumed.history.columns if c.endswith(("/loss", "/labels"))]
    assert pd.read_csv(reference / "history.csv")[losses].equals(pd.read_csv(killed / "history.csv")[losses])
    assert temp_files(killed) == []


# ---- non-finite losses ------------------------------------------------------------------------


def nan_at_call(call: int):
    calls = []

    def loss(output, target):
        calls.append(1)
        value = (output - target).square().mean()
        return value * float("nan") if len(calls) == call else value

    return loss


def test_a_nan_loss_stops_naming_head_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"head\(s\) \['y'\] at epoch 1, step 3 of 6"):
        mh.fit(small_net(), small_table(), losses={"y": nan_at_call(3)}, batch_size=8, epochs=2, seed=0,
               progress=False, run_dir=run_dir, checkpoint_every=2)  # fmt: skip
    state = checkpoint.load(run_dir / checkpoint.NAME)
    assert (state["epoch"], state["step"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # without checkpoints the check runs at the epoch end, when every head is NaN: it still names "y" alone
    with pytest.raises(FloatingPointError, match=r"head\(s\) \['y'\] at epoch 1, step 3 of 6"):
        mh.fit(small_net(), small_table(), losses={"y": nan_at_call(3)}, batch_size=8, epochs=1, seed=0, progress=False)


def test_on_nonfinite_skip_drops_those_batches_and_counts_them():
    result = mh.fit(small_net(), small_table(), losses={"y": nan_at_call(3)}, batch_size=8, epochs=2, seed=0,
                    progress=False, on_nonfinite="skip")  # fmt: skip
    assert result.history["skipped_nonfinite"].tolist() == [1, 0]
    weights = result.net.state_dict().values()
    assert all(torch.isfinite(v).all() for v in weights if v.is_floating_point())
    assert result.history["train/y/loss"].notna().all()


# ---- files that carry code ------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_files(tmp_path: Path, marker: Path) -> list[Path]:
    as_zip = tmp_path / "zip" / checkpoint.NAME  # torch.save's format
    as_zip.parent.mkdir()
    torch.save({"model": Payload(marker)}, as_zip)
    raw = tmp_path / "raw" / checkpoint.NAME  # a plain pickle stream
    raw.parent.mkdir()
    raw.write_bytes(pickle.dumps({"model": Payload(marker)}))
    return [as_zip, raw]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    for path in malicious_files(tmp_path, marker):
        with pytest.raises(ValueError, match="refused to load.*could run code"):
            checkpoint.load(path)
        with pytest.raises(ValueError, match="refused to load"):
            mh.fit(small_net(), small_table(), resume=path.parent, epochs=1, progress=False)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is real: plain unpickling runs it
    assert marker.exists()


def test_a_pickle_posing_as_a_model_file_is_refused_and_a_real_one_round_trips(tmp_path):
    marker = tmp_path / "pwned"
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(ValueError, match="not a manyheads model file"):
        mh.load(fake)
    assert not marker.exists()

    net = small_net()
    net(torch.randn(3, 4))
    net.save(tmp_path / "real.safetensors")
    loaded = mh.load(tmp_path / "real.safetensors", trunk=nn.Sequential(nn.Linear(4, 8), nn.Tanh()))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    x = torch.randn(5, 4)
    assert net.predict(x) == loaded.predict(x)


def test_unreadable_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing to resume"):
        mh.fit(small_net(), small_table(), resume=tmp_path, epochs=1, progress=False)
    path = tmp_path / checkpoint.NAME
    checkpoint.save(path, {"model": {"w": torch.ones(100)}})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(path)


# ---- the options a resume must agree with ------------------------------------------------------


def halved_mae(output, target):
    return (output - target).abs() / 2


def test_a_checkpoint_records_fits_options_and_a_resume_that_changes_one_is_refused(tmp_path):
    run = tmp_path / "run"
    settings = dict(batch_size=8, seed=0, progress=False, losses={"y": halved_mae}, weights={"c": 2.0})
    mh.fit(small_net(), small_table(), epochs=1, lr=0.01, run_dir=run, **settings)
    state = checkpoint.load(run / checkpoint.NAME)
    assert set(state) == {"model", "optimizer", "scheduler", "balancer", "rng", "epoch", "step", "partial", "history",
                          "seed", "best", "spec", "options"}  # fmt: skip
    options = json.loads(state["options"])
    assert options["losses"] == {"y": "halved_mae", "c": "bce"} and options["weights"] == {"c": 2.0}
    assert (options["lr"], options["batch_size"], options["seed"], options["precision"]) == (0.01, 8, 0, "fp32")
    assert options["heads"]["c"]["kind"] == "binary" and options["optimizer"] == "adamw" and options["epochs"] == 1
    with pytest.raises(ValueError, match=r"trained with lr=0\.01; this call has lr=0\.02"):
        mh.fit(small_net(), small_table(), epochs=2, lr=0.02, resume=run, **settings)
    assert len(mh.fit(small_net(), small_table(), epochs=2, lr=0.01, resume=run, **settings).history) == 2


def test_a_resume_with_other_settings_is_refused_before_the_data_is_encoded(tmp_path, monkeypatch):
    run = tmp_path / "run"
    mh.fit(small_net(), small_table(), epochs=1, batch_size=8, seed=0, progress=False, run_dir=run)

    def never(*args, **kwargs):
        raise AssertionError("the data stage ran before the resume was checked")

    monkeypatch.setattr("manyheads.encoding.prepare", never)
    with pytest.raises(ValueError, match=r"trained with batch_size=8; this call has batch_size=16"):
        mh.fit(small_net(), small_table(), epochs=1, batch_size=16, progress=False, resume=run)
