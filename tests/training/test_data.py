"""Tests of training.data: degradations, synthetic clips / long sequences, Vimeo-90k, frame folders."""
import inspect
import os

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (SIGMA, FrameFolder, SyntheticClips, Vimeo90kSeptuplets, add_noise, bicubic_downsample,
                           distinct_frames_sequence, image_files, images, long_sequence, make_pair)


# ---------------------------------------------------------------- degradations
def test_add_noise_statistics():
    clean = torch.full((4, 3, 64, 64), 0.5)
    noisy = add_noise(clean, generator=torch.Generator().manual_seed(0))
    assert noisy.shape == clean.shape and noisy.dtype == clean.dtype
    residual = noisy - clean
    assert abs(residual.mean().item()) < 2e-3
    assert abs(residual.std().item() - 30 / 255) < 2e-3
    assert SIGMA == pytest.approx(30 / 255)
    assert (add_noise(torch.ones(1, 3, 32, 32)) > 1).any()


def test_add_noise_seeded():
    clean = torch.rand(2, 3, 8, 8)
    a = add_noise(clean, 0.1, torch.Generator().manual_seed(3))
    b = add_noise(clean, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bicubic_downsample_shapes():
    x = torch.rand(2, 5, 3, 32, 48)
    y = bicubic_downsample(x)
    assert y.shape == (2, 5, 3, 16, 24) and 0 <= y.min() and y.max() <= 1
    assert bicubic_downsample(torch.rand(3, 16, 16), 4).shape == (3, 4, 4)
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(bicubic_downsample(flat), torch.full((1, 3, 8, 8), 0.3), atol=1e-5)
    with pytest.raises(ValueError):
        bicubic_downsample(torch.rand(3, 15, 16))


def test_make_pair():
    clean = torch.rand(2, 7, 3, 32, 32)
    inp, tgt = make_pair(clean, "denoise", SIGMA, torch.Generator().manual_seed(0))
    assert inp.shape == clean.shape and tgt is clean and not torch.equal(inp, clean)
    inp, tgt = make_pair(clean, "sr2")
    assert inp.shape == (2, 7, 3, 16, 16) and tgt is clean
    with pytest.raises(ValueError):
        make_pair(clean, "sr4")


# ---------------------------------------------------------------- synthetic
def test_bundled_images():
    assert len(image_files(3)) >= 4 and len(image_files(1)) > len(image_files(3))
    for img in images(3):
        assert img.dtype == torch.float32 and img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1
    assert all(img.shape[0] == 1 for img in images(1))


@pytest.mark.parametrize("channels", [3, 1])
def test_synthetic_clips(channels):
    ds = SyntheticClips(5, frames=7, size=32, seed=0, channels=channels)
    assert len(ds) == 5
    clip = ds[0]
    assert clip.shape == (7, channels, 32, 32) and clip.dtype == torch.float32
    assert 0 <= clip.min() and clip.max() <= 1
    assert torch.equal(clip, SyntheticClips(5, 7, 32, seed=0, channels=channels)[0])  # same seed, same clip
    assert not torch.equal(clip, SyntheticClips(5, 7, 32, seed=1, channels=channels)[0])
    assert not torch.equal(ds[0], ds[1])
    for i in range(len(ds)):  # frames move
        c = ds[i]
        assert all((c[t + 1] - c[t]).abs().max() > 1e-3 for t in range(6))
    with pytest.raises(IndexError):
        ds[5]


def test_synthetic_in_dataloader():
    loader = torch.utils.data.DataLoader(SyntheticClips(4, frames=3, size=16), batch_size=2)
    assert next(iter(loader)).shape == (2, 3, 3, 16, 16)


def test_long_sequence_lazy_segments():
    gen = long_sequence(1200, size=32, seed=0, with_info=True)
    assert inspect.isgenerator(gen)
    frames, infos = zip(*gen)
    assert len(frames) == 1200 and all(f.shape == (3, 32, 32) for f in frames)
    assert all(0 <= f.min() and f.max() <= 1 for f in frames)
    segments = sorted(set(infos))
    assert sum(s.length for s in segments) == 1200 and all(s.length <= 300 for s in segments)
    assert any(s.scene_change for s in segments)
    kinds = {s.kind for s in segments}
    assert kinds == {"static", "moving"}
    for s in segments:
        seg = frames[s.start:s.start + s.length]
        if s.kind == "static":
            assert all(torch.equal(seg[0], f) for f in seg)
        else:
            assert all(not torch.equal(a, b) for a, b in zip(seg, seg[1:]))
    # deterministic per seed
    again = list(long_sequence(1200, size=32, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(frames[::50], again[::50]))


def test_long_sequence_options():
    frames = list(long_sequence(100, size=16, seed=3, static_segments=False, scene_changes=False,
                                segment_length=(10, 20), with_info=True))
    assert len(frames) == 100
    infos = {info for _, info in frames}
    assert all(i.kind == "moving" and not i.scene_change for i in infos) and len({i.image for i in infos}) == 1
    first = next(long_sequence(10**9, size=16, seed=1))  # arbitrary length, nothing precomputed
    assert first.shape == (3, 16, 16)


def test_distinct_frames_sequence():
    frames = list(distinct_frames_sequence(10, 3, size=16, seed=0))
    assert len(frames) == 10
    runs = [0] + [i for i in range(1, 10) if not torch.equal(frames[i], frames[i - 1])]
    assert runs == [0, 3, 6]
    assert len(list(distinct_frames_sequence(5, 1, size=16))) == 5


# ---------------------------------------------------------------- Vimeo-90k
KEYS = ["00001/0001", "00002/0007"]


def _write_png(path, h=24, w=40, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture
def vimeo(tmp_path):
    root = tmp_path / "vimeo_septuplet"
    for s, key in enumerate(KEYS):
        d = root / "sequences" / key
        d.mkdir(parents=True)
        for k in range(1, 8):
            _write_png(d / f"im{k}.png", seed=10 * s + k)
    (root / "sep_trainlist.txt").write_text("\n".join(KEYS) + "\n")
    (root / "sep_testlist.txt").write_text(KEYS[1] + "\n\n")
    return root


def test_vimeo_standard_layout(vimeo):
    train = Vimeo90kSeptuplets(str(vimeo), "train", crop=16)
    assert len(train) == 2
    clip = train[0]
    assert clip.shape == (7, 3, 16, 16) and clip.dtype == torch.float32 and 0 <= clip.min() and clip.max() <= 1
    assert torch.equal(clip, train[0])  # deterministic per (seed, epoch, index)
    crops = {tuple(train[0].flatten()[:8].tolist())}
    for epoch in range(1, 6):
        train.set_epoch(epoch)
        crops.add(tuple(train[0].flatten()[:8].tolist()))
    assert len(crops) > 1
    test = Vimeo90kSeptuplets(str(vimeo), "test", crop=16)
    assert len(test) == 1
    full = torch.from_numpy(np.array(Image.open(vimeo / "sequences" / KEYS[1] / "im1.png"))).float() / 255
    assert torch.allclose(test[0][0], full[4:20, 12:28].permute(2, 0, 1))  # center crop of 24x40
    short = Vimeo90kSeptuplets(str(vimeo), "train", crop=8, frames=3)
    assert short[1].shape == (3, 3, 8, 8)
    assert Vimeo90kSeptuplets(str(vimeo), "test", crop=None)[0].shape == (7, 3, 24, 40)


def test_vimeo_meta_info(vimeo, tmp_path):
    meta = tmp_path / "meta_info_Vimeo90K_train_GT.txt"
    meta.write_text("".join(f"{k} 7 (24,40,3)\n" for k in KEYS))
    ds = Vimeo90kSeptuplets(str(vimeo), "train", crop=16, list_file=str(meta))
    assert ds.keys == KEYS and ds[1].shape == (7, 3, 16, 16)


def test_vimeo_missing_files(vimeo, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Vimeo90kSeptuplets(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no_list.txt"):
        Vimeo90kSeptuplets(str(vimeo), list_file=str(tmp_path / "no_list.txt"))
    os.remove(vimeo / "sep_testlist.txt")
    with pytest.raises(FileNotFoundError, match="sep_testlist.txt"):
        Vimeo90kSeptuplets(str(vimeo), "test")
    os.remove(vimeo / "sequences" / KEYS[1] / "im5.png")
    with pytest.raises(FileNotFoundError, match=r"1 listed image.*00002.0007.im5\.png"):
        Vimeo90kSeptuplets(str(vimeo), "train")
    (vimeo / "sep_trainlist.txt").write_text("00001/0001\n00003/0001\n")
    with pytest.raises(FileNotFoundError, match=r"7 listed image.*00003.0001.im1\.png"):
        Vimeo90kSeptuplets(str(vimeo), "train")


def test_vimeo_corrupt_image(vimeo):
    ds = Vimeo90kSeptuplets(str(vimeo), "test", crop=16)
    (vimeo / "sequences" / KEYS[1] / "im3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(OSError, match=r"im3\.png"):
        ds[0]


# ---------------------------------------------------------------- frame folders
def test_frame_folder(tmp_path):
    for i in [10, 2, 1]:
        _write_png(tmp_path / f"frame{i}.png", h=8, w=12, seed=i)
    (tmp_path / "notes.txt").write_text("not a frame")
    folder = FrameFolder(str(tmp_path))
    assert len(folder) == 3 and [os.path.basename(f) for f in folder.files] == ["frame1.png", "frame2.png",
                                                                                  "frame10.png"]
    it = iter(folder)
    assert inspect.isgenerator(it)
    frames = list(it)
    assert all(f.shape == (3, 8, 12) and f.dtype == torch.float32 for f in frames)
    expected = torch.from_numpy(np.array(Image.open(tmp_path / "frame2.png"))).float().permute(2, 0, 1) / 255
    assert torch.allclose(frames[1], expected)
    assert FrameFolder(str(tmp_path), channels=1)[0].shape == (1, 8, 12)
    _write_png(tmp_path / "frame11.png", h=10, w=12)
    with pytest.raises(ValueError, match=r"frame11\.png"):
        list(FrameFolder(str(tmp_path)))


def test_frame_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        FrameFolder(str(tmp_path / "missing_dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        FrameFolder(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    _write_png(tmp_path / "bad" / "0.png", h=8, w=8)
    (tmp_path / "bad" / "1.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=r"1\.png"):
        list(FrameFolder(str(tmp_path / "bad")))


def test_static_clips_repeat_one_frame_and_leave_moving_ones_unchanged():
    moving = SyntheticClips(12, frames=5, size=16, seed=3)
    mixed = SyntheticClips(12, frames=5, size=16, seed=3, static_prob=0.5)
    n_static = 0
    for i in range(12):
        clip = mixed[i]
        if torch.equal(clip, clip[:1].expand_as(clip)):
            n_static += 1
            assert torch.equal(clip[0], moving[i][0])  # the moving clip's first frame, held
        else:
            assert torch.equal(clip, moving[i])
    assert 0 < n_static < 12
    every = SyntheticClips(3, frames=4, size=16, static_prob=1.0)
    assert all(torch.equal(every[i], every[i][:1].expand(4, -1, -1, -1)) for i in range(3))
    with pytest.raises(ValueError, match="static_prob"):
        SyntheticClips(3, static_prob=1.5)
