"""Small datasets and images in the real on-disk formats, written by the data tests.

Each writer returns what it wrote (ids and labels) so tests can assert against it. Images are
tiny; for many-image fixtures one encoded file is written under every name (fast, still real).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
NIH_HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
NIH_HEADER_2020 = NIH_HEADER_2017.rstrip(",")
CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                        "Pleural Effusion")
# Class prevalences of the NIH fixture: common to rare, like the real data.
NIH_RATES = (0.3, 0.1, 0.25, 0.35, 0.12, 0.12, 0.06, 0.1, 0.1, 0.06, 0.08, 0.06, 0.1, 0.04)


# --- single images -----------------------------------------------------------------------

def gradient(height: int = 16, width: int = 12, top: int = 255) -> np.ndarray:
    """A deterministic non-constant test image with values 0..top."""
    ramp = np.linspace(0.0, 1.0, height * width).reshape(height, width)
    return np.rint(ramp * top)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png8(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(array.astype(np.uint8)))
    return path


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit grayscale PNG (Pillow mode I;16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(array.astype(np.uint16)))
    return path


def write_rgba(path: Path, gray: np.ndarray) -> Path:
    """An RGBA PNG whose colour channels all hold `gray` (alpha half transparent)."""
    g = gray.astype(np.uint8)
    rgba = np.stack([g, g, g, np.full_like(g, 128)], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, mode="RGBA").save(path)
    return path


def write_jpeg(path: Path, array: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, format="JPEG", quality=quality)
    return path


def write_dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2",
                slope: float = 1.0, intercept: float = 0.0, bits_stored: int = 12,
                bits_allocated: int = 16, patient_id: str = "p") -> Path:
    """An uncompressed single-frame DICOM holding `stored` (raw stored values, unsigned)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    dtype = np.uint16 if bits_allocated == 16 else np.uint8
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- NIH ChestX-ray14 -----------------------------------------------------------------

@dataclass(frozen=True)
class NIHFixture:
    root: Path
    names: tuple[str, ...]
    patients: tuple[str, ...]
    labels: np.ndarray


def nih_labels(n_images: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.random((n_images, len(NIH_LABELS))) < np.array(NIH_RATES)).astype(np.float32)


