"""Reading and writing image files the way upstream BAGEL's loader sees them, with errors that name the file.

Reading: EXIF orientation applied (a phone photo is upright, as every viewer shows it); 16-bit greyscale scaled to
8 bits (PIL's ``convert("RGB")`` clips it, turning most images white); transparency composited over white exactly
as upstream's ``pil_img2rgb`` (ByteDance-Seed/Bagel data/data_utils.py) does; everything else ``convert("RGB")``.
Writing: the format follows the file's suffix (``x.jpg`` is a JPEG), and the path is checked before any work.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .transforms import pil_img2rgb  # upstream's: transparency composited onto white


class ImageFileError(ValueError):
    pass


def _to_8bit(image):
    """16-bit and 32-bit integer greyscale (PNG ``I;16``, ``I``) scaled to 8 bits; other modes unchanged."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        a = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise ImageFileError("floating-point images are not supported; save it as an 8- or 16-bit PNG")
    return image


def load_rgb(path: str):
    """A file as an upright RGB ``PIL.Image``; a clear ``ImageFileError`` (naming the file) for anything else."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"input image not found: {path}")
    if not os.path.isfile(path):
        raise ImageFileError(f"input image {path} is not a file")
    if os.path.getsize(path) == 0:
        raise ImageFileError(f"input image {path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not somewhere inside the model
            im = ImageOps.exif_transpose(im)
            return pil_img2rgb(_to_8bit(im))
    except UnidentifiedImageError:
        raise ImageFileError(f"input image {path} is not an image file PIL can read (text? unsupported "
                             "format?)") from None
    except Image.DecompressionBombError as e:
        raise ImageFileError(f"input image {path} is too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        if isinstance(e, ImageFileError):
            raise ImageFileError(f"input image {path}: {e}") from None
        raise ImageFileError(f"input image {path} is truncated or corrupt: {e}") from None


def read_image(path: str) -> torch.Tensor:
    """(H, W, 3) uint8 tensor of an image file, read as ``load_rgb`` does."""
    return torch.from_numpy(np.array(load_rgb(path), dtype=np.uint8))


def output_format(path: str) -> str:
    """PIL's format name for ``path``'s suffix (``.jpg`` -> JPEG); an error naming the suffixes PIL can write."""
    from PIL import Image

    Image.init()
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ImageFileError(f"cannot tell the image format of output {path!r} from its suffix {ext or '(none)'!r}; "
                             "use .png (lossless), .jpg, .webp, .bmp, .tif or another suffix PIL can write")
    return fmt


def check_writable(path: str) -> str:
    """Before any work: the output's format is known and its directory exists (or can be made) and is writable.
    Returns the format."""
    if os.path.isdir(path):
        raise ImageFileError(f"output {path!r} is a directory")
    fmt = output_format(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise ImageFileError(f"cannot create the output directory {d!r}: {e.strerror}") from None
    if not os.access(d, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ImageFileError(f"output {path!r} is not writable")
    return fmt


def write_image(image: torch.Tensor, path: str) -> None:
    """Save an (H, W, 3) uint8 image in the format of ``path``'s suffix (JPEG at quality 95: near-lossless)."""
    from PIL import Image

    fmt = check_writable(path)
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(image.cpu().numpy()).save(path, format=fmt, **kwargs)


_CHANNELS = (1, 3, 4)  # greyscale, RGB, RGBA


def _channel_axis(shape: tuple[int, ...]) -> str:
    """'HWC' or 'CHW' from a 3-D shape: the axis of 1, 3 or 4 channels. Both ends qualifying (a 3x4x3 array) is
    refused rather than guessed: read the wrong way it would be an image 3 pixels high."""
    last, first = shape[-1] in _CHANNELS, shape[0] in _CHANNELS
    if last and not first:
        return "HWC"
    if first and not last:
        return "CHW"
    if last and first:
        raise ValueError(f"image of shape {shape} is ambiguous: channels first (C, H, W) or last (H, W, C)? "
                         "Pass a PIL image, or an array of at least 5 pixels per side")
    raise ValueError(f"image of shape {shape} has no channel axis of 1, 3 or 4 (expected (H, W, C) or (C, H, W))")


def as_rgb_tensor(image) -> torch.Tensor:
    """A caller's input image as the (H, W, 3) uint8 CPU tensor the pipeline takes.

    Accepts a file path (read as ``read_image``), a ``PIL.Image`` (16-bit greyscale scaled to 8 bits,
    transparency over white as upstream's ``pil_img2rgb``; no EXIF rotation: the caller's pixels are taken as
    given), or a numpy array / torch tensor: (H, W, C) or (C, H, W) with C = 1, 3 or 4 (told apart by where the
    channel axis is; ``ToTensor``'s and torchvision's CHW included), or (H, W) greyscale. Integer data must be
    uint8; floating data must be finite and in [0, 1] and becomes ``round(x * 255)`` (diffusers' rounding, so the
    pipeline's own ``output_type="np"``/``"pt"`` images come back in exactly)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(pil_img2rgb(_to_8bit(image)), dtype=np.uint8))
    if isinstance(image, np.ndarray):
        if image.dtype == object or not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_):
            raise TypeError(f"image array has dtype {image.dtype}; expected uint8 or floating point")
        t = torch.from_numpy(np.array(image, order="C"))  # a copy: the caller's array may be read-only (PIL's)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
    else:
        raise TypeError(f"image must be a PIL image, a numpy array, a torch tensor or a file path, got "
                        f"{type(image).__name__}")
    if t.dim() == 2:
        t = t[:, :, None]
    if t.dim() != 3:
        raise ValueError(f"image must have 2 or 3 dimensions ((H, W), (H, W, C) or (C, H, W)), got shape "
                         f"{tuple(t.shape)}")
    if _channel_axis(tuple(t.shape)) == "CHW":
        t = t.permute(1, 2, 0)
    if t.dtype.is_floating_point:
        t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise ValueError("image has NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"a floating-point image must hold values in [0, 1], got [{lo:g}, {hi:g}] (uint8 data "
                             "belongs in a uint8 array)")
        t = torch.round(t * 255.0).to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise ValueError(f"an integer image must be uint8, got {t.dtype} (scale it to 0..255 uint8, or to a float "
                         "image in [0, 1])")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"image size must be positive, got {t.shape[0]}x{t.shape[1]}")
    if t.shape[-1] == 3:
        return t.contiguous()
    # greyscale and RGBA through PIL, as a file of that kind would be read (uint8 (H, W) is "L", (H, W, 4) "RGBA")
    a = t.numpy()
    pil = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))
    return torch.from_numpy(np.array(pil_img2rgb(pil), dtype=np.uint8))
