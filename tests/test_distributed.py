"""Multi-process training: 2 processes with batch b train like 1 process with batch 2b (gloo on CPU)."""

import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from manyheads import encoding
from manyheads.distributed import Cluster

SRC = str(Path(__file__).resolve().parents[1] / "src")
TOLERANCE = 1e-6  # largest weight difference allowed, 2 processes vs 1 (measured: about 6e-8)


@pytest.mark.parametrize("n, batch, world", [(64, 8, 2), (50, 8, 2), (61, 4, 3)])
def test_the_shards_of_a_step_are_the_single_process_batch(n, batch, world):
    encoded = encoding.Encoded(torch.arange(n).float()[:, None], {}, {})
    single = encoding.Batches(encoded, batch * world, torch.device("cpu"), seed=7)
    shards = [encoding.Batches(encoded, batch, torch.device("cpu"), seed=7, shard=(r, world)) for r in range(world)]
    kept = n // world * world  # equal shares, as DistributedSampler(drop_last=True)
    assert all(len(s) == -(-kept // (batch * world)) for s in shards)  # len(single) - 1 when a dropped row spills
    for epoch in range(2):
        kept_rows = set(single.order(epoch)[:kept].tolist())
        for whole, *parts in zip(single.epoch(epoch), *(s.epoch(epoch) for s in shards)):
            assert len({len(x) for x, _, _ in parts}) == 1  # as many rows per rank: the gradient mean is exact
            rows = sorted(torch.cat([x for x, _, _ in parts]).flatten().tolist())
            assert rows == sorted(r for r in whole[0].flatten().tolist() if r in kept_rows)
        seen = torch.cat([torch.cat([x for x, _, _ in s.epoch(epoch)]).flatten() for s in shards])
        assert len(seen) == kept and len(set(seen.tolist())) == kept  # no row twice, none lost beyond equal shares


def test_a_single_process_is_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cluster = Cluster.from_env("cpu")
    assert (cluster.rank, cluster.world, cluster.is_main) == (0, 1, True)
    net = nn.Linear(2, 2)
    assert cluster.wrap(net) is net
    x = torch.arange(3.0)
    assert cluster.sum(x) is x and cluster.gather(x) is x and cluster.agree(5) == 5


SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from torch import nn
    import manyheads as mh
    from manyheads import checkpoint


    def table(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 6, generator=g)
        y = x @ torch.arange(6.0) + 0.1 * torch.randn(n, generator=g)
        c = [["a", "b", "c"][int(v)] for v in (x[:, 0] * 2).clamp(-1, 1).round() + 1]
        return {"x": x, "y": y.tolist(), "c": c}  # every row labelled for every head


    def main(out, global_batch):
        torch.set_num_threads(1)
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        saves = []
        real_save = checkpoint.save
        checkpoint.save = lambda path, state: saves.append((state["step"], state["partial"])) or real_save(path, state)
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        net = mh.MultiHeadNet(trunk, {"y": mh.Regression(), "c": mh.Categorical(["a", "b", "c"])})
        try:
            result = mh.fit(
                net, table(100, 1), validation=table(30, 2), epochs=3, batch_size=int(global_batch) // world, lr=0.01,
                seed=5, progress=False, run_dir=os.path.join(out, f"run{rank}"), checkpoint_every=2,
            )  # a run_dir per rank: any file in run1 would mean that rank 1 wrote
        finally:
            checkpoint.save = real_save
        history = result.history.to_dict("list")
        torch.save({"state": net.state_dict(), "history": history, "saves": saves}, os.path.join(out, f"rank{rank}.pt"))
        if world > 1:
            torch.distributed.destroy_process_group()


    if __name__ == "__main__":
        main(*sys.argv[1:])
    """
)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_train_like_one_process_with_double_batch(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*command, str(script), str(two), "16"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script))["main"](str(one), "16")
    finally:
        torch.set_num_threads(threads)

    single, rank0, rank1 = (
        torch.load(path, weights_only=True) for path in (one / "rank0.pt", two / "rank0.pt", two / "rank1.pt")
    )
    for key, value in single["state"].items():  # DDP keeps the ranks equal; both equal one process
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
        torch.testing.assert_close(rank0["state"][key], value, rtol=0, atol=TOLERANCE, msg=key)
    assert rank0["history"] == rank1["history"] | {"seconds": rank0["history"]["seconds"]}
    for column, values in single["history"].items():
        if column != "seconds":  # epoch losses are summed over ranks: they match the single process
            assert rank0["history"][column] == pytest.approx(values, rel=1e-5, abs=1e-6), column
    assert rank0["history"]["train/y/labels"] == [100] * 3  # 50 rows per rank, both counted
    assert rank1["history"]["val/y/labels"] == [30] * 3  # every rank evaluates the whole validation set

    assert rank1["saves"] == [] and not (two / "run1").exists()  # only rank 0 writes
    assert {"checkpoint.pt", "model.safetensors", "summary.json", "history.csv"} <= set(os.listdir(two / "run0"))
    assert any(step > 0 for step, _ in rank0["saves"])
    for step, partial in rank0["saves"]:
        if step > 0:  # a mid-epoch checkpoint holds both ranks' loss sums: step x 16 labelled rows per head
            assert partial["counts"].tolist() == [16.0 * step] * 2


def test_rank_logic_lives_on_the_cluster(monkeypatch):
    one = Cluster()
    assert one.single and one.on_main(lambda a, b=0: a + b, 1, b=2) == 3
    assert one.local_device("cuda") == torch.device("cuda")  # one process keeps the device it was given
    assert one.any(torch.tensor([False, True])) and not one.any(torch.zeros(3, dtype=torch.bool))
    second = Cluster(rank=1, world=2, local_rank=1)  # as torchrun's second process sees itself
    assert not second.single and not second.is_main and second.on_main(pytest.fail, "rank 1 ran it") is None
    assert second.local_device("cuda") == torch.device("cuda", 1) and second.local_device("cpu") == torch.device("cpu")
    from manyheads import runs

    for rank, main in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert Cluster.is_main_process() is main and runs.is_main() is main
    monkeypatch.delenv("RANK")
    assert Cluster.is_main_process() and runs.is_main()