def write_nih(root: Path, n_patients: int = 60, seed: int = 0, header: str = "2017",
              layout: str = "images", max_images: int = 3, extra_rows: tuple[str, ...] = ()
              ) -> NIHFixture:
    """An NIH download: PNGs, the metadata CSV (header '2017' with trailing comma or '2020')."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, max_images + 1, size=n_patients)
    names: list[str] = []
    patients: list[str] = []
    for pid, count in zip(range(1, n_patients + 1), per_patient):
        for k in range(int(count)):
            names.append(f"{pid:08d}_{k:03d}.png")
            patients.append(str(pid))
    labels = nih_labels(len(names), rng)
    encoded = png_bytes(gradient().astype(np.uint8))
    for i, name in enumerate(names):
        folder = (root / "images" if layout == "images"
                  else root / f"images_{i % 3 + 1:03d}" / "images")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encoded)
    csv_name = "Data_Entry_2017.csv" if header == "2017" else "Data_Entry_2017_v2020.csv"
    head = NIH_HEADER_2017 if header == "2017" else NIH_HEADER_2020
    with open(root / csv_name, "w", newline="") as fh:
        fh.write(head + "\n")
        writer = csv.writer(fh, lineterminator="\n")
        for name, pid, y in zip(names, patients, labels):
            found = "|".join(n for n, v in zip(NIH_LABELS, y) if v) or "No Finding"
            row = [name, found, name[9:12].lstrip("0") or "0", pid, str(20 + int(pid) % 60),
                   "MF"[int(pid) % 2], ("PA", "AP")[int(pid) % 2], "16", "12", "0.14", "0.14"]
            writer.writerow(row + ([""] if header == "2017" else []))
        fh.writelines(line + "\n" for line in extra_rows)
    return NIHFixture(root, tuple(names), tuple(patients), labels)


def write_list(path: Path, rows: list[tuple[str, np.ndarray]], crlf: bool = False,
               trailing_space: bool = False) -> Path:
    end = (" " if trailing_space else "") + ("\r\n" if crlf else "\n")
    text = "".join(p + " " + " ".join(str(int(v)) for v in y) + end for p, y in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, newline="")
    return path


def write_nih_lists(fixture: NIHFixture, folder: Path, crlf: bool = True) -> dict[str, set[str]]:
    """MED-PEFT lists, 60/20/20 by patient, 10% and 1% of train patients; patients per split."""
    unique = sorted(set(fixture.patients), key=int)
    n = len(unique)
    parts = {"train": unique[: n * 6 // 10], "val": unique[n * 6 // 10: n * 8 // 10],
             "test": unique[n * 8 // 10:]}

    def rows_of(patients: list[str]) -> list[tuple[str, np.ndarray]]:
        keep = set(patients)
        return [(name, y) for name, p, y in zip(fixture.names, fixture.patients, fixture.labels)
                if p in keep]

    train = parts["train"]
    write_list(folder / "train_list.txt", rows_of(train), crlf=crlf)
    write_list(folder / "train_10.txt", rows_of(train[: max(1, len(train) // 10)]), crlf=crlf)
    write_list(folder / "train_1.txt", rows_of(train[: max(1, len(train) // 100)]), crlf=crlf)
    write_list(folder / "val_list.txt", rows_of(parts["val"]), crlf=crlf)
    write_list(folder / "test_list.txt", rows_of(parts["test"]), crlf=crlf)
    return {s: set(ps) for s, ps in parts.items()}


# --- CheXpert --------------------------------------------------------------------------

@dataclass(frozen=True)
class CheXpertFixture:
    root: Path          # the folder holding `base`
    base: str           # "CheXpert-v1.0-small" or "CheXpert-v1.0"
    train_paths: tuple[str, ...]    # as written in the CSV's Path column
    raw: np.ndarray     # (n, 5) competition labels as written: 1, 0, -1, NaN for empty
    frontal: np.ndarray


def write_chexpert(root: Path, n_patients: int = 40, seed: int = 0,
                   base: str = "CheXpert-v1.0-small", n_valid: int = 6) -> CheXpertFixture:
    """train.csv / valid.csv with 14 observations valued 1, 0, -1 or empty, plus JPEGs."""
    rng = np.random.default_rng(seed)
    encoded = io.BytesIO()
    Image.fromarray(gradient().astype(np.uint8)).save(encoded, format="JPEG")
    paths: list[str] = []
    raws: list[np.ndarray] = []
    frontal: list[bool] = []
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
    for split, first, count in (("train", 1, n_patients), ("valid", 64541, n_valid)):
        lines = []
        for pid in range(first, first + count):
            for study in (1, 2)[: 1 + pid % 2]:
                for view, is_frontal in (("view1_frontal", True), ("view2_lateral", False)):
                    if not is_frontal and pid % 3:
                        continue
                    rel = f"{base}/{split}/patient{pid:05d}/study{study}/{view}.jpg"
                    target = root / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(encoded.getvalue())
                    values = rng.choice([1.0, 0.0, -1.0, np.nan], size=len(CHEXPERT_OBSERVATIONS),
                                        p=[0.3, 0.3, 0.2, 0.2])
                    if split == "valid":
                        values = np.where(np.isnan(values) | (values < 0), 0.0, values)
                    cells = ["" if np.isnan(v) else f"{v:.1f}" for v in values]
                    lines.append([rel, "MF"[pid % 2], str(30 + pid % 50),
                                  "Frontal" if is_frontal else "Lateral",
                                  "AP" if is_frontal else "", *cells])
                    if split == "train":
                        paths.append(rel)
                        frontal.append(is_frontal)
                        order = [CHEXPERT_OBSERVATIONS.index(c) for c in CHEXPERT_COMPETITION]
                        raws.append(values[order])
        with open(root / base / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(lines)
    return CheXpertFixture(root, base, tuple(paths), np.array(raws), np.array(frontal))


# --- RSNA Pneumonia --------------------------------------------------------------------

@dataclass(frozen=True)
class RSNAFixture:
    root: Path
    patient_ids: tuple[str, ...]
    targets: np.ndarray


def write_rsna(root: Path, n_patients: int = 30, seed: int = 0) -> RSNAFixture:
    """stage_2_train_labels.csv (several box rows for positives) and one DICOM per patient."""
    rng = np.random.default_rng(seed)
    ids = tuple(f"{i:08x}-0000-4000-8000-{seed:012x}" for i in range(n_patients))
    targets = (rng.random(n_patients) < 0.3).astype(np.float32)
    targets[:2] = (1.0, 0.0)
    rows = []
    for pid, t in zip(ids, targets):
        if t:
            for _ in range(int(rng.integers(1, 4))):
                rows.append([pid, "100", "120", "50", "60", "1"])
        else:
            rows.append([pid, "", "", "", "", "0"])
    (root / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    with open(root / "stage_2_train_labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        writer.writerows(rows)
    template = root / "stage_2_train_images" / f"{ids[0]}.dcm"
    write_dicom(template, gradient(8, 8, 4095), patient_id=ids[0])
    data = template.read_bytes()
    for pid in ids[1:]:
        (root / "stage_2_train_images" / f"{pid}.dcm").write_bytes(data)
    return RSNAFixture(root, ids, targets)


def write_dicom_jpeg(path: Path, gray: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """An 8-bit DICOM with JPEG-baseline compressed pixel data (how RSNA ships its images)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    encoded = io.BytesIO()
    Image.fromarray(gray.astype(np.uint8)).save(encoded, format="JPEG", quality=95)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([encoded.getvalue()])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
