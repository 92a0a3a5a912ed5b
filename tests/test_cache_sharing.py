"""One image cache build per machine under torchrun: the local processes decode each image once between them.

The torchrun tests launch 2 processes on gloo's CPU side, as tests/test_distributed.py does; the
script below counts every real decode (in each process and its pool's children) in files, so
"once in all" is checked against what happened, not only against what the code reports.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from manyheads import distributed, images
from manyheads.distributed import LocalPeers
from manyheads.images import build_cache

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SRC = str(Path(__file__).resolve().parents[1] / "src")
N = 200  # small JPEGs: decoding them takes a fraction of a second
SIZE = 32

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    import numpy as np
    import torch
    from PIL import Image
    from manyheads import images

    out, plan = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ["LOCAL_RANK"])
    real = images.decoding.decode
    step = {"name": ""}


    def counted(item, size, source=None):  # a line per real decode, also from the pool's (forked) children
        with open(os.path.join(out, f"decodes-{step['name']}-{os.getpid()}.txt"), "a") as f:
            f.write("x\\n")
        time.sleep(plan.get("sleep", 0))
        return real(item, size, source)


    images.decoding.decode = counted
    if plan.get("process_group"):  # as mh.fit runs: the process group is up; the cache build does not use it
        torch.distributed.init_process_group("gloo")
    paths = sorted(str(p) for p in open(plan["list"]).read().split())
    inputs = {"paths": paths, "bad": paths[:51] + [plan["corrupt"]] + paths[51:100],
              "pil": [Image.open(p).convert("RGB") for p in paths]}
    results = {}
    for name, what, options in plan["builds"]:
        if rank in plan.get("leave_before", {}).get(name, []):
            break  # this process exits here: the others must not wait for it
        step["name"] = name
        os.environ["MANYHEADS_CACHE_BUILD"] = options.pop("mode", "split")
        started = time.monotonic()
        try:
            cache = images.build_cache(inputs[what], plan["size"], progress=False, **options)
        except images.BadImageError as e:
            results[name] = {"error": str(e)}
            continue
        pixels = np.ascontiguousarray(cache.images.numpy())
        results[name] = {"decoded": cache.decoded, "sha": hashlib.sha256(pixels.tobytes()).hexdigest(),
                         "kept": cache.kept.tolist(), "bad": [[b.row, b.message] for b in cache.bad],
                         "seconds": time.monotonic() - started}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[list[str], str]:
    """N random 48x40 JPEGs (sorted paths) and one truncated JPEG."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    whole = (folder / "000.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(whole[: len(whole) // 2])
    return sorted(str(folder / f"{i:03d}.jpg") for i in range(N)), str(folder / "corrupt.jpg")


def launch(tmp_path: Path, pictures, builds: list, **plan) -> tuple[list[str], dict]:
    """SCRIPT's torchrun command line (2 local processes, on gloo's CPU side) and its environment."""
    paths, corrupt = pictures
    (tmp_path / "list.txt").write_text("\n".join(paths))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "build.py").write_text(SCRIPT)
    plan = {"list": str(tmp_path / "list.txt"), "corrupt": corrupt, "size": SIZE, "builds": builds, **plan}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}  # fmt: skip
    return [*command, str(tmp_path / "build.py"), str(tmp_path), json.dumps(plan)], env


def torchrun(tmp_path: Path, pictures, builds: list, **plan) -> tuple[list[dict], dict[str, int]]:
    """Run SCRIPT's builds on 2 local processes: each rank's results, and the real decodes per build."""
    command, env = launch(tmp_path, pictures, builds, **plan)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)  # hangs fail here
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    decodes = {}
    for counts in tmp_path.glob("decodes-*.txt"):
        name = counts.name.split("-")[1]
        decodes[name] = decodes.get(name, 0) + len(counts.read_text().splitlines())
    return ranks, decodes


def single(items, **options):
    """What one process (no torchrun) builds: the pixels' hash, kept and bad rows."""
    cache = build_cache(items, SIZE, workers=1, progress=False, **options)
    sha = hashlib.sha256(np.ascontiguousarray(cache.images.numpy()).tobytes()).hexdigest()
    return {"sha": sha, "kept": cache.kept.tolist(), "bad": [[b.row, b.message] for b in cache.bad]}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, pictures):
    """One torchrun launch, several builds in turn (the process group up, as under mh.fit)."""
    tmp_path = tmp_path_factory.mktemp("shared")
    cache, other = str(tmp_path / "cache"), str(tmp_path / "other")
    builds = [
        ["first", "paths", {"cache_dir": cache}],
        ["again", "paths", {"cache_dir": cache}],
        ["pooled", "paths", {"cache_dir": other, "workers": 2}],  # 100 rows each: a pool of 2 per process
        ["temp", "paths", {}],
        ["pil", "pil", {}],  # no key before decoding: local rank 0 decodes, the other waits
        ["skip", "bad", {"cache_dir": cache, "on_bad": "skip"}],
        ["error", "bad", {"cache_dir": str(tmp_path / "errors")}],
        ["error_temp", "bad", {}],
        ["error_cached", "bad", {"cache_dir": cache}],  # built by "skip": read back, it still raises
        ["main", "paths", {"cache_dir": str(tmp_path / "main"), "mode": "main"}],
        ["each", "paths", {"cache_dir": str(tmp_path / "each"), "mode": "each"}],
        ["alone", "paths", {"mode": "main"}],  # local rank 1 has exited (below): rank 0 must not wait for it
    ]
    ranks, decodes = torchrun(tmp_path, pictures, builds, process_group=True, leave_before={"alone": [1]})
    return tmp_path, ranks, decodes


