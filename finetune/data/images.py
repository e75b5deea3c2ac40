"""Image files: decoding at the size the transforms need, upright as EXIF says, and a quick check of each file.

An image goes to the model in two stages (:class:`ImagePipeline`):

1. **decode** - the file becomes an upright RGB uint8 array of a *stored size*: without augmentation the centre
   crop of the image resized to ``resize_size`` (the weights' own preprocessing), or with it the whole image with
   its shorter side at most ``AUGMENT_ROOM`` times the crop size, so the random crop still finds detail. It is a
   fixed function of the file, so it can be cached, and it runs in decode threads (PIL releases the GIL while it
   decodes and resizes). A JPEG is decoded at the smallest DCT scale (libjpeg's 1/2, 1/4 or 1/8, PIL's ``draft``)
   whose shorter side still covers the stored size.
2. **finish** - the random transforms of ``data.augment`` (a preset: a random resized crop and flip, then
   TrivialAugment, RandAugment or AugMix), then float, normalisation (the weights' mean and std) and
   ``data.random_erasing``. It may draw random numbers, so it runs under the item's own seed
   (``utils.seeding.seeded``): in a decode thread, or in the main thread without them; the result is the same.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile
from torchvision import transforms
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as F

from finetune.config.schema import IMAGENET_MEAN, IMAGENET_STD  # the default of data.mean and data.std

# With data.augment the stored image keeps a shorter side of 1.5x the crop size (336 px for 224). A random
# resized crop then keeps full detail for every crop of at least a third of a 4:3 photo's area (~73% of
# RandomResizedCrop's crops) and upsamples the smallest (8% of the area) by at most 2x; a 12 MP photo still
# decodes at 1/8 scale (378 px), as without augmentation.
AUGMENT_ROOM = 1.5
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def augment_side(image_size: int) -> int:
    """The shorter side an image is stored at for a ``data.augment`` preset: room for the random resized crop."""
    return round(AUGMENT_ROOM * image_size)


@dataclass(frozen=True)
class ImagePipeline:
    """An image's way from file to model input: ``decode`` (cacheable) then ``finish`` (may be random).

    ``augment`` is a ``data.augment`` preset (``True``/``False`` mean ``light``/``none``), ``crop_scale`` the
    smallest share of the image a random crop keeps, ``hflip`` the probability of a horizontal flip, ``magnitude``
    the RandAugment magnitude and ``random_erasing`` the probability of erasing a random rectangle. ``resize_size``
    (the shorter side before the centre crop; None: ``image_size``), ``interpolation``, ``mean`` and ``std`` are the
    config's ``data`` keys, which default to the weights' own (:meth:`of`). Calling it on a PIL image runs both
    stages, as a torchvision transform would.
    """

    image_size: int
    augment: Union[str, bool] = "none"
    fast_decode: bool = True
    resize_size: Optional[int] = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    magnitude: int = 9
    random_erasing: float = 0.0
    crop_scale: float = 0.08
    hflip: float = 0.5

    @classmethod
    def of(cls, data, train: bool = False) -> "ImagePipeline":
        """The pipeline the config's ``data`` section describes: for the training split (``train``: its random
        transforms) or for evaluation."""
        random = dict(augment=data.augment, magnitude=data.magnitude, random_erasing=data.random_erasing,
                      crop_scale=data.crop_scale, hflip=data.hflip) if train else {}
        return cls(data.image_size, fast_decode=data.fast_decode, resize_size=data.resize_size,
                   interpolation=data.interpolation or "bilinear", mean=tuple(data.mean or IMAGENET_MEAN),
                   std=tuple(data.std or IMAGENET_STD), **random)

    def __post_init__(self):
        if isinstance(self.augment, bool):
            object.__setattr__(self, "augment", "light" if self.augment else "none")

    @property
    def resize_side(self) -> int:
        return self.resize_size or self.image_size

    @property
    def random(self) -> bool:
        """Whether :meth:`finish` draws random numbers (so it needs a seed, and its output cannot be cached)."""
        return self.augment != "none" or self.random_erasing > 0

    @property
    def decode_side(self) -> int:
        """The shorter side the decoded image must keep before it is resized to the stored size."""
        return augment_side(self.image_size) if self.augment != "none" else self.resize_side

    def stored_shape(self, upright: tuple[int, int]) -> tuple[int, int, int]:
        """(height, width, 3) of the decoded array for an image whose upright size is ``upright`` (w, h)."""
        if self.augment == "none":
            return self.image_size, self.image_size, 3
        width, height = upright
        short, long = sorted((width, height))
        if short > self.decode_side:  # torchvision's Resize(side) rule; smaller images are kept as they are
            short, long = self.decode_side, int(self.decode_side * long / short)
        return (short, long, 3) if height <= width else (long, short, 3)

    def decode(self, path: str) -> np.ndarray:
        """The file at ``path`` as an upright RGB uint8 array (H, W, 3) of :meth:`stored_shape`.

        Raises what PIL raises for a file it cannot read.
        """
        with open(path, "rb") as f:
            image = Image.open(f)
            full = image.size
            if self.fast_decode:
                draft(image, self.decode_side)
            image.load()
            upright = full[::-1] if _orientation(image) in _ROTATED else full
            image = to_upright_rgb(image)
        return self._resize(image, upright)

    def finish(self, image: np.ndarray) -> torch.Tensor:
        """A decoded array -> the normalised float tensor (3, image_size, image_size) the model sees."""
        if self.augment != "none":  # on a PIL image, as torchvision's classic pipeline does: PIL's C code
            augmentation = _augmentation(self.image_size, self.augment, self.magnitude, self.crop_scale, self.hflip,
                                         self.interpolation)
            image = np.array(augmentation(Image.fromarray(image)))
        tensor = _to_model(self.mean, self.std)(torch.from_numpy(image).permute(2, 0, 1))
        return _erasing(self.random_erasing)(tensor) if self.random_erasing else tensor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        return self.finish(self._resize(image, image.size))

    def _resize(self, image: Image.Image, upright: tuple[int, int]) -> np.ndarray:
        mode = InterpolationMode(self.interpolation)
        if self.augment != "none":
            height, width, _ = self.stored_shape(upright)
            image = F.resize(image, [height, width], interpolation=mode)
        else:  # exactly torchvision's Resize + CenterCrop, so a full decode gives the classic pipeline's pixels
            image = F.center_crop(F.resize(image, self.resize_side, interpolation=mode), self.image_size)
        return np.array(image)  # a writable copy: torch.from_numpy shares it


# The preset's own transform after the random resized crop and flip of ``light``, as torchvision's reference
# training recipes (and timm's --aa) put it; torchvision's defaults otherwise (AugMix: severity 3, width 3).
_PRESETS = {
    "light": lambda magnitude: [],
    "trivialaugment": lambda magnitude: [v2.TrivialAugmentWide()],
    "randaugment": lambda magnitude: [v2.RandAugment(magnitude=magnitude)],
    "augmix": lambda magnitude: [v2.AugMix()],
}


@functools.lru_cache(maxsize=None)
def _augmentation(image_size: int, preset: str, magnitude: int, crop_scale: float, hflip: float,
                  interpolation: str) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(image_size, scale=(crop_scale, 1.0),
                                            interpolation=InterpolationMode(interpolation)),
                       v2.RandomHorizontalFlip(hflip), *_PRESETS[preset](magnitude)])


@functools.lru_cache(maxsize=None)
def _erasing(p: float) -> v2.RandomErasing:
    # On the normalised tensor, as timm does (--reprob), erasing to 0: the mean colour after normalisation.
    return v2.RandomErasing(p=p, value=0)


@functools.lru_cache(maxsize=None)
def _to_model(mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    # ConvertImageDtype divides by 255 as ToTensor does (v2's ToDtype multiplies by 1/255: not bit-identical).
    return transforms.Compose([transforms.ConvertImageDtype(torch.float32), transforms.Normalize(mean, std)])


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as shown upright, from the header and the EXIF orientation, without decoding pixels."""
    width, height = image.size
    return (height, width) if _orientation(image) in _ROTATED else (width, height)


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # PIL would decode the whole PNG to look for an eXIf chunk after the pixels
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def draft(image: Image.Image, side: int) -> None:
    """Ask a JPEG to decode at the smallest DCT scale whose shorter side is still >= ``side``; others unchanged."""
    if isinstance(image, JpegImageFile):
        image.draft(image.mode, (side, side))


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def to_upright_rgb(image: Image.Image) -> Image.Image:
    """Decode, turn upright as the EXIF orientation says (as every photo viewer does) and convert to RGB."""
    image.load()
    method = _TRANSPOSE.get(_orientation(image))
    if method is not None:
        image = image.transpose(method)
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class ImageCheck:
    problem: Optional[str]  # why the file cannot be read, or None
    size: Optional[tuple[int, int]] = None  # upright (width, height) when it can


