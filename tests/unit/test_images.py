import cv2
import numpy as np
import pytest

from schemas.images import check_image, sniff_content_type


def encoded(ext: str) -> bytes:
    image = np.full((32, 48, 3), 200, np.uint8)
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


@pytest.mark.parametrize(
    ("ext", "content_type"), [(".jpg", "image/jpeg"), (".png", "image/png"), (".bmp", "image/bmp")]
)
def test_whole_image_accepted(ext: str, content_type: str) -> None:
    data = encoded(ext)
    assert sniff_content_type(data) == content_type
    assert check_image(data, content_type) is None


@pytest.mark.parametrize(
    ("ext", "content_type"), [(".jpg", "image/jpeg"), (".png", "image/png"), (".bmp", "image/bmp")]
)
def test_truncated_image_rejected(ext: str, content_type: str) -> None:
    data = encoded(ext)
    problem = check_image(data[: len(data) // 2], content_type)
    assert problem is not None
    assert "truncated" in problem


def test_jpeg_zero_padding_accepted() -> None:
    assert check_image(encoded(".jpg") + b"\x00" * 16, "image/jpeg") is None


def test_type_mismatch_rejected() -> None:
    problem = check_image(encoded(".png"), "image/jpeg")
    assert problem == "content type is image/jpeg but the bytes are image/png"


def test_not_an_image_rejected() -> None:
    problem = check_image(b"GIF89a....", "image/jpeg")
    assert problem is not None
    assert "not a JPEG, PNG or BMP" in problem
