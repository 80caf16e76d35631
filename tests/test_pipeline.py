"""Pipeline API and class-name resolution."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from terdit_edge.classnames import imagenet_class_names, resolve_class
from terdit_edge.errors import InputError
from terdit_edge.pipeline import Pipeline
from tests.conftest import build_model_file

PIXEL = dict(latent=False, in_channels=1, guided_channels=1, input_size=8, num_classes=10)


def test_imagenet_names_ship_with_the_package():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[207] == "golden retriever" and names[281] == "tabby"


@pytest.mark.parametrize("value, expected", [(207, 207), ("207", 207), ("golden retriever", 207),
                                             ("Golden Retriever", 207), ("tabby cat", 281), ("tabby", 281)])
def test_resolve_class_accepts_ids_names_and_phrases(value, expected):
    assert resolve_class(value, imagenet_class_names()) == expected


def test_unknown_name_lists_close_names():
    with pytest.raises(InputError, match="golden retriever"):
        resolve_class("golden retreiver", imagenet_class_names())


@pytest.mark.parametrize("value", [1000, -1, "1000", 3.5, None])
def test_bad_class_values_are_input_errors(value):
    with pytest.raises(InputError):
        resolve_class(value, imagenet_class_names())


def test_pipeline_returns_pil_images_and_numpy_arrays(tmp_path):
    pipe = Pipeline.load(build_model_file(tmp_path, **PIXEL), backend="numpy")
    images = pipe([1, "2"], steps=3, progress=False)
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (8, 8) for im in images)
    arr = pipe([1, 2], steps=3, progress=False, output="np")
    assert arr.shape == (2, 8, 8, 1) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    # the PIL image is the array quantized as the authors do: x * 255 + 0.5, truncated
    assert np.array_equal(np.asarray(images[0]), (arr[0, :, :, 0] * 255 + 0.5).astype(np.uint8))


def test_pipeline_rejects_bad_output_kind(tmp_path):
    pipe = Pipeline.load(build_model_file(tmp_path, **PIXEL), backend="numpy")
    with pytest.raises(InputError):
        pipe([1], steps=2, progress=False, output="tensor")


def test_latent_pipeline_without_vae_says_how_to_get_one(tmp_path):
    pipe = Pipeline.load(build_model_file(tmp_path), backend="numpy")
    with pytest.raises(InputError, match="VAE"):
        pipe([1], steps=2, progress=False)
