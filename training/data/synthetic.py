"""Synthetic video clips needing no download: still images bundled with scikit-image, animated by
random camera-shake trajectories (Boracchi & Foi 2012, the paper's appendix G reference [67]).

- ``SyntheticClips``: a training Dataset of short clips (frames, C, size, size), deterministic per (seed, i).
- ``long_sequence``: a lazily generated long test video of moving / static segments and scene changes.
- ``distinct_frames_sequence``: n distinct frames in equal runs (appendix H).
"""
import functools
import math
import os
from collections import namedtuple

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .folder import load_image

# Images shipped inside the scikit-image wheel (read from skimage.data.data_dir, never fetched).
COLOR_IMAGES = {"astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "chelsea.png",
                "rocket": "rocket.jpg", "hubble_deep_field": "hubble_deep_field.jpg",
                "immunohistochemistry": "ihc.png", "motorcycle": "motorcycle_left.png"}
GRAY_IMAGES = {"camera": "camera.png", "brick": "brick.png", "grass": "grass.png",
               "gravel": "gravel.png", "moon": "moon.png", "coins": "coins.png"}


def image_files(channels=3):
    """{name: path} of the bundled images used: color ones for channels=3, color + gray for channels=1.
    Only files present in the installed package are listed."""
    table = dict(COLOR_IMAGES, **(GRAY_IMAGES if channels == 1 else {}))
    paths = {k: os.path.join(skimage.data.data_dir, f) for k, f in table.items()}
    return {k: p for k, p in paths.items() if os.path.isfile(p)}


@functools.lru_cache(maxsize=2)
def images(channels=3):
    """The bundled still images as float32 tensors (channels, H, W) in [0, 1], loaded once."""
    files = image_files(channels)
    if not files:
        raise FileNotFoundError(f"no bundled scikit-image data found in {skimage.data.data_dir}")
    return tuple(load_image(p, channels) for p in files.values())


class CameraShake:
    """Random camera trajectory with inertia, after Boracchi & Foi (2012): one position per frame.

    Position p and velocity v are 2-vectors (x, y) in pixels; p stays in the box [-bound, bound].
    Each ``step()``: v += speed * (accel * N(0, I) - centripetal * p / bound) (random acceleration and
    a pull towards the centre), with probability ``jump_prob`` an impulsive shake reverses the
    direction (+-0.5 rad) and jumps the position; |v| is renormalised to ``speed`` (at least
    0.5 px/frame, so frames always move); the position reflects on the box edges.
    Motion parameters are drawn from ``rng`` (a numpy Generator) unless given.
    """

    def __init__(self, rng, bound, start=None, speed=None, accel=None, centripetal=None, jump_prob=None):
        self.rng = rng
        self.bound = np.maximum(np.asarray(bound, dtype=np.float64), 1.0)
        self.speed = rng.uniform(0.5, 3.0) if speed is None else speed
        self.accel = rng.uniform(0.1, 0.6) if accel is None else accel
        self.centripetal = rng.uniform(0.0, 0.3) if centripetal is None else centripetal
        self.jump_prob = rng.uniform(0.0, 0.1) if jump_prob is None else jump_prob
        self.p = rng.uniform(-self.bound, self.bound) if start is None else np.array(start, dtype=np.float64)
        a = rng.uniform(0, 2 * math.pi)
        self.v = self.speed * np.array([math.cos(a), math.sin(a)])

    def step(self):
        """Advance one frame; return the new position (2,) as a numpy array (x, y)."""
        rng = self.rng
        self.v = self.v + self.speed * (self.accel * rng.standard_normal(2) - self.centripetal * self.p / self.bound)
        if rng.random() < self.jump_prob:  # impulsive shake
            a = math.pi + rng.uniform(-0.5, 0.5)
            c, s = math.cos(a), math.sin(a)
            self.v = np.array([c * self.v[0] - s * self.v[1], s * self.v[0] + c * self.v[1]])
            self.p = self.p + rng.uniform(1, 3) * self.v
        self.v = self.v * self.speed / max(np.linalg.norm(self.v), 1e-8)
        p = self.p + self.v
        for _ in range(2):  # reflect on the box (twice covers jumps up to 2 box widths)
            over, under = p > self.bound, p < -self.bound
            p = np.where(over, 2 * self.bound - p, np.where(under, -2 * self.bound - p, p))
            self.v = np.where(over | under, -self.v, self.v)
        self.p = np.clip(p, -self.bound, self.bound)
        return self.p.copy()


def shake_bound(img, size):
    """Half-range (x, y) of window offsets keeping a size x size window inside img (C, H, W)."""
    h, w = img.shape[-2:]
    return np.array([(w - size) / 2 - 1, (h - size) / 2 - 1])