def test_two_processes_decode_each_image_once_into_one_file(shared_run, pictures):
    tmp_path, (rank0, rank1), decodes = shared_run
    reference = single(pictures[0])
    for name in ("first", "pooled"):
        assert decodes[name] == N and rank0[name]["decoded"] + rank1[name]["decoded"] == N, name
        assert rank0[name]["decoded"] == rank1[name]["decoded"] == N // 2  # rows rank::2
        for rank in (rank0, rank1):
            assert {k: rank[name][k] for k in reference} == reference, name  # as one process builds it
    assert "again" not in decodes and rank0["again"]["decoded"] == rank1["again"]["decoded"] == 0
    assert rank0["again"]["sha"] == reference["sha"] == rank1["again"]["sha"]
    for folder, sets in ((tmp_path / "cache", 2), (tmp_path / "other", 1)):  # cache: the paths, and "skip"'s set
        names = sorted(p.name for p in folder.iterdir())
        assert len(names) == 2 * sets and all(n.endswith((".npy", ".json")) for n in names), names  # no temp files


def test_without_cache_dir_the_processes_share_a_temp_folder_then_remove_it(shared_run, pictures):
    tmp_path, (rank0, rank1), decodes = shared_run
    assert decodes["temp"] == N and rank0["temp"]["decoded"] + rank1["temp"]["decoded"] == N
    reference = single(pictures[0])
    assert {k: rank0["temp"][k] for k in reference} == reference == {k: rank1["temp"][k] for k in reference}
    assert not list((tmp_path / "tmp").glob("manyheads-images-*"))  # removed once both had the file open


def test_items_without_a_key_are_decoded_once_by_local_rank_0(shared_run, pictures):
    _, (rank0, rank1), decodes = shared_run
    assert decodes["pil"] == N and (rank0["pil"]["decoded"], rank1["pil"]["decoded"]) == (N, 0)
    pil = [Image.open(p).convert("RGB") for p in pictures[0]]
    assert rank0["pil"]["sha"] == rank1["pil"]["sha"] == single(pil)["sha"]


def test_bad_images_give_every_process_the_same_record_or_the_same_error(shared_run, pictures):
    tmp_path, (rank0, rank1), decodes = shared_run
    paths, corrupt = pictures
    items = paths[:51] + [corrupt] + paths[51:100]  # row 51: local rank 1's, so rank 0 learns of it
    expected = single(items, on_bad="skip")
    assert expected["bad"] == [[51, f"{corrupt}: truncated JPEG"]]
    assert {k: rank0["skip"][k] for k in expected} == expected == {k: rank1["skip"][k] for k in expected}
    assert decodes["skip"] == len(items)
    with pytest.raises(images.BadImageError) as raised:
        build_cache(items, SIZE, workers=1, progress=False)
    for name in ("error", "error_temp", "error_cached"):  # the process that met it and the one that did not
        assert rank0[name] == rank1[name] == {"error": str(raised.value)}, name
        assert "on_bad='skip'" in rank0[name]["error"]
    assert list((tmp_path / "errors").iterdir()) == []  # the failed build's temp files are gone


def test_local_rank_0_decodes_everything_when_told(shared_run, pictures):
    _, (rank0, rank1), decodes = shared_run
    assert (rank0["main"]["decoded"], rank1["main"]["decoded"]) == (N, 0) and decodes["main"] == N
    assert rank0["main"]["sha"] == rank1["main"]["sha"] == single(pictures[0])["sha"]


def test_each_process_decodes_everything_when_told_and_both_publish_safely(shared_run):
    tmp_path, (rank0, rank1), decodes = shared_run
    assert rank0["each"]["decoded"] == rank1["each"]["decoded"] == N and decodes["each"] == 2 * N
    assert rank0["each"]["sha"] == rank1["each"]["sha"] == rank0["first"]["sha"]
    assert sorted(p.suffix for p in (tmp_path / "each").iterdir()) == [".json", ".npy"]  # one file, the other kept it


def test_a_call_the_other_process_does_not_make_is_built_alone(shared_run):
    """Local rank 1 exits before the last build (as ranks > 0 do before the CLI's test report): rank 0 goes on alone."""
    _, (rank0, rank1), decodes = shared_run
    assert "alone" not in rank1 and rank0["alone"]["decoded"] == decodes["alone"] == N
    assert rank0["alone"]["sha"] == rank0["first"]["sha"]
    assert rank0["alone"]["seconds"] < distributed.JOIN_TIMEOUT_S / 2  # it did not wait out the join timeout


