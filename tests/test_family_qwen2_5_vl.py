"""Qwen2.5-VL (Qwen2-VL's decoder behind a windowed-attention vision tower): every test of
tests/test_family_qwen2_vl.py (keep-all, exact score rows, decode masks with a sliding window, every
rule family on images and on video, rows of other image sizes and counts, the command line on a
saved checkpoint whose processor needs no torchvision), run on a tiny Qwen2.5-VL."""
import pytest

from test_family_qwen2_vl import *  # noqa: F401,F403  (the same tests, collected again here)


@pytest.fixture(scope="module")
def family() -> str:
    return "qwen2_5_vl"
