"""Decode any source image of the three datasets to one format: 2D uint8 grayscale.

Decisions:
- 8-bit grayscale PNG/JPEG (nearly all of NIH and CheXpert) is returned as decoded, no rescaling.
- 16-bit (and 32-bit integer) PNG is mapped linearly from the image's own min..max to 0..255,
  not shifted by 8 bits: such files often use only 10-14 of the 16 bits, and `>> 8` would leave
  them nearly black. DICOM gets the same min-max window, so both high-bit-depth paths agree.
- RGB/RGBA/palette images become luminance (ITU-R 601) via Pillow; alpha is dropped.
- DICOM: stored bits masked to `BitsStored`, `RescaleSlope`/`RescaleIntercept` applied,
  min-max window to 8 bits, `MONOCHROME1` (white = low values) inverted so bone is bright.
- A file that cannot be decoded completely (missing, not an image, truncated) is a `DataError`
  naming the file; truncated data is never padded silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from contract.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, KeyError, TypeError,
                  AttributeError, IndexError, NotImplementedError, Image.DecompressionBombError)


def read_image(path: Path) -> np.ndarray:
    """Decode `path` (PNG, JPEG, DICOM, or anything Pillow reads) to a 2D uint8 array."""
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return _read_dicom(path)
        return _read_pillow(path)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; fix: restore the file or remove it "
                        "from the split list") from None
    except _DECODE_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: unreadable or truncated image ({reason}); fix: re-download "
                        "the file or remove it from the split list") from None


def _read_pillow(path: Path) -> np.ndarray:
    # Relies on Pillow's default ImageFile.LOAD_TRUNCATED_IMAGES = False: a truncated file
    # raises in load() instead of being padded with grey.
    with Image.open(path) as im:
        im.load()
        if im.mode == "L":
            return np.asarray(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return to_uint8_minmax(np.asarray(im).astype(np.float32))
        if im.mode == "LA":
            return np.asarray(im.getchannel(0))
        return np.asarray(im.convert("L"))


def to_uint8_minmax(values: np.ndarray) -> np.ndarray:
    """Map an array linearly from its min..max to 0..255; a constant image becomes zeros."""
    values = values.astype(np.float32, copy=False)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except InvalidDicomError as exc:
        raise ValueError(f"not a DICOM file: {exc}") from None
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        pixels = pixels[0]  # multi-frame: the first frame is the radiograph
    pixels = _mask_stored_bits(pixels, ds)
    values = pixels.astype(np.float32)
    if values.ndim == 3:  # colour DICOM (rare): luminance
        values = values[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    out = to_uint8_minmax(values * slope + intercept)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 255 - out
    return out


def _mask_stored_bits(pixels: np.ndarray, ds) -> np.ndarray:
    """Keep only the `BitsStored` low bits (sign-extended when signed); idempotent."""
    allocated = int(ds.get("BitsAllocated", pixels.dtype.itemsize * 8))
    stored = int(ds.get("BitsStored", allocated))
    if not 0 < stored < allocated or pixels.dtype.kind not in "iu":
        return pixels
    if int(ds.get("PixelRepresentation", 0)) == 1:
        shift = pixels.dtype.itemsize * 8 - stored
        return (pixels.astype(pixels.dtype) << shift) >> shift
    return pixels & np.asarray((1 << stored) - 1, dtype=pixels.dtype)