def render(img, positions, size):
    """Sub-pixel crops by bilinear interpolation (``F.grid_sample``).

    img: (C, H, W); positions: (n, 2) offsets (x, y) of the window centre from the image centre,
    in pixels -> (n, C, size, size).
    """
    c, h, w = img.shape
    pos = torch.as_tensor(np.asarray(positions, dtype=np.float32)).reshape(-1, 1, 1, 2)
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    xy = torch.stack(torch.meshgrid(r, r, indexing="xy"), -1) + pos + torch.tensor([(w - 1) / 2, (h - 1) / 2])
    grid = (2 * xy + 1) / torch.tensor([w, h], dtype=torch.float32) - 1  # align_corners=False convention
    n = grid.shape[0]
    out = F.grid_sample(img[None], grid.reshape(1, n * size, size, 2), mode="bilinear",
                        padding_mode="reflection", align_corners=False)
    return out.reshape(c, n, size, size).transpose(0, 1).clamp_(0, 1)


class SyntheticClips(Dataset):
    """``num_clips`` clean clips (frames, channels, size, size) in [0, 1], item i deterministic given
    (seed, i): a random bundled image, a random camera-shake trajectory, random h/v flips.

    ``static_prob``: probability that a clip is static (its first frame repeated: a still scene,
    the risky case of appendices A and H); drawn from a stream of its own, so the moving clips
    are the same for every ``static_prob``.
    """

    def __init__(self, num_clips, frames=7, size=64, seed=0, channels=3, static_prob=0.0):
        if not 0.0 <= static_prob <= 1.0:
            raise ValueError(f"static_prob must be in [0, 1], got {static_prob!r}")
        self.num_clips, self.frames, self.size, self.seed, self.channels = num_clips, frames, size, seed, channels
        self.static_prob = static_prob
        self.images = images(channels)

    def __len__(self):
        return self.num_clips

    def __getitem__(self, i):
        if not 0 <= i < self.num_clips:
            raise IndexError(f"clip index {i} out of range [0, {self.num_clips})")
        rng = np.random.default_rng([self.seed, i])
        img = self.images[rng.integers(len(self.images))]
        shake = CameraShake(rng, shake_bound(img, self.size))
        clip = render(img, [shake.step() for _ in range(self.frames)], self.size)
        if self.static_prob > 0 and np.random.default_rng([self.seed, i, 0x57A]).random() < self.static_prob:
            clip = clip[:1].expand_as(clip)
        if rng.random() < 0.5:
            clip = clip.flip(-1)
        if rng.random() < 0.5:
            clip = clip.flip(-2)
        return clip.contiguous()


Segment = namedtuple("Segment", "index kind image start length scene_change")
Segment.__doc__ = """A segment of ``long_sequence``: kind "moving" or "static", ``image`` the index of the
source image in ``images(channels)``, frames [start, start + length), scene_change True when the
image changed at its start."""


def long_sequence(length, size=64, seed=0, static_segments=True, scene_changes=True, segment_length=(50, 300),
                  channels=3, static_prob=0.3, scene_change_prob=0.5, with_info=False):
    """Generator of ``length`` clean frames (channels, size, size) in [0, 1], produced one at a time.

    The video is a succession of segments of random length in ``segment_length`` (inclusive): moving
    camera-shake segments, static segments (one frame repeated; probability ``static_prob``) and,
    at segment boundaries with probability ``scene_change_prob``, scene changes (a different image,
    a new random position). Without a scene change the camera continues from where it stopped.
    Yields ``(frame, Segment)`` pairs when ``with_info``. Deterministic given the arguments.
    """
    lo, hi = segment_length
    if not 1 <= lo <= hi:
        raise ValueError(f"segment_length must satisfy 1 <= min <= max, got {segment_length}")
    imgs = images(channels)
    rng = np.random.default_rng([seed, 0x5E0])
    k = int(rng.integers(len(imgs)))
    pos, t, index = None, 0, 0
    while t < length:
        n = min(int(rng.integers(lo, hi + 1)), length - t)
        change = bool(index > 0 and scene_changes and len(imgs) > 1 and rng.random() < scene_change_prob)
        if change:
            k = (k + int(rng.integers(1, len(imgs)))) % len(imgs)
            pos = None
        kind = "static" if static_segments and rng.random() < static_prob else "moving"
        info = Segment(index, kind, k, t, n, change)
        shake = CameraShake(rng, shake_bound(imgs[k], size), start=pos)
        if kind == "static":
            frame = render(imgs[k], shake.p[None], size)[0]
            frames = (frame.clone() for _ in range(n))
        else:
            frames = (render(imgs[k], shake.step()[None], size)[0] for _ in range(n))
        for frame in frames:
            yield (frame, info) if with_info else frame
        pos, t, index = shake.p.copy(), t + n, index + 1


def distinct_frames_sequence(length, n_distinct, size=64, seed=0, channels=3):
    """Generator of ``length`` frames (channels, size, size) made of ``n_distinct`` distinct frames
    (random image, random crop position) in equal consecutive runs, as in appendix H: n=1 is one
    static scene, n=2 has one scene change in the middle, n=length is a succession of unrelated frames."""
    if not 1 <= n_distinct <= length:
        raise ValueError(f"n_distinct must be in [1, length={length}], got {n_distinct}")
    imgs = images(channels)
    rng = np.random.default_rng([seed, 0xD15])
    for j in range(n_distinct):
        img = imgs[rng.integers(len(imgs))]
        bound = shake_bound(img, size)
        frame = render(img, rng.uniform(-bound, bound)[None], size)[0]
        for _ in range((j + 1) * length // n_distinct - j * length // n_distinct):
            yield frame.clone()
