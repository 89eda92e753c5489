"""Training data: degradations, synthetic camera-shake clips, Vimeo-90k septuplets, frame folders."""
from .degrade import SIGMA, TASKS, add_noise, bicubic_downsample, make_pair
from .folder import FrameFolder, ImageError, load_image, natural_key
from .synthetic import (CameraShake, Segment, SyntheticClips, distinct_frames_sequence, image_files, images,
                        long_sequence, render)
from .vimeo import Vimeo90kSeptuplets, read_list_file

__all__ = ["SIGMA", "TASKS", "add_noise", "bicubic_downsample", "make_pair", "FrameFolder", "ImageError", "load_image",
           "natural_key", "CameraShake", "Segment", "SyntheticClips", "distinct_frames_sequence", "image_files",
           "images", "long_sequence", "render", "Vimeo90kSeptuplets", "read_list_file"]
