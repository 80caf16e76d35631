"""The public pipeline: model file -> sampler -> (VAE) -> images."""
from __future__ import annotations

import json
import os
import time
from importlib import resources

import numpy as np

from .classnames import imagenet_class_names, resolve_class
from .diffusion import sample
from .errors import FormatError, InputError
from .format import VAE_PREFIX, TditFile, read_tdit
from .model import model_from_file

DEFAULT_MODEL_NAME = "digits.tdit"


def default_model_path() -> str:
    """Path of the small ternary DiT bundled with the package (trained by examples/train_digits.py)."""
    return str(resources.files("terdit_edge").joinpath("data", DEFAULT_MODEL_NAME))


def _vae_from_file(tf: TditFile, threads: int | None):
    from .vae import VAEConfig, VAEDecoder

    return VAEDecoder(VAEConfig.from_json(tf.vae_config_json), tf.section(VAE_PREFIX), threads=threads)


def load_vae(path, threads: int | None = None, verify: bool = True):
    """The SD-VAE decoder of a VAE-only or pipeline .tdit file; ``decode(latents)`` -> (B, 3, H, W) in [-1, 1]."""
    tf = read_tdit(path, verify=verify)
    if tf.vae_config_json is None:
        raise FormatError(f"{path}: holds no VAE; convert one with `terdit-edge convert-vae` or "
                          "`terdit-edge convert ... --vae VAE_SRC`")
    return _vae_from_file(tf, threads)


class Pipeline:
    """Class-conditional generation from one .tdit file.

    ``Pipeline.load(path=None)`` loads the bundled default model when no path is given.
    Calling the pipeline returns PIL images (or float32 (B, H, W, C) in [0, 1] with output="np").
    """

    def __init__(self, model, vae=None, class_names: list[str] | None = None, path: str | None = None):
        self.model = model
        self.vae = vae
        self.path = path
        cfg = model.config
        if class_names is None:
            class_names = imagenet_class_names() if cfg.num_classes == 1000 else [str(i) for i in range(cfg.num_classes)]
        self.class_names = class_names

    @classmethod
    def load(cls, path=None, backend: str = "auto", activations: str = "fp32", threads: int | None = None,
             vae=None, verify: bool = True) -> "Pipeline":
        """Load a model file (and its embedded VAE). ``vae``: a separate VAE .tdit path, optional."""
        path = os.fspath(path) if path is not None else default_model_path()
        if not os.path.exists(path):
            if path == default_model_path():
                raise FormatError(f"the bundled default model is missing from the installation ({path}); "
                                  "reinstall terdit-edge or pass a model file")
            raise FormatError(f"model file {path!r} does not exist")
        tf = read_tdit(path, verify=verify)
        if tf.config is None:
            raise FormatError(f"{path}: holds only a VAE; pass a model file (or use it as --vae)")
        model = model_from_file(tf, backend=backend, activations=activations, threads=threads)
        decoder = None
        if vae is not None:
            decoder = load_vae(vae, threads=threads, verify=verify)
        elif tf.vae_config_json is not None:
            decoder = _vae_from_file(tf, threads)
        names = None
        if "class_names" in tf.metadata:
            try:
                names = json.loads(tf.metadata["class_names"])
            except ValueError:
                raise FormatError(f"{path}: metadata class_names is not valid JSON") from None
            if (not isinstance(names, list) or len(names) != tf.config.num_classes
                    or not all(isinstance(n, str) for n in names)):
                raise FormatError(f"{path}: metadata class_names must list {tf.config.num_classes} strings")
        return cls(model, decoder, names, path)

    @property
    def config(self):
        return self.model.config

    def resolve_classes(self, class_labels) -> list[int]:
        """Class ids or names -> standard class ids (InputError lists close names for unknown ones)."""
        if isinstance(class_labels, (int, str, np.integer)):
            class_labels = [class_labels]
        ids = [resolve_class(int(c) if isinstance(c, np.integer) else c, self.class_names) for c in class_labels]
        if not ids:
            raise InputError("give at least one class")
        return ids

    def latents(self, class_labels, steps=250, sampler: str = "ddpm", cfg_scale: float = 4.0, seed: int = 0,
                eta: float = 0.0, progress: bool = False, callback=None) -> np.ndarray:
        """Sampled latents (or pixels for pixel-space models), float32 (B, C, H, W)."""
        ids = self.resolve_classes(class_labels)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=None, unit="step", desc="sampling", leave=True, dynamic_ncols=True)

        def on_step(i, total, x):
            if bar is not None:
                bar.total = total
                bar.update(1)
            if callback is not None:
                callback(i, total, x)

        try:
            return sample(self.model, ids, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed, eta=eta,
                          callback=on_step)
        finally:
            if bar is not None:
                bar.close()

    def decode(self, latents: np.ndarray, vae_tile: int | None = None) -> np.ndarray:
        """Latents -> float32 images (B, H, W, C) in [0, 1]."""
        if self.config.latent:
            if self.vae is None:
                raise InputError("this model samples SD-VAE latents but the file holds no VAE: convert with "
                                 "`--vae VAE_SRC` or pass vae=PATH (CLI: --vae FILE)")
            images = self.vae.decode(latents, tile=vae_tile)
        else:
            images = latents
        return np.clip((images.transpose(0, 2, 3, 1) + 1) / 2, 0, 1).astype(np.float32)

    def __call__(self, class_labels, steps=250, sampler: str = "ddpm", cfg_scale: float = 4.0, seed: int = 0,
                 eta: float = 0.0, progress: bool = True, output: str = "pil", vae_tile: int | None = None,
                 callback=None):
        """Generate one image per class label (id or ImageNet/stored class name)."""
        if output not in ("pil", "np"):
            raise InputError(f"output must be 'pil' or 'np', got {output!r}")
        lat = self.latents(class_labels, steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed, eta=eta,
                           progress=progress, callback=callback)
        images = self.decode(lat, vae_tile=vae_tile)
        if output == "np":
            return images
        return [to_pil(img) for img in images]


def to_uint8(images01: np.ndarray) -> np.ndarray:
    """float images in [0, 1] -> uint8 with x * 255 + 0.5 truncated (the authors' conversion)."""
    return (np.clip(images01, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_pil(image01: np.ndarray):
    """(H, W, C) float in [0, 1] -> PIL image (L for one channel, RGB for three)."""
    from PIL import Image

    arr = to_uint8(image01)
    if arr.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]))
    if arr.shape[2] == 3:
        return Image.fromarray(arr)
    raise InputError(f"cannot make a picture of {arr.shape[2]} channels")
