"""manyheads.images.cache: build_cache's decode-once cache, in memory and in cache_dir, its keys and bad items."""

import io
import os
import warnings

import pytest
import torch
from PIL import Image

from conftest import bad_cases, picture, save
from manyheads import images
from manyheads.images import BadImageError, build_cache, load_rgb, looks_like_images
from manyheads.rows import BadRow


def count_decodes(monkeypatch):
    calls = []
    real = images.decoding.decode

    def counting(item, size, source=None):
        calls.append(item)
        return real(item, size, source)

    monkeypatch.setattr(images.decoding, "decode", counting)
    return calls


# ---- build_cache ----------------------------------------------------------------------------


def test_build_cache_error_and_skip(tmp_path):
    bad = bad_cases(tmp_path)
    good = [save(tmp_path / f"g{i}.png", picture(seed=i)) for i in range(2)]
    items = [good[0], tmp_path / "missing.jpg", good[1], tmp_path / "half.jpg", picture(seed=5), None]
    with pytest.raises(BadImageError, match="missing.jpg: file not found.*on_bad='skip'"):
        build_cache(items, 16, workers=1, progress=False)
    cache = build_cache(items, 16, workers=1, progress=False, on_bad="skip")
    assert cache.kept.tolist() == [0, 2, 4] and cache.images.shape == (3, 3, 16, 16)
    assert [(b.row, b.source, b.reason) for b in cache.bad] == [
        (1, str(tmp_path / "missing.jpg"), bad[tmp_path / "missing.jpg"].split(" (")[0]),
        (3, str(tmp_path / "half.jpg"), "truncated JPEG"),
        (5, "item 5", "missing value"),
    ]
    assert cache.bad[0].message == f"{tmp_path / 'missing.jpg'}: {bad[tmp_path / 'missing.jpg']}"
    for row, index in enumerate(cache.kept.tolist()):
        assert torch.equal(cache.images[row], load_rgb(items[index], 16))