def test_a_killed_shared_build_leaves_nothing_that_is_read(tmp_path, pictures):
    """SIGKILL the whole torchrun mid-build; the next build decodes everything again and is right."""
    paths, _ = pictures
    cache = tmp_path / "cache"
    command, env = launch(tmp_path, pictures, [["killed", "paths", {"cache_dir": str(cache)}]], sleep=0.02)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    run = subprocess.Popen(command, env=env, start_new_session=True, **quiet)  # its own group: torchrun and workers
    try:
        deadline = time.monotonic() + 400
        while len(list(tmp_path.glob("decodes-killed-*.txt"))) < 2:  # both processes are decoding
            assert run.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert list(cache.glob("*building*.tmp")) and not list(cache.glob("*.json"))  # killed mid-build
    again = build_cache(paths, SIZE, cache_dir=cache, workers=1, progress=False)
    assert again.decoded == N and torch.equal(again.images, build_cache(paths, SIZE, workers=1, progress=False).images)


@pytest.mark.parametrize("damage", ["no sidecar", "truncated", "stale building file"])
def test_leftovers_of_a_killed_build_are_rebuilt_not_trusted(tmp_path, pictures, damage):
    paths = pictures[0][:20]
    cache = tmp_path / "cache"
    expected = build_cache(paths, SIZE, cache_dir=cache, workers=1, progress=False).images.clone()
    (npy,) = cache.glob("*.npy")
    if damage == "no sidecar":  # killed between the rename and the sidecar
        npy.with_suffix(".json").unlink()
    elif damage == "truncated":
        npy.write_bytes(npy.read_bytes()[:3000])
    else:  # a whole building file from a killed build, with garbage where pixels would be
        npy.with_suffix(".json").unlink()
        building = images.cache._temp_paths(cache, SIZE, "123-deadbeef")[0]
        building.write_bytes(npy.read_bytes()[:200] + b"\xff" * (npy.stat().st_size - 200))
    again = build_cache(paths, SIZE, cache_dir=cache, workers=1, progress=False)
    assert again.decoded == len(paths) and torch.equal(again.images, expected)
    assert build_cache(paths, SIZE, cache_dir=cache, workers=1, progress=False).decoded == 0  # now trusted


# ---- LocalPeers without torchrun: threads as peers, on a store served here ----------------------


@pytest.fixture
def connect(monkeypatch):
    """Clients of a store served here; the environment torchrun gives local rank 0 of 2, its store one of them."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def client():
        return dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=30))

    own = client()
    monkeypatch.setattr(distributed, "_agent_store", lambda: own)
    monkeypatch.setattr(distributed, "_joins", distributed.Counter())
    monkeypatch.setattr(distributed, "_leaving", {"manyheads/0/node0"})  # no goodbye at exit: the server is gone
    for name, value in {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)
    yield client  # the server lives as long as this fixture


def test_peers_that_all_ask_agree_to_work_together_and_pass_values(connect):
    answers = []

    def peer():
        node = dist.PrefixStore("node0", connect())  # a client each, as each process has
        answers.append(distributed._agree(dist.PrefixStore("work/1", node), node, 2))

    threads = [threading.Thread(target=peer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert answers == [True, True]
    session = dist.PrefixStore("work/1", dist.PrefixStore("node0", connect()))
    LocalPeers(1, 2, session).send("part", {"bad": [[3, "a.jpg", "not an image"]]})
    assert LocalPeers(0, 2, session).receive("part", rank=1) == {"bad": [[3, "a.jpg", "not an image"]]}


def test_a_peer_that_never_asks_is_not_waited_for_past_the_join_timeout(connect, monkeypatch):
    monkeypatch.setattr(distributed, "JOIN_TIMEOUT_S", 0.3)
    started = time.monotonic()
    assert LocalPeers.join("work nobody else asks for") is None
    assert time.monotonic() - started < 5
    distributed._leave(dist.PrefixStore("manyheads/0/node0", distributed._agent_store()))  # a peer has exited
    monkeypatch.setattr(distributed, "JOIN_TIMEOUT_S", 60)
    started = time.monotonic()
    assert LocalPeers.join("more work") is None and time.monotonic() - started < 5  # at once, not after 60 s


def test_processes_holding_different_arrays_never_share_a_build():
    def picture(seed):
        return np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)

    def name(items):
        return images.cache._work_name(items, SIZE, None, None, "split")

    arrays, shard = [picture(i) for i in range(4)], [picture(0), picture(1), picture(2), picture(9)]  # one differs
    assert name([a.copy() for a in arrays]) == name(arrays)  # the same pictures: one build
    as_pil = [Image.fromarray(a) for a in arrays]
    assert len({name(arrays), name(shard), name(as_pil), name([Image.fromarray(a) for a in shard])}) == 4


def test_without_torchrun_nothing_is_shared(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert not LocalPeers.present() and LocalPeers.join("work") is None
    monkeypatch.setenv("MANYHEADS_CACHE_BUILD", "sometimes")
    with pytest.raises(ValueError, match="MANYHEADS_CACHE_BUILD must be one of split, main, each"):
        build_cache([np.zeros((4, 4, 3), np.uint8)], 4, progress=False)
