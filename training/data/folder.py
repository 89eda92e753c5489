"""A user-supplied long test video stored as a folder of frames, streamed one frame at a time."""
import os
import re

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageError(ValueError, OSError):
    """An image file that cannot be read: one line naming the file and why. A ValueError (bad
    input), and an OSError as ``load_image`` raised before."""


def _reason(err: BaseException) -> str:
    """``err`` in one line (PIL's and numpy's messages may span several)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def natural_key(name):
    """Sort key putting "frame2.png" before "frame10.png"."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def load_image(path, channels=3):
    """Read an image file into a float32 tensor (channels, H, W) in [0, 1].

    Raises ``ImageError`` (a ValueError and an OSError), one line naming ``path`` and the
    reason, when the file is missing, unreadable, truncated, corrupt or not an image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):  # 16/32-bit integer grayscale
                arr = np.asarray(img, dtype=np.float32) / (65535.0 if img.mode.startswith("I;16") else 255.0)
                arr = arr[..., None].repeat(channels, axis=-1)
            else:
                arr = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
    except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError...
        raise ImageError(f"cannot read image file {path}: {_reason(e)}") from e
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] != channels or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"image file {path} decodes to an array of shape {arr.shape}, not (H, W, {channels})")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).clamp_(0, 1)


class FrameFolder:
    """Frames of a video in ``path`` (PNG/JPEG/..., natural name order), streamed lazily.

    Iterating yields float32 tensors (channels, H, W) in [0, 1], one decoded frame at a time;
    ``len()`` is the number of frames, ``folder[i]`` loads frame i. Every frame must have the
    size of the first one (ValueError naming the offending file otherwise).

    Construction validates cheaply, so a bad folder is refused before anything trains: the
    folder exists and is a directory (FileNotFoundError otherwise), can be listed (ValueError),
    holds at least one frame file of a supported extension (FileNotFoundError), and its first
    frame decodes to ``channels`` channels (``ImageError``, a ValueError, naming the file). Later
    frames are decoded when read; a corrupt one raises ``ImageError`` naming it.
    """

    def __init__(self, path, channels=3):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"frame folder not found: {path}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"frame folder {path} is a file, not a directory of frames")
        try:
            listed = os.listdir(path)
        except OSError as e:
            raise ValueError(f"frame folder {path} cannot be listed: {e.strerror or e}") from None
        names = [n for n in listed if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"no image frames ({'/'.join(IMAGE_EXTENSIONS)}) in folder {path}")
        self.path, self.channels = path, channels
        self.files = [os.path.join(path, n) for n in sorted(names, key=natural_key)]
        self._size = None
        first = load_image(self.files[0], channels)  # decodes, with the right channel count
        self._size = tuple(first.shape[1:])

    def __len__(self):
        return len(self.files)

    @property
    def size(self):
        """(H, W) of the first frame (read from its header)."""
        if self._size is None:
            try:
                with Image.open(self.files[0]) as img:
                    self._size = (img.height, img.width)
            except Exception as e:
                raise ImageError(f"cannot read image file {self.files[0]}: {_reason(e)}") from e
        return self._size

    def __getitem__(self, i):
        frame = load_image(self.files[i], self.channels)
        if tuple(frame.shape[1:]) != self.size:
            raise ValueError(f"frame {self.files[i]} has size {tuple(frame.shape[1:])}, "
                             f"expected {self.size} (size of {self.files[0]})")
        return frame

    def __iter__(self):
        for i in range(len(self.files)):
            yield self[i]
