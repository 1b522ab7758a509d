"""Real images for HG-DPO winners (rlfh/data/hgdpo.py): read, resized, encoded once to latents, cached.

Real images are encoded once to UNet-space latents with the pipeline's VAE, as diffusers' SDXL
img2img ``_encode_vae_image`` does (the inverse of the decode in ``rollouts/sampler.py``):

    z = (E(x) - latents_mean) * scaling_factor / latents_std   if the VAE config has both
    z = (E(x) - shift_factor) * scaling_factor                 with a shift factor (SD3, FLUX)
    z = E(x) * scaling_factor                                  otherwise (SDXL)
    x = image resized to cover (H, W), center-cropped, scaled to [-1, 1], (B, 3, H, W)
    z (B, 4, H/8, W/8) float32; fp16 VAEs with ``force_upcast`` encode in float32.

Source layout (the Hugging Face ImageFolder convention): ``DIR/metadata.jsonl`` with one JSON
object per line, ``{"file_name": "a.jpg", "text": "a caption"}`` and optionally
``"regions": {"face": [[x1, y1, x2, y2], ...], "hand": [...]}`` in the (upright) image's pixels;
the image files beside it. A ``datasets`` dataset written by ``save_to_disk`` (columns ``image``
and ``text``) also works when the ``datasets`` package is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

CACHE_PREFIX = "hgdpo-real-"
_LATENT_MODES = ("sample", "mean")


# ---------------------------------------------------------------------------- real images
@dataclass(frozen=True)
class RealItem:
    """One real photo: where it is, its caption, optional region boxes in its own pixels."""

    name: str  # file name relative to the source dir, or "#<row>" for a datasets row
    text: str
    regions: Mapping[str, tuple[tuple[float, float, float, float], ...]]
    stamp: tuple  # what identifies this version of the image for the cache key


def _read_metadata(root: Path) -> list[RealItem]:
    meta = root / "metadata.jsonl"
    items, problems = [], []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("file_name"), str)
            or not isinstance(row.get("text"), str)
        ):
            problems.append(f'line {n}: needs string "file_name" and "text", got {line[:120]!r}')
            continue
        path = root / row["file_name"]
        if not path.is_file():
            problems.append(f"line {n}: image {row['file_name']!r} not found in {root}")
            continue
        try:
            regions = {
                str(k): tuple(tuple(float(v) for v in b) for b in boxes)
                for k, boxes in (row.get("regions") or {}).items()
            }
            if any(len(b) != 4 for boxes in regions.values() for b in boxes):
                raise ValueError("a box is not 4 numbers")
        except (AttributeError, TypeError, ValueError) as e:
            problems.append(f'line {n}: "regions" must map a name to [[x1, y1, x2, y2], ...] ({e})')
            continue
        st = path.stat()
        items.append(RealItem(row["file_name"], row["text"], regions, (row["file_name"], st.st_size, st.st_mtime_ns)))
    if problems:
        raise ValueError(f"{meta}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems[:20]))
    return items


def _load_hf_dataset(root: Path):
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{root} looks like a Hugging Face dataset saved with save_to_disk, but the `datasets` package "
            f"is not installed: pip install datasets, or export the images with a metadata.jsonl"
        ) from e
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{root}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    missing = [c for c in ("image", "text") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{root}: dataset lacks column(s) {missing}; it has {ds.column_names}")
    if not isinstance(ds.features["image"], datasets.Image):
        raise ValueError(
            f"{root}: column 'image' is {ds.features['image']}, not datasets.Image(); "
            f"cast it with ds.cast_column('image', datasets.Image())"
        )
    return ds


def fit_box(size_wh: tuple[int, int], target_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize-to-cover then center-crop geometry: ((resized_w, resized_h), (left, top))."""
    (w0, h0), (h, w) = size_wh, target_hw
    s = max(h / h0, w / w0)
    rw, rh = max(w, round(w0 * s)), max(h, round(h0 * s))
    return (rw, rh), ((rw - w) // 2, (rh - h) // 2)


def prepare_image(image, height: int, width: int) -> np.ndarray:
    """PIL image -> float32 (3, H, W) in [-1, 1]: EXIF-rotated, RGB, resized to cover, center-cropped."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image).convert("RGB")
    (rw, rh), (left, top) = fit_box(image.size, (height, width))
    image = image.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, top, left + width, top + height))
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def load_vae(model_cfg, device: str | torch.device = "cpu"):
    """The run's VAE alone (``model.vae_path`` when set), in ``model.dtype``, as the pipeline holds it."""
    from diffusers import AutoencoderKL

    from families import DTYPES, load_pipeline, resolve_model_path

    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.vae_path:
        return AutoencoderKL.from_pretrained(model_cfg.vae_path, dtype=dtype).to(device)
    path = resolve_model_path(model_cfg.path)
    if Path(path).suffix in (".safetensors", ".ckpt"):
        return load_pipeline(model_cfg, device).vae  # a single-file checkpoint holds every component
    return AutoencoderKL.from_pretrained(
        path, subfolder="vae", revision=model_cfg.revision, variant=model_cfg.variant, dtype=dtype
    ).to(device)


class RealImageSource:
    """Captioned real photos, encoded once to UNet-space latents and sampled k per round.

    Args:
        root: an ImageFolder-style directory (``metadata.jsonl`` + images) or a ``save_to_disk`` dataset.
        height, width: the run's image size (``rollout.height`` / ``rollout.width``), multiples of 8.
        cache_dir: where to keep ``hgdpo-real-<key>.safetensors`` (the run dir); None keeps memory only.
        encode_batch_size: images per VAE call.
        latent_mode: ``sample`` (diffusers' training examples: mean + std * eps, eps seeded per image)
            or ``mean`` (the posterior mean).
        seed: seed of the per-image posterior noise in ``sample`` mode.

    Raises:
        FileNotFoundError: no metadata.jsonl and no saved dataset at ``root``.
        ValueError: bad metadata lines, images missing, an empty source, a bad size or mode.
    """

    def __init__(
        self,
        root: str | Path,
        height: int,
        width: int,
        cache_dir: str | Path | None = None,
        encode_batch_size: int = 8,
        latent_mode: str = "sample",
        seed: int = 0,
    ):
        self.root = Path(root)
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"real images need a size that is a positive multiple of 8, got {height}x{width}")
        if latent_mode not in _LATENT_MODES:
            raise ValueError(f"latent_mode={latent_mode!r}; use one of {_LATENT_MODES}")
        if encode_batch_size < 1:
            raise ValueError(f"encode_batch_size={encode_batch_size} must be >= 1")
        self.height, self.width = height, width
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.encode_batch_size, self.latent_mode, self.seed = encode_batch_size, latent_mode, seed
        self._dataset = None
        if (self.root / "metadata.jsonl").is_file():
            self.items = _read_metadata(self.root)
        elif (self.root / "dataset_info.json").is_file() or (self.root / "dataset_dict.json").is_file():
            self._dataset = _load_hf_dataset(self.root)
            fp = getattr(self._dataset, "_fingerprint", "")
            self.items = [RealItem(f"#{i}", str(t), {}, (fp, i)) for i, t in enumerate(self._dataset["text"])]
        else:
            raise FileNotFoundError(
                f"real image source {self.root}: expected {self.root / 'metadata.jsonl'} (lines of "
                f'{{"file_name": ..., "text": ...}} beside the images) or a datasets save_to_disk folder'
            )
        if not self.items:
            raise ValueError(f"real image source {self.root} is empty: no images listed")
        self._latents: np.ndarray | None = None
        self.loaded_from_cache = False
        # HcP pose priors (rlfh/data/pose_prior.py): set by the recipe when model.hcp is on; computed
        # once per image and kept, like the latents
        self.pose_priors: Callable[[np.ndarray], np.ndarray] | None = None
        self._priors: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def latents(self) -> np.ndarray:
        """(N, 4, H/8, W/8) float32, after :meth:`encode`."""
        if self._latents is None:
            raise RuntimeError("RealImageSource.encode(vae) must run first: the real images are not encoded yet")
        return self._latents

    def image(self, i: int) -> np.ndarray:
        """Item i as float32 (3, H, W) in [-1, 1]; ValueError naming the file if it cannot be read."""
        from PIL import Image, UnidentifiedImageError

        path = self.root / self.items[i].name
        try:
            if self._dataset is not None:
                return prepare_image(self._dataset[i]["image"], self.height, self.width)
            with Image.open(path) as im:
                return prepare_image(im, self.height, self.width)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"real image {path} cannot be read as an image: {e}") from e

    # ---------------------------------------------------------------- encoding and cache
    def cache_key(self, vae) -> str:
        """sha256 over the file list (names, sizes, mtimes), the size, the mode and the VAE (config, dtype, weights)."""
        h = hashlib.sha256()
        h.update(json.dumps([list(it.stamp) for it in self.items]).encode())
        h.update(json.dumps([self.height, self.width, self.latent_mode, self.seed, str(vae.dtype)]).encode())
        h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
        # two VAEs can share a config (SDXL's and a fine-tuned one): fingerprint the first and last weights
        params = list(vae.parameters())
        for p in (params[0], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def encode_images(self, vae, images: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> UNet-space latents (B, 4, H/8, W/8) float32 on CPU.

        ``indices`` seed each image's posterior noise, so a latent does not depend on its batch.
        """
        orig = vae.dtype
        # fp16 SDXL VAEs overflow; diffusers upcasts them for encoding as for decoding
        dtype = torch.float32 if orig == torch.float16 and vae.config.force_upcast else orig
        if dtype != orig:
            vae.to(dtype)
        try:
            dist = vae.encode(images.to(vae.device, dtype)).latent_dist
            z = dist.mean.float()
            if self.latent_mode == "sample":
                eps = torch.stack(
                    [
                        torch.randn(
                            z.shape[1:], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
                        )
                        for i in indices
                    ]
                )
                z = z + dist.std.float() * eps.to(z.device)
        finally:
            if dtype != orig:
                vae.to(orig)
        cfg = vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
            std = torch.tensor(std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
            return ((z - mean) * cfg.scaling_factor / std).cpu()
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:  # SD3, FLUX: their img2img pipelines' (E(x) - shift_factor) * scaling_factor
            return ((z - shift) * cfg.scaling_factor).cpu()
        return (z * cfg.scaling_factor).cpu()

    def encode(self, vae) -> np.ndarray:
        """All items' latents (N, 4, H/8, W/8) float32: from memory, the cache file, or the VAE (no grad)."""
        if self._latents is not None:
            return self._latents
        key = self.cache_key(vae)
        path = self.cache_dir / f"{CACHE_PREFIX}{key[:16]}.safetensors" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                if (f.metadata() or {}).get("key") == key:
                    self._latents, self.loaded_from_cache = f.get_tensor("latents"), True
                    return self._latents
        out = []
        for start in range(0, len(self), self.encode_batch_size):
            idx = list(range(start, min(start + self.encode_batch_size, len(self))))
            x = torch.from_numpy(np.stack([self.image(i) for i in idx]))
            out.append(self.encode_images(vae, x, idx))
        self._latents = torch.cat(out).numpy()
        self.loaded_from_cache = False
        if path is not None:
            self._write_cache(path, key)
        return self._latents

    def _write_cache(self, path: Path, key: str) -> None:
        from safetensors.numpy import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(
            {"latents": np.ascontiguousarray(self._latents)},
            str(tmp),
            metadata={"key": key, "root": str(self.root), "count": str(len(self))},
        )
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache
        for old in path.parent.glob(f"{CACHE_PREFIX}*.safetensors"):
            if old != path:
                old.unlink()  # a stale encoding of an earlier file list or VAE: ~N*16*h*w bytes each

    # ---------------------------------------------------------------- sampling and masks
    def sample(self, k: int, round: int, seed: int) -> list[int]:
        """k item indices for a round, a function of (seed, round) only.

        Distinct items while k <= N; beyond that it walks further permutations (each item at most
        ceil(k / N) times).
        """
        if k < 0:
            raise ValueError(f"cannot sample {k} real images")
        rng = np.random.default_rng([int(seed), int(round), 0x4847])  # 0x4847 "HG": a stream of its own
        order: list[int] = []
        while len(order) < k:
            order.extend(int(i) for i in rng.permutation(len(self)))
        return order[:k]

    def prior(self, i: int) -> np.ndarray:
        """Item i's HcP pose prior (1, H/8, W/8), from :attr:`pose_priors` on the prepared image; computed once."""
        if i not in self._priors:
            image = np.round((self.image(i).transpose(1, 2, 0) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
            self._priors[i] = self.pose_priors(image[None])[0]
        return self._priors[i]

    def priors(self, indices: Sequence[int]) -> np.ndarray:
        """HcP pose priors (k, 1, h, w) of items ``indices`` (:meth:`prior`).

        Zeros while :attr:`pose_priors` is unset."""
        if self.pose_priors is None or not len(indices):
            return np.zeros((len(indices), 1, self.height // 8, self.width // 8), np.float32)
        return np.stack([self.prior(i) for i in indices])

    def region_masks(self, indices: Sequence[int], names: Sequence[str]) -> dict[str, np.ndarray]:
        """{name: (k, 1, h, w)} masks from the metadata's boxes, mapped through resize and crop; zeros without
        boxes."""
        from rlfh.data.pairs import region_mask_arrays

        names = [n for n in names if n != "global"]
        if not names:
            return {}
        return region_mask_arrays(self.region_boxes(indices), names, (self.height, self.width))

    def region_boxes(self, indices: Sequence[int]) -> list[dict[str, list]]:
        """Per item, the metadata's {region: [box, ...]} mapped through resize and crop ({} without boxes)."""
        per_image = []
        for i in indices:
            it = self.items[i]
            if not it.regions:
                per_image.append({})
                continue
            from PIL import Image

            with Image.open(self.root / it.name) as im:
                w0, h0 = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap width and height
                    w0, h0 = h0, w0  # boxes are in the upright image's pixels, as prepare_image sees it
            (rw, rh), (left, top) = fit_box((w0, h0), (self.height, self.width))
            sx, sy = rw / w0, rh / h0
            per_image.append(
                {
                    r: [(x1 * sx - left, y1 * sy - top, x2 * sx - left, y2 * sy - top) for x1, y1, x2, y2 in boxes]
                    for r, boxes in it.regions.items()
                }
            )
        return per_image
