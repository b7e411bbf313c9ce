"""Common image corruptions for robustness evaluation and adaptation: the ImageNet-C set (Hendrycks & Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019) at its five severities.

The corruptions themselves are the `imagecorruptions-imaug` package's (the `imagecorruptions` package of Michaelis et
al. 2019, which packages ImageNet-C's definitions for any image size without ImageMagick, kept working on current
numpy, scipy and scikit-image), installed by `pip install "wemoe[robustness]"`. This module names them, validates a
choice, and applies one to a PIL image deterministically:

- **Determinism.** Each image draws from its own seed, `image_seed(seed, task, row, name)`: the first 8 bytes of the
  BLAKE2b hash of the run's seed, the task, the image's row in its dataset and the corruption's name. The library
  draws from numpy's global generator (seeded with it for the call, then restored) and, for `impulse_noise` and
  `glass_blur`, from a generator it is given the seed for. So an image is corrupted the same way in every run, batch
  and process, in `wemoe-eval` and in `wemoe-tta` alike, and at every severity it gets the same random draw, only
  stronger.
- **Sizes.** The library takes any size from 32 px up, with ImageNet-C's constants, which are in pixels and were
  chosen for 224 px images: on a 32 px image a blur covers a larger part of the picture. Smaller images are padded
  to 32 px (mirrored at the bottom and right edges), corrupted and cropped back, so every corruption keeps its
  per-pixel definition. The result has the input's size and mode.
"""

import contextlib
import hashlib
import inspect
from collections.abc import Iterator
from functools import cache
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, field_validator

# The registry: ImageNet-C's 15 corruptions, then its 4 held-out ones, in the library's order; each is the function
# of that name in the library's `corruption_dict`.
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
)
# The seven the E-WEMoE paper reports (arXiv 2410.21804, its robustness table).
PAPER_CORRUPTIONS = (
    "motion_blur",
    "impulse_noise",
    "gaussian_noise",
    "pixelate",
    "spatter",
    "contrast",
    "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)
LIBRARY = "imagecorruptions-imaug"
INSTALL_COMMAND = 'pip install "wemoe[robustness]"'
# The library refuses images smaller than this on either side.
MIN_SIZE = 32


class CorruptionLibraryError(ImportError, ValueError):
    """The corruption library cannot be imported. A `ValueError` too, so the CLIs report it in one line, as any other
    bad input."""


def check_corruption_name(name: str, flag: str = "corruption") -> str:
    if name not in CORRUPTIONS:
        raise ValueError(f"{flag} {name!r} is not a known corruption; known: {', '.join(CORRUPTIONS)}.")
    return name


def check_severity(severity: Any, flag: str = "severity") -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"{flag} must be an integer from 1 to 5 (ImageNet-C's severities), got {severity!r}.")
    return severity


class Corruption(BaseModel):
    """One corruption at one severity, applied to every image of a task (`TaskData.corruption`).

    Args:
        name: one of `CORRUPTIONS` (ImageNet-C's names).
        severity: 1 (mildest) to 5.
        seed: the run's seed; each image's own is derived from it (`image_seed`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    severity: int
    seed: int = 0

    @field_validator("name")
    @classmethod
    def known_name(cls, name: str) -> str:
        return check_corruption_name(name)

    @field_validator("severity", mode="before")
    @classmethod
    def severity_in_range(cls, severity: Any) -> int:
        return check_severity(severity)

    @property
    def label(self) -> str:
        """`NAME-SEVERITY`, e.g. `motion_blur-3`: how results name the corrupted data."""
        return f"{self.name}-{self.severity}"

    def describe(self) -> str:
        return f"{self.name}, severity {self.severity} (seed {self.seed})"

    def apply(self, image: PILImage.Image, task: str, row: int) -> PILImage.Image:
        """`image`, row `row` of `task`'s dataset, corrupted: the same bytes every time for the same arguments."""
        return corrupt_image(image, self.name, self.severity, image_seed(self.seed, task, row, self.name))


@cache
def library() -> ModuleType:
    """The corruption library, or an error saying how to install it (and why an installed one does not import: its
    OpenCV needs the system's libGL, for one)."""
    try:
        import imagecorruptions
    except ImportError as error:
        raise CorruptionLibraryError(
            f"Corruptions need the {LIBRARY} package, which cannot be imported ({error}); install it with: "
            f"{INSTALL_COMMAND}"
        ) from None
    return imagecorruptions


def image_seed(seed: int, task: str, row: int, name: str) -> int:
    """The seed of one image's corruption: a hash of what identifies the image and the run, so it depends on neither
    batch order nor process count. Below 2**32, as numpy's global generator requires."""
    digest = hashlib.blake2b(f"{seed}\0{task}\0{row}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**32


@contextlib.contextmanager
def seeded_global_numpy(seed: int) -> Iterator[None]:
    """numpy's global generator seeded for the block, then put back as it was (the caller's draws are unaffected)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def corrupt_image(image: PILImage.Image, name: str, severity: int, seed: int) -> PILImage.Image:
    """`image` corrupted by the library's `name` at `severity`, its random draws seeded by `seed`; the size and mode
    of the input (worked on as 8-bit RGB, alpha kept)."""
    function = library().corruption_dict[check_corruption_name(name)]
    own_generator = {"seed": seed} if "seed" in inspect.signature(function).parameters else {}
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((0, max(0, MIN_SIZE - height)), (0, max(0, MIN_SIZE - width)), (0, 0)), "symmetric")
    with seeded_global_numpy(seed):
        corrupted = library().corrupt(padded, severity=check_severity(severity), corruption_name=name, **own_generator)
    result = PILImage.fromarray(np.ascontiguousarray(corrupted[:height, :width]))
    if image.mode != "RGB":
        result = result.convert(image.mode)
        if "A" in image.getbands():
            result.putalpha(image.getchannel("A"))
    return result


__all__ = [
    "CORRUPTIONS",
    "PAPER_CORRUPTIONS",
    "SEVERITIES",
    "Corruption",
    "CorruptionLibraryError",
    "corrupt_image",
    "image_seed",
]
