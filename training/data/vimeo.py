"""Vimeo-90k septuplet dataset (Xue et al. 2019), standard layout, validated before training.

Layout: ``root/sequences/%05d/%04d/im1.png .. im7.png`` with ``root/sep_trainlist.txt`` and
``root/sep_testlist.txt`` (lines like ``00001/0001``). BasicSR / mmagic ``meta_info`` files
(lines like ``00001/0001 7 (256,448,3)``) are accepted through ``list_file``: the first token
of each line is the sequence key.
"""
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .folder import ImageError, load_image

SEPTUPLET = 7
LIST_FILES = {"train": "sep_trainlist.txt", "test": "sep_testlist.txt"}


def read_list_file(path):
    """Sequence keys ("00001/0001") from a sep_*list.txt or meta_info file (first token per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Vimeo-90k list file not found: {path}"
                                + (" (it is a directory)" if os.path.isdir(path) else ""))
    try:
        with open(path, encoding="utf-8") as f:
            keys = [line.split()[0] for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"Vimeo-90k list file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                         f"offset {e.start})") from None
    except OSError as e:
        raise ValueError(f"Vimeo-90k list file {path} cannot be read: {e.strerror or e}") from None
    if not keys:
        raise ValueError(f"Vimeo-90k list file {path} lists no sequence")
    return keys


class Vimeo90kSeptuplets(Dataset):
    """Clips of ``frames`` consecutive frames from Vimeo-90k septuplets.

    Item i -> float32 tensor (frames, 3, crop, crop) in [0, 1]: a random crop, random temporal
    window (if frames < 7) and random horizontal/vertical flips for split="train"; a center crop
    of the first ``frames`` frames for split="test" (crop=None keeps the full 256x448 frames).

    Randomness is a function of (seed, epoch, i), hence reproducible and worker-safe: call
    ``set_epoch(epoch)`` each epoch to draw new crops; seed=None uses torch's global RNG instead.

    Every listed sequence and its 7 images are checked to exist at construction (FileNotFoundError
    naming the first missing path and the number missing), and the first image of the first
    sequence is decoded (``ImageError`` naming it, or ValueError when ``crop`` is larger than it);
    a corrupt image raises ``ImageError`` (a ValueError and an OSError) naming it when loaded.
    """

    def __init__(self, root, split="train", crop=64, list_file=None, frames=SEPTUPLET, seed=0, flips=True):
        if split not in LIST_FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 1 <= frames <= SEPTUPLET:
            raise ValueError(f"frames must be in [1, {SEPTUPLET}], got {frames}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Vimeo-90k root directory not found: {root}")
        self.root, self.split, self.crop, self.frames = root, split, crop, frames
        self.seed, self.flips, self.epoch = seed, flips, 0
        self.list_file = list_file if list_file is not None else os.path.join(root, LIST_FILES[split])
        self.keys = read_list_file(self.list_file)
        self._validate()

    def _dir(self, key):
        return os.path.join(self.root, "sequences", *key.split("/"))

    def _validate(self):
        """Fast existence checks (one listdir per sequence, no decoding)."""
        names = [f"im{k}.png" for k in range(1, SEPTUPLET + 1)]
        missing = []
        for key in self.keys:
            d = self._dir(key)
            try:
                present = set(os.listdir(d))
            except (FileNotFoundError, NotADirectoryError):
                missing.extend(os.path.join(d, n) for n in names)
                continue
            missing.extend(os.path.join(d, n) for n in names if n not in present)
        if missing:
            raise FileNotFoundError(
                f"Vimeo-90k: {len(missing)} listed image(s) missing under {self.root} "
                f"(list {self.list_file}); first missing: {missing[0]}")
        first = os.path.join(self._dir(self.keys[0]), names[0])
        if not os.path.isfile(first):
            raise ImageError(f"Vimeo-90k image {first} is not a file")
        h, w = load_image(first, 3).shape[-2:]  # one decode: a folder of non-images is refused here
        if self.crop is not None and self.crop > min(h, w):
            raise ValueError(f"crop {self.crop} larger than the frames of {self._dir(self.keys[0])} ({h}x{w})")

    def set_epoch(self, epoch):
        """Change the random crops/flips drawn for each item (same seed, new epoch)."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        d = self._dir(self.keys[i])
        train = self.split == "train"
        if self.seed is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        else:
            rng = np.random.default_rng([self.seed, self.epoch, i])
        t0 = int(rng.integers(0, SEPTUPLET - self.frames + 1)) if train else 0
        clip = []
        for k in range(t0, t0 + self.frames):
            path = os.path.join(d, f"im{k + 1}.png")
            img = load_image(path, 3)
            if clip and img.shape != clip[0].shape:
                raise ValueError(f"{path} has shape {tuple(img.shape)}, expected {tuple(clip[0].shape)}")
            clip.append(img)
        clip = torch.stack(clip)  # (frames, 3, H, W)
        if self.crop is not None:
            h, w = clip.shape[-2:]
            if self.crop > min(h, w):
                raise ValueError(f"crop {self.crop} larger than the frames of {d} ({h}x{w})")
            if train:
                y, x = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
            else:
                y, x = (h - self.crop) // 2, (w - self.crop) // 2
            clip = clip[..., y:y + self.crop, x:x + self.crop]
        if train and self.flips:
            if rng.random() < 0.5:
                clip = clip.flip(-1)
            if rng.random() < 0.5:
                clip = clip.flip(-2)
        return clip.contiguous()
