"""Training data: an ImageNet-style image folder and Fashion-MNIST (32x32, 3 channels).

Images reach the models as float tensors (3, H, W) in [-1, 1], the range the tokenizer
encodes and decodes (``x = uint8 / 127.5 - 1``).

Fashion-MNIST is read with numpy + gzip from the four idx files
(``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``). The folder is, in order of
precedence: the ``root`` argument, the ``DETAILFLOW_FASHION_MNIST`` environment variable,
``/usr/share/datasets/fashion-mnist``. The 28x28 grey images are zero-padded by 2 pixels to
32x32 and replicated to 3 channels.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from detailflow_engine.images import center_crop_resize

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The Fashion-MNIST folder: ``root``, else $DETAILFLOW_FASHION_MNIST, else the system copy."""
    if root is None:
        root = os.environ.get("DETAILFLOW_FASHION_MNIST") or DEFAULT_FASHION_MNIST
    return Path(root)


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    folder = fashion_mnist_root(root)
    return all((folder / name).is_file() for pair in _FILES.values() for name in pair)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got = int.from_bytes(data[0:4], "big")
    if got != magic:
        raise ValueError(f"{path}: not an idx file with magic {magic:#x} (got {got:#x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {arr.size}")
    return arr.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None):
    """Fashion-MNIST as ``(images, labels)``.

    Returns images uint8 numpy (N, 32, 32, 3) (28x28 padded by 2 with zeros, grey replicated
    to RGB) and labels int64 numpy (N,) in [0, 10). N = 60000 for "train", 10000 for "test".
    Raises FileNotFoundError naming the folder and the missing file when absent.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = fashion_mnist_root(root)
    img_name, lbl_name = _FILES[split]
    for name in (img_name, lbl_name):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {folder / name} not found; pass root= or set "
                f"DETAILFLOW_FASHION_MNIST to the folder holding {img_name} and {lbl_name}")
    images = _read_idx(folder / img_name, 0x00000803, 3)
    labels = _read_idx(folder / lbl_name, 0x00000801, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    images = np.repeat(images[..., None], 3, axis=-1)
    return np.ascontiguousarray(images), labels


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W) / (3, H, W) in [-1, 1]."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # e.g. np.asarray(PIL image) is read-only
    t = torch.as_tensor(images)
    t = t.movedim(-1, -3).float()
    return t / 127.5 - 1.0


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST as a torch Dataset: ``(float (3, 32, 32) in [-1, 1], int label)``."""

    def __init__(self, split: str = "train", root=None, random_flip: bool = False):
        self.images, self.labels = load_fashion_mnist(split, root)
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = uint8_to_float(self.images[index])
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])


class ImageFolderDataset(Dataset):
    """ImageNet layout: ``root/<class_name>/<image>``; labels follow the sorted class names.

    Items are ``(float (3, S, S) in [-1, 1], int label)`` after a center crop and resize to
    ``image_size``; ``random_flip`` flips horizontally with probability 1/2.
    """

    def __init__(self, root, image_size: int, random_flip: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} not found")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{self.root} has no class subfolders (expected root/<class>/<image>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for c in self.classes:
            for path in sorted((self.root / c).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    self.samples.append((path, self.class_to_idx[c]))
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.image_size = image_size
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as img:
            img = center_crop_resize(img, self.image_size)
        x = uint8_to_float(np.asarray(img, dtype=np.uint8))
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label


def load_image_tensors(dataset: str, split: str = "train", image_size: int = 32, root=None):
    """A whole dataset as tensors ``(uint8 (N, 3, S, S), int64 (N,))`` for GPU preloading.

    ``dataset`` is "fashion-mnist" (image_size must be 32) or a path to an image folder.
    """
    if dataset in ("fashion-mnist", "fashion_mnist", "fmnist"):
        images, labels = load_fashion_mnist(split, root)
        if image_size != 32:
            raise ValueError(f"Fashion-MNIST images are 32x32, but image_size={image_size}")
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
    ds = ImageFolderDataset(dataset, image_size)
    imgs, labels = [], []
    for i in range(len(ds)):
        x, y = ds[i]
        imgs.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(y)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)


def synthetic_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Deterministic smooth random uint8 images (N, 3, S, S): low-res noise upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(size // 4, 1), max(size // 4, 1), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def load_dataset_tensors(data: str, image_size: int, root=None, split: str = "train", num_classes: int = 10):
    """(uint8 images (N, 3, S, S), int64 labels (N,)) for 'fashion-mnist', 'synthetic[:N]' or an image folder."""
    if data.startswith("synthetic"):
        n = int(data.split(":", 1)[1]) if ":" in data else 256
        imgs = synthetic_images(n, image_size, seed=1234)
        labels = torch.arange(n, dtype=torch.int64) % num_classes
        return imgs, labels
    return load_image_tensors(data, split=split, image_size=image_size, root=root)
