"""The public pipeline: model file -> sampler -> (VAE) -> images."""
from __future__ import annotations

import json
import os
from importlib import resources

import numpy as np

from .batching import MAX_DEFAULT_BATCH, default_batch_size  # noqa: F401 (part of this module's API)
from .classnames import imagenet_class_names, resolve_class
from .diffusion import sample
from .errors import FormatError, InputError
from .format import DIT_PREFIX, VAE_PREFIX, TditFile, read_tdit
from .images import to_pil, to_uint8  # noqa: F401 (to_uint8: part of this module's API)
from .model import model_from_file
from .settings import GenerationSettings

DEFAULT_MODEL_NAME = "digits.tdit"
def default_model_path() -> str:
    """Path of the small ternary DiT bundled with the package (trained by examples/train_digits.py)."""
    return str(resources.files("terdit_edge").joinpath("data", DEFAULT_MODEL_NAME))


def _vae_from_file(tf: TditFile, threads: int | None):
    from .vae import VAEConfig, VAEDecoder

    decoder = VAEDecoder(VAEConfig.from_json(tf.vae_config_json), tf.section(VAE_PREFIX), threads=threads)
    decoder.source = tf  # the file whose pages the pipeline releases between phases
    return decoder


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
            class_names = (imagenet_class_names() if cfg.num_classes == 1000
                           else [str(i) for i in range(cfg.num_classes)])
        self.class_names = class_names

    @classmethod
    def load(cls, path=None, backend: str = "auto", activations: str | None = None, threads: int | None = None,
             vae=None, verify: bool = True, settings: GenerationSettings | None = None,
             attention: str | None = None) -> "Pipeline":
        """Load a model file (and its embedded VAE). ``vae``: a separate VAE .tdit path, optional.
        ``settings``: its model settings (activations, attention) are the ones loaded; ``activations``
        and ``attention``, when given, win (default fp32)."""
        model_kw = (settings or GenerationSettings()).model_kwargs()
        if activations is not None:
            model_kw["activations"] = activations
        if attention is not None:
            model_kw["attention"] = attention
        path = os.fspath(path) if path is not None else default_model_path()
        if not os.path.exists(path):
            if path == default_model_path():
                raise FormatError(f"the bundled default model is missing from the installation ({path}); "
                                  "reinstall terdit-edge or pass a model file")
            raise FormatError(f"model file {path!r} does not exist")
        tf = read_tdit(path, verify=verify)
        if tf.config is None:
            raise FormatError(f"{path}: holds only a VAE; pass a model file (or use it as --vae)")
        model = model_from_file(tf, backend=backend, threads=threads, **model_kw)
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

    @staticmethod
    def _release(prefix: str, tf) -> None:
        """Give back the resident pages of one section of a mapped file before a phase that does
        not read it (sampling does not read the VAE, decoding not the DiT): the peak memory is then
        the larger phase's, not their sum. Pages read again are mapped again from the page cache."""
        if isinstance(tf, TditFile):
            tf.release_pages(prefix)

    @classmethod
    def from_pretrained(cls, name: str, force: bool = False, revision: str | None = None, log=None,
                        **load_kwargs) -> "Pipeline":
        """A released TerDiT model by name ("terdit-600m-256", ...): downloaded from the Hugging Face
        Hub, converted and cached on first use (:func:`terdit_edge.hub.pull`; needs the [hub] extra),
        then loaded with ``Pipeline.load(path, **load_kwargs)``."""
        from .hub import pull

        return cls.load(pull(name, force=force, revision=revision, log=log), **load_kwargs)

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

    @property
    def activations(self) -> str:
        """The activation mode the model was loaded with."""
        return getattr(getattr(self.model, "backend", None), "activations", "fp32")

    @property
    def attention(self) -> str:
        """The attention mode the model was loaded with."""
        return getattr(getattr(self.model, "backend", None), "attention_mode", "fp32")

    def settings(self, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
        """``settings`` (default: the defaults, with this pipeline's model settings) with ``overrides``
        (setting names as keywords) applied; InputError when its model settings are not this pipeline's."""
        s = settings if settings is not None else GenerationSettings(activations=self.activations,
                                                                     attention=self.attention)
        s = s.replace(**overrides) if overrides else s
        s.check_model(self.activations, self.attention)
        return s

    def latents(self, class_labels, settings: GenerationSettings | None = None, *, progress: bool = False,
                callback=None, batch_size: int | None = None, **overrides) -> np.ndarray:
        """Sampled latents (or pixels for pixel-space models), float32 (B, C, H, W).

        ``settings``: a :class:`~terdit_edge.settings.GenerationSettings`; any of its names given
        as keywords (``steps=``, ``sampler=``, ``cfg_scale=``, ``seed=``, ``seeds=``, ...) override it.
        Image k has seed ``seeds[k]``, or ``seed + k`` without seeds (seed 0 by default), and comes
        out with the same bytes whatever else is in the call (see docs/reproducibility.md). The images
        are sampled ``batch_size`` at a time (default: :func:`default_batch_size`); every batch size
        gives the same result. ``callback(step_index, total, latents)`` runs after each step of each
        batch, counting steps over all batches (``latents`` is the current batch); raise in it to cancel.
        """
        s = self.settings(settings, **overrides)
        ids = self.resolve_classes(class_labels)
        seed_list = s.image_seeds(len(ids))
        self._release(VAE_PREFIX, getattr(self.vae, "source", None))
        if batch_size is None:
            batch_size = default_batch_size(self.config, len(ids), guided=s.cfg_scale > 1)
        elif isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        starts = range(0, len(ids), int(batch_size))
        n_steps = s.n_steps
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=None, unit="step", desc="sampling", leave=True, dynamic_ncols=True)
        done = 0

        def on_step(i, total, x):
            if bar is not None:
                bar.total = total * len(starts)
                if len(starts) > 1:
                    bar.set_postfix_str(f"batch {done // total + 1}/{len(starts)}", refresh=False)
                bar.update(1)
            if callback is not None:
                callback(done + i, total * len(starts), x)

        parts = []
        try:
            for b0 in starts:
                b1 = b0 + int(batch_size)
                parts.append(sample(self.model, ids[b0:b1], seeds=seed_list[b0:b1], callback=on_step,
                                    **s.sample_kwargs()))
                done += n_steps
        finally:
            if bar is not None:
                bar.close()
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def decode(self, latents: np.ndarray, vae_tile: int | None = None) -> np.ndarray:
        """Latents -> float32 images (B, H, W, C) in [0, 1]."""
        if self.config.latent:
            if self.vae is None:
                raise InputError("this model samples SD-VAE latents but the file holds no VAE: convert with "
                                 "`--vae VAE_SRC` or pass vae=PATH (CLI: --vae FILE)")
            release = getattr(self.model, "release_buffers", None)
            if release is not None:
                release()
            self._release(DIT_PREFIX, getattr(self.model, "file", None))
            images = self.vae.decode(latents, tile=vae_tile)
        else:
            images = latents
        return np.clip((images.transpose(0, 2, 3, 1) + 1) / 2, 0, 1).astype(np.float32)

    def __call__(self, class_labels, settings: GenerationSettings | None = None, *, progress: bool = True,
                 output: str = "pil", vae_tile: int | None = None, callback=None, batch_size: int | None = None,
                 **overrides):
        """Generate one image per class label (id or ImageNet/stored class name); ``settings`` and
        keyword overrides as in :meth:`latents`.

        Image k has seed ``seeds[k]`` (or ``seed + k``): ``pipe([3, 7], seed=5)[1]`` equals
        ``pipe([7], seed=6)[0]`` byte for byte. Images are sampled and decoded ``batch_size`` at a
        time (default: what fits the machine's memory); the result does not depend on it.
        """
        if output not in ("pil", "np"):
            raise InputError(f"output must be 'pil' or 'np', got {output!r}")
        lat = self.latents(class_labels, settings, progress=progress, callback=callback, batch_size=batch_size,
                           **overrides)
        # one image at a time: the decoder's BLAS calls then have the same shapes for every image
        # (batch invariance of the pictures), and its activations are one image's
        images = np.concatenate([self.decode(lat[k:k + 1], vae_tile=vae_tile) for k in range(lat.shape[0])])
        if output == "np":
            return images
        return [to_pil(img) for img in images]

    def edit(self, image, class_labels, strength: float = 0.6, steps=None, sampler: str = "ddpm",
             cfg_scale: float = 4.0, seed: int = 0, eta: float = 0.0, progress: bool = False,
             output: str = "pil", fit: str = "crop", vae_tile: int | None = None, callback=None, seeds=None,
             batch_size: int | None = None, guidance_interval=None, schedule=None,
             cache=None, guidance_reuse=None):
        """Image-to-image (SDEdit): ``image`` noised to ``strength`` (0..1) and sampled the rest of
        the way toward each class; one image per class label.

        ``image``: a PIL image, a file path, encoded image bytes or a uint8 array (modes 1, L, LA, P,
        PA, RGB, RGBA; alpha is dropped), or a list of them, one per class. It is brought to the
        model's size by ``fit``: "crop" (default: shorter side to the size, centre cut) or "stretch";
        latent models encode it with the file's VAE encoder (convert with ``--vae-encoder``).
        ``strength`` 0 returns the input's VAE round trip, 1 plain generation of the same seed, bit
        for bit; in between the last round(strength * steps) steps of the schedule run. Other
        arguments as :meth:`__call__`; the same seed rules and batch invariance hold
        (terdit_edge.edit describes the random draws).
        """
        from .edit import run_edit

        return run_edit(self, image, class_labels, strength=strength, steps=steps, sampler=sampler,
                        cfg_scale=cfg_scale, seed=seed, eta=eta, progress=progress, output=output, fit=fit,
                        vae_tile=vae_tile, callback=callback, seeds=seeds, batch_size=batch_size,
                        guidance_interval=guidance_interval, schedule=schedule, cache=cache,
                        guidance_reuse=guidance_reuse)

    def inpaint(self, image, mask, class_labels, strength: float = 1.0, resample_jumps: int = 0,
                jump_length: int = 1, mask_blur: float = 1.0, steps=None, sampler: str = "ddpm",
                cfg_scale: float = 4.0, seed: int = 0, eta: float = 0.0, progress: bool = False,
                output: str = "pil", fit: str = "crop", vae_tile: int | None = None, callback=None,
                seeds=None, batch_size: int | None = None, guidance_interval=None, schedule=None,
                cache=None, guidance_reuse=None):
        """Inpainting: regenerate where ``mask`` is white (black: keep, gray: blend) toward each class.

        ``mask``: a picture of the image's size (any accepted mode, read as gray), or a list, one
        per class; fitted like the image, averaged over each VAE-factor block and given a soft
        edge of ``mask_blur`` sampler pixels (latent pixels; 0: none). After every step the kept
        region is replaced by the input's latents noised to that step's level, and at the end by
        the latents themselves. ``resample_jumps`` > 0: RePaint resampling, going back up
        ``jump_length`` steps that many times at every jump_length-th step (better seams, about
        1 + resample_jumps times the model evaluations). ``strength`` < 1 also starts the
        regenerated region from the noised input instead of pure noise. Other arguments as
        :meth:`edit`.
        """
        from .edit import run_edit

        return run_edit(self, image, class_labels, mask=mask, strength=strength, steps=steps, sampler=sampler,
                        cfg_scale=cfg_scale, seed=seed, eta=eta, progress=progress, output=output, fit=fit,
                        vae_tile=vae_tile, callback=callback, seeds=seeds, batch_size=batch_size,
                        guidance_interval=guidance_interval, resample_jumps=resample_jumps,
                        jump_length=jump_length, mask_blur=mask_blur, schedule=schedule, cache=cache,
                        guidance_reuse=guidance_reuse)