def check_image(path: str) -> ImageCheck:
    """Whether the image file at ``path`` can be read, without decoding a JPEG or PNG.

    A JPEG's marker structure is walked to its end-of-image marker (a truncated file has none), a PNG's chunk
    checksums are verified (``verify``), other formats are decoded. A file that passes and still fails to
    decode is caught when it is read (``data.ImageFiles``).
    """
    try:
        with open(path, "rb") as f, Image.open(f) as image:  # the file is opened once
            size = upright_size(image)
            if isinstance(image, JpegImageFile):
                f.seek(0)
                problem = jpeg_problem(f.read())
                return ImageCheck(problem, None if problem else size)
            if image.format == "PNG":
                image.verify()
            else:
                image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        return ImageCheck(describe_error(exc))
    return ImageCheck(None, size)


# In entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart marker or more 0xFF fill bytes;
# any other byte after it starts the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field (TEM, RSTn)


def jpeg_problem(data: bytes) -> Optional[str]:
    """Why the JPEG ``data`` is cut short or malformed, walking its markers to the end-of-image marker; None when
    it is whole. Bytes after the end-of-image marker (a phone's appended video, say) are allowed."""
    i = 2  # after SOI
    while True:
        i = data.find(b"\xff", i)
        while 0 <= i < len(data) - 1 and data[i + 1] == 0xFF:  # fill bytes before a marker
            i += 1
        if i < 0 or i + 1 >= len(data):
            return "truncated JPEG: the data ends before its end-of-image marker"
        marker = data[i + 1]
        if marker == 0x00:  # a stray stuffed byte between segments: libjpeg skips it too
            i += 2
            continue
        if marker == 0xD9:
            return None
        if marker in _STANDALONE:
            i += 2
            continue
        if i + 4 > len(data):
            return "truncated JPEG: the data ends inside a marker"
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if end <= i + 3 or end > len(data):
            return f"truncated or corrupt JPEG: a segment at byte {i} runs past the end of the file"
        if marker != 0xDA:
            i = end
            continue
        found = _NEXT_MARKER.search(data, end)  # the scan's entropy-coded data runs to the next marker
        if found is None:
            return "truncated JPEG: the image data ends before its end-of-image marker"
        i = found.start()


def describe_error(exc: Exception) -> str:
    """A short reason for a failed read, e.g. ``OSError: image file is truncated``."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file PIL can read"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
