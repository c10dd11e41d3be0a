"""`read_image`: every source format to 2D uint8 grayscale, and clear errors on bad files."""

from __future__ import annotations

import numpy as np
import pytest

from contract.errors import DataError
from tests.data_fixtures import (
    gradient,
    write_dicom,
    write_dicom_jpeg,
    write_jpeg,
    write_png8,
    write_png16,
    write_rgba,
)
from trainables.datasets import read_image


def _expected_minmax(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    return np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


def test_png8_is_returned_unchanged(tmp_path):
    img = gradient().astype(np.uint8)
    out = read_image(write_png8(tmp_path / "a.png", img))
    assert out.dtype == np.uint8 and out.ndim == 2
    np.testing.assert_array_equal(out, img)


def test_png16_is_scaled_by_its_range(tmp_path):
    img = gradient(top=4095) + 100  # a 12-bit image in a 16-bit file
    out = read_image(write_png16(tmp_path / "a.png", img))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    np.testing.assert_allclose(out, _expected_minmax(img), atol=1)


def test_rgba_becomes_gray_ignoring_alpha(tmp_path):
    img = gradient().astype(np.uint8)
    out = read_image(write_rgba(tmp_path / "a.png", img))
    assert out.ndim == 2
    np.testing.assert_allclose(out, img, atol=1)


def test_jpeg(tmp_path):
    img = gradient().astype(np.uint8)
    out = read_image(write_jpeg(tmp_path / "a.jpg", img))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 4


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_rescale_window_and_inversion(tmp_path, photometric):
    stored = gradient(top=4095)
    path = write_dicom(tmp_path / "a.dcm", stored, photometric, slope=2.0, intercept=-1024)
    out = read_image(path)
    expected = _expected_minmax(stored * 2.0 - 1024)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    assert out.dtype == np.uint8 and out.shape == stored.shape
    np.testing.assert_allclose(out, expected, atol=1)


def test_dicom_bits_above_bits_stored_are_ignored(tmp_path):
    stored = gradient(top=4095)
    noisy = stored.astype(np.uint16) | np.uint16(0xF000)  # garbage in the unused high bits
    out = read_image(write_dicom(tmp_path / "a.dcm", noisy, bits_stored=12))
    np.testing.assert_allclose(out, _expected_minmax(stored), atol=1)


def test_jpeg_compressed_dicom(tmp_path):
    img = gradient(32, 32).astype(np.uint8)
    out = read_image(write_dicom_jpeg(tmp_path / "a.dcm", img, "MONOCHROME1"))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (255 - img)).mean() < 4


def test_truncated_png_is_a_data_error_naming_the_file(tmp_path):
    path = write_png8(tmp_path / "cut.png", np.random.default_rng(0).integers(0, 255, (64, 64)))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"cut\.png: unreadable or truncated image"):
        read_image(path)


def test_truncated_dicom_and_garbage_and_missing(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", gradient(top=4095))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match=r"cut\.dcm: unreadable or truncated image"):
        read_image(path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.png: unreadable"):
        read_image(junk)
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        read_image(tmp_path / "nope.png")
