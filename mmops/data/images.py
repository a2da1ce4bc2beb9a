"""Decoding images: one function for the prepare stage and the service, so both see the same pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse decompression bombs before Pillow allocates them (64 Mpx is far above any real input here).
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImageError(ValueError):
    """The bytes are not a decodable image; the message says why in user terms."""


def load_image(source: bytes | Path | str, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode to RGB, resize to ``size`` x ``size`` with bilinear filtering, return ``uint8`` HxWx3.

    ``max_pixels`` is checked against the header before any pixel is decoded, so a small file that
    declares a huge canvas (a decompression bomb) costs nothing; the service passes a lower limit.
    """
    max_pixels = min(max_pixels, MAX_PIXELS)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise BadImageError(f"cannot open image: {exc.strerror or exc}") from exc
    with fp:
        try:
            with Image.open(fp) as img:
                if img.width * img.height > max_pixels:
                    raise BadImageError(
                        f"image has {img.width}x{img.height} pixels, over the limit of {max_pixels} pixels"
                    )
                img.load()  # force a full decode: a truncated file fails here, not later
                rgb = img.convert("RGB")
        except BadImageError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice MAX_PIXELS
            raise BadImageError(f"image is over the limit of {max_pixels} pixels ({exc})") from exc
        except UnidentifiedImageError as exc:
            raise BadImageError("not a decodable image (unknown or unsupported format)") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImageError(f"corrupt or truncated image ({exc})") from exc
        except Exception as exc:  # Pillow's decoders fail on corrupt files in many other ways, all one bad file
            raise BadImageError(f"corrupt image ({type(exc).__name__}: {exc})") from exc
    if rgb.width == 0 or rgb.height == 0:
        raise BadImageError(f"image has {rgb.width}x{rgb.height} pixels")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
