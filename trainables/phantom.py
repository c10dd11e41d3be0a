"""Chest-X-ray-like phantoms for the demo, the tests and the pretraining corpus.

Why the findings look the way they do: a linear probe on a *randomly initialised* ViT must not
solve the task, otherwise LoRA and pretraining have nothing to show. Bright blobs or bands that
change the image's overall statistics are found by random features (measured: 0.72 macro AUROC).
So every image carries the same four lesion shapes (disk, ring, horizontal bar, vertical bar),
one of each, with the same total intensity; a finding is *which lung zone* a given shape sits in.
Bag-of-features pooling sees the same content in every image; only features that bind shape to
position (what a trained ViT learns) can tell the labels apart. Anatomy (body, lungs, spine,
heart, ribs) varies by patient, and contrast, offset and noise vary by image.

`write_nih_phantom` writes the dataset in the real NIH ChestX-ray14 layout: `images/*.png`,
`Data_Entry_2017.csv` with the published header, and MED-PEFT split lists.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainables.datasets.nih import NIH_LABELS

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
SHAPES = ("disk", "ring", "hbar", "vbar")
ZONES = ("left_upper", "left_lower", "right_upper", "right_lower")
# (shape, zone) pairs that carry a label, in NIH label order; the last two pairs stay unlabelled.
FINDING_PAIRS = tuple((s, z) for s in SHAPES for z in ZONES)[:14]
CORPUS_PAIRS = tuple((s, z) for s in SHAPES for z in ZONES)

@dataclass(frozen=True)
class Anatomy:
    """Per-patient geometry, shared by all images of that patient."""

    body_dx: float
    body_dy: float
    lung_rx: float
    lung_ry: float
    lung_gap: float
    rib_phase: float

    @property
    def centre(self) -> tuple[float, float]:
        """The body's centre (y, x) on the 64x64 canvas."""
        return 33.0 + self.body_dy, 32.0 + self.body_dx

    @property
    def lung_cy(self) -> float:
        """The lungs' vertical centre on the 64x64 canvas."""
        return self.centre[0] - 3.0


def _patient_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        body_dx=rng.uniform(-2.5, 2.5), body_dy=rng.uniform(-2.5, 2.5),
        lung_rx=rng.uniform(8.5, 10.5), lung_ry=rng.uniform(15.0, 18.0),
        lung_gap=rng.uniform(11.0, 13.5), rib_phase=rng.uniform(0, 2 * np.pi),
    )


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _stamp(shape: str, yy, xx, cy, cx) -> np.ndarray:
    """One lesion; the amplitudes give every shape the same total intensity (about 10)."""
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    if shape == "disk":
        return 0.35 * (d2 <= 9.0)
    if shape == "ring":
        return 0.28 * ((d2 >= 4.84) & (d2 <= 16.0))
    if shape == "hbar":
        return 0.41 * ((np.abs(yy - cy) <= 1.0) & (np.abs(xx - cx) <= 4.0))
    return 0.41 * ((np.abs(xx - cx) <= 1.0) & (np.abs(yy - cy) <= 4.0))


def _lesion_centres(anatomy: Anatomy, zones: dict[str, str],
                    rng: np.random.Generator) -> dict[str, tuple[float, float]]:
    """Where each shape sits, (y, x) on the 64x64 canvas: its zone's centre, jittered."""
    cx = anatomy.centre[1]
    centres = {}
    for shape, zone in zones.items():
        side = -1 if zone.startswith("left") else 1
        dy = -0.45 if zone.endswith("upper") else 0.45
        centres[shape] = (anatomy.lung_cy + dy * anatomy.lung_ry + rng.uniform(-2.0, 2.0),
                          cx + side * anatomy.lung_gap + rng.uniform(-2.0, 2.0))
    return centres


def render(anatomy: Anatomy, zones: dict[str, str], rng: np.random.Generator,
           size: int = 64) -> np.ndarray:
    """Render one 64x64 phantom (then resized to `size`) as uint8; `zones` maps shape -> zone."""
    return _render(anatomy, _lesion_centres(anatomy, zones, rng), rng, size)