def test_process_pool_matches_in_process(tmp_path):
    items = [str(save(tmp_path / f"{i}.png", picture(12, 10, seed=i))) for i in range(70)]
    items[10] = str(tmp_path / "nope.png")
    items[50] = str(tmp_path / "empty.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    serial = build_cache(items, 8, workers=1, progress=False, on_bad="skip")
    pooled = build_cache(items, 8, workers=2, progress=False, on_bad="skip")
    assert torch.equal(serial.images, pooled.images) and torch.equal(serial.kept, pooled.kept)
    assert [b.row for b in pooled.bad] == [10, 50] and pooled.bad == serial.bad
    with pytest.raises(BadImageError, match="on_bad='skip'"):
        build_cache(items, 8, workers=2, progress=False)


def make_files(tmp_path, n=4):
    return [save(tmp_path / f"f{i}.png", picture(20, 20, seed=i)) for i in range(n)]


def test_cache_is_reused_without_decoding(tmp_path, monkeypatch):
    files = make_files(tmp_path)
    items = files + [tmp_path / "missing.png"]
    first = build_cache(items, 16, cache_dir=tmp_path / "c", workers=1, progress=False, on_bad="skip")
    calls = count_decodes(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable numpy arrays
        second = build_cache(items, 16, cache_dir=tmp_path / "c", workers=1, progress=False, on_bad="skip")
    assert calls == []
    assert torch.equal(first.images, second.images) and torch.equal(second.kept, torch.tensor([0, 1, 2, 3]))
    missing = str(tmp_path / "missing.png")
    assert second.bad == first.bad == [BadRow(4, "file not found", f"{missing}: file not found", source=missing)]
    second.images[0] += 1  # copy-on-write: the file keeps the decoded pixels
    assert torch.equal(
        build_cache(items, 16, cache_dir=tmp_path / "c", progress=False, on_bad="skip").images, first.images
    )
    assert sorted(p.suffix for p in (tmp_path / "c").iterdir()) == [".json", ".npy"]


def test_a_cache_built_skipping_bad_items_still_refuses_them_under_error(tmp_path):
    items = make_files(tmp_path) + [tmp_path / "missing.png"]
    build_cache(items, 16, cache_dir=tmp_path / "c", workers=1, progress=False, on_bad="skip")
    with pytest.raises(BadImageError, match="missing.png: file not found.*on_bad='skip'"):
        build_cache(items, 16, cache_dir=tmp_path / "c", workers=1, progress=False)


@pytest.mark.parametrize("change", ["mtime", "content", "list", "size"])
def test_cache_rebuilds_on_change(tmp_path, monkeypatch, change):
    files = make_files(tmp_path)
    size = 16
    build_cache(files, size, cache_dir=tmp_path / "c", workers=1, progress=False)
    if change == "mtime":
        st = os.stat(files[1])
        os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "content":
        save(files[1], picture(20, 20, seed=99))
    elif change == "list":
        files = files[:3]
    else:
        size = 12
    calls = count_decodes(monkeypatch)
    cache = build_cache(files, size, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert len(calls) == len(files)
    assert torch.equal(cache.images, torch.stack([load_rgb(f, size) for f in files]))


def test_interrupted_build_leaves_no_valid_cache(tmp_path, monkeypatch):
    files = make_files(tmp_path)
    real = images.decoding.decode

    def dies_on_third(item, size, source=None):
        if str(item) == str(files[2]):
            raise KeyboardInterrupt
        return real(item, size, source)

    monkeypatch.setattr(images.decoding, "decode", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_cache(files, 16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert list((tmp_path / "c").iterdir()) == []  # temp files removed, nothing final written
    monkeypatch.setattr(images.decoding, "decode", real)

    # A killed process leaves temp files behind, and a torn final file must not be trusted either.
    expected = build_cache(files, 16, cache_dir=tmp_path / "c", workers=1, progress=False).images.clone()
    npy = next((tmp_path / "c").glob("*.npy"))
    (tmp_path / "c" / f"{npy.name}.123-abc.tmp").write_bytes(npy.read_bytes()[:500])
    npy.write_bytes(npy.read_bytes()[:1000])
    calls = count_decodes(monkeypatch)
    again = build_cache(files, 16, cache_dir=tmp_path / "c", workers=1, progress=False)
    assert len(calls) == 4 and torch.equal(again.images, expected)


def test_cache_dir_takes_arrays_keyed_by_their_pixels(tmp_path):
    arrays = [picture(seed=i) for i in range(3)]
    first = build_cache(arrays, 16, cache_dir=tmp_path, progress=False)
    (npy,) = tmp_path.glob("*.npy")
    inode = npy.stat().st_ino
    again = build_cache(arrays, 16, cache_dir=tmp_path, progress=False)
    assert torch.equal(first.images, torch.stack([load_rgb(a, 16) for a in arrays]))
    assert torch.equal(again.images, first.images) and list(tmp_path.glob("*.npy")) == [npy]  # one file, shared
    assert npy.stat().st_ino == inode  # the same pixels found cached: the file is kept, not written again
    build_cache(arrays[:2], 16, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npy"))) == 2 and not list(tmp_path.glob("*.tmp"))


def test_encoded_bytes_decode_as_their_files_and_cache_by_hash(tmp_path, monkeypatch):
    (tmp_path / "f").mkdir()
    files = make_files(tmp_path / "f", n=3)
    encoded = [f.read_bytes() for f in files]
    as_files = build_cache(files, 16, workers=1, progress=False).images
    hf_values = [{"bytes": encoded[0], "path": "a.png"}, {"bytes": None, "path": str(files[1])}, bytearray(encoded[2])]
    assert torch.equal(build_cache(hf_values, 16, workers=1, progress=False).images, as_files)
    cached = build_cache(encoded, 16, cache_dir=tmp_path / "c", workers=1, progress=False)
    calls = count_decodes(monkeypatch)
    assert torch.equal(build_cache(encoded, 16, cache_dir=tmp_path / "c", progress=False).images, cached.images)
    assert calls == [] and torch.equal(cached.images, as_files)  # keyed by the bytes' hash: not decoded again
    assert looks_like_images(encoded) and looks_like_images(hf_values)


def test_process_pool_decodes_bytes_as_in_process(monkeypatch):
    def png(seed):
        buffer = io.BytesIO()
        Image.fromarray(picture(12, 10, seed=seed)).save(buffer, format="PNG")
        return buffer.getvalue()

    items = [png(i) if i % 2 else {"bytes": png(i), "path": f"p{i}.png"} for i in range(70)]
    items[10] = b"broken"
    serial = build_cache(items, 8, workers=1, progress=False, on_bad="skip")
    calls = count_decodes(monkeypatch)
    pooled = build_cache(items, 8, workers=2, progress=False, on_bad="skip")
    assert calls == [], "bytes are decoded in the pool, not in this process"
    assert torch.equal(serial.images, pooled.images) and pooled.bad == serial.bad
    assert [(b.row, b.source, b.reason) for b in pooled.bad] == [(10, "item 10", "not an image")]


def test_truncated_bytes_are_bad_rows(tmp_path):
    whole = io.BytesIO()
    Image.fromarray(picture(64, 64)).save(whole, format="JPEG")
    cut, header = whole.getvalue()[: len(whole.getvalue()) // 2], whole.getvalue()[:30]  # in the pixels, the header
    cache = build_cache([whole.getvalue(), cut, header], 16, workers=1, progress=False, on_bad="skip")
    assert cache.kept.tolist() == [0] and [(b.row, b.source, b.reason) for b in cache.bad] == [
        (1, "item 1", "truncated JPEG"),
        (2, "item 2", "truncated image"),
    ]


def test_uint8_batches_at_the_training_size_are_used_without_a_copy():
    from manyheads.encoding import encode
    from manyheads.heads import Regression

    pictures = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    table = {"image": pictures, "y": [float(i) for i in range(6)]}
    encoded = encode(table, {"y": Regression()}, "image", image_size=16)
    assert encoded.inputs.data_ptr() == pictures.data_ptr()  # the user's tensor itself, not a copy
    other_size = encode(table, {"y": Regression()}, "image", image_size=8)  # resized: a new cache
    assert other_size.inputs.shape == (6, 3, 8, 8) and other_size.inputs.data_ptr() != pictures.data_ptr()
    assert images.ready_cache(pictures.float(), 16) is None