def _render(anatomy: Anatomy, centres: dict[str, tuple[float, float]],
            rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    cy, cx = anatomy.centre
    img = 0.12 + 0.38 * _ellipse(yy, xx, cy, cx, 30.0, 27.0)
    for side in (-1, 1):
        lung = _ellipse(yy, xx, anatomy.lung_cy, cx + side * anatomy.lung_gap, anatomy.lung_ry,
                        anatomy.lung_rx)
        ribs = 0.05 * np.sin(0.9 * yy + anatomy.rib_phase + 0.15 * side * xx)
        img = np.where(lung, 0.2 + ribs, img)
    img = img + 0.12 * (np.abs(xx - cx) <= 2.5) * (yy > cy - 26)
    img = img + 0.1 * _ellipse(yy, xx, cy + 9.0, cx + 3.0, 7.0, 8.0)
    for shape, (zy, zx) in centres.items():
        img = img + _stamp(shape, yy, xx, zy, zx)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img = img + rng.normal(0.0, 0.04, img.shape)
    out = (np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    if size != 64:
        out = np.asarray(Image.fromarray(out).resize((size, size), Image.BILINEAR))
    return out


def _draw_zones(rng: np.random.Generator) -> dict[str, str]:
    return {shape: ZONES[rng.integers(len(ZONES))] for shape in SHAPES}


def _labels(zones: dict[str, str], pairs: tuple[tuple[str, str], ...]) -> np.ndarray:
    return np.array([zones[s] == z for s, z in pairs], dtype=np.float32)


@dataclass(frozen=True)
class Corpus:
    """An in-memory pretraining corpus of new patients: uint8 images, the 16 shape-zone labels,
    and where each shape sits: `centres[i, k]` is shape k's (y, x) in image i, in pixels of
    the `size`-pixel image."""

    images: np.ndarray
    labels: np.ndarray
    centres: np.ndarray

    def finding_maps(self, patch: int) -> np.ndarray:
        """Per patch of a `patch`-pixel grid, the findings (shape, zone) whose shape has its
        centre in it: float32 (images, patches in row order, CORPUS_PAIRS)."""
        grid = self.images.shape[1] // patch
        cells = np.clip((self.centres // patch).astype(np.int64), 0, grid - 1)
        where = cells[..., 0] * grid + cells[..., 1]  # (images, shapes): the patch
        # (images, shapes): the finding, i.e. the pair of that shape and the zone it is in
        finding = self.labels.reshape(len(self.images), len(SHAPES), len(ZONES)).argmax(-1) + (
            np.arange(len(SHAPES)) * len(ZONES))
        maps = np.zeros((len(self.images), grid * grid, len(CORPUS_PAIRS)), dtype=np.float32)
        maps[np.arange(len(self.images))[:, None], where, finding] = 1.0
        return maps


def make_corpus(n_images: int, seed: int, size: int) -> Corpus:
    rng = np.random.default_rng(seed)
    images = np.empty((n_images, size, size), dtype=np.uint8)
    labels = np.empty((n_images, len(CORPUS_PAIRS)), dtype=np.float32)
    centres = np.empty((n_images, len(SHAPES), 2), dtype=np.float32)
    anatomy = _patient_anatomy(rng)
    for i in range(n_images):
        if i % 3 == 0:
            anatomy = _patient_anatomy(rng)
        zones = _draw_zones(rng)
        where = _lesion_centres(anatomy, zones, rng)
        images[i] = _render(anatomy, where, rng, size)
        labels[i] = _labels(zones, CORPUS_PAIRS)
        centres[i] = [(y * size / 64.0, x * size / 64.0) for y, x in (where[s] for s in SHAPES)]
    return Corpus(images, labels, centres)


@dataclass(frozen=True)
class PhantomLayout:
    """How many patients go to each split of the written dataset."""

    train_patients: int = 400
    val_patients: int = 120
    test_patients: int = 200
    max_images_per_patient: int = 3


def write_nih_phantom(root: Path, seed: int, layout: PhantomLayout = PhantomLayout()) -> Path:
    """Write a phantom NIH ChestX-ray14 download plus MED-PEFT lists under `root`.

    Patient-disjoint train/val/test; `train_10.txt` and `train_1.txt` hold the images of the first
    10% and 1% of the (shuffled) train patients. Deterministic in `seed`. Returns `root`.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_patients = layout.train_patients + layout.val_patients + layout.test_patients
    patient_ids = rng.permutation(np.arange(1, 3 * n_patients + 1))[:n_patients]
    rows: list[list[str]] = []
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    train_line_patients: list[int] = []
    for order, pid in enumerate(patient_ids):
        split = ("train" if order < layout.train_patients else
                 "val" if order < layout.train_patients + layout.val_patients else "test")
        anatomy = _patient_anatomy(rng)
        age, sex = int(rng.integers(18, 90)), ("M", "F")[rng.integers(2)]
        for k in range(int(rng.integers(1, layout.max_images_per_patient + 1))):
            name = f"{pid:08d}_{k:03d}.png"
            zones = _draw_zones(rng)
            Image.fromarray(render(anatomy, zones, rng)).save(root / "images" / name)
            y = _labels(zones, FINDING_PAIRS)
            found = "|".join(n for n, v in zip(NIH_LABELS, y) if v) or "No Finding"
            view = ("PA", "AP")[rng.integers(2)]
            rows.append([name, found, str(k), str(pid), str(age + k), sex, view, "64", "64",
                         "0.143", "0.143"])
            lines[split].append(name + " " + " ".join(str(int(v)) for v in y))
            if split == "train":
                train_line_patients.append(order)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        fh.write(NIH_HEADER + "\n")
        csv.writer(fh, lineterminator="\n").writerows(rows)
    _write_list(root / "train_list.txt", lines["train"])
    _write_list(root / "val_list.txt", lines["val"])
    _write_list(root / "test_list.txt", lines["test"])
    for pct in (10, 1):
        cutoff = max(1, round(layout.train_patients * pct / 100))
        subset = [ln for ln, o in zip(lines["train"], train_line_patients) if o < cutoff]
        _write_list(root / f"train_{pct}.txt", subset)
    return root


def _write_list(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")
