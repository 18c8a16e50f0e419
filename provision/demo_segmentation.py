"""Per-site data for the segmentation demo: synthetic 2D images from MONAI's `create_test_image_2d`.

Each site gets a data root with a Medical-Decathlon-style `dataset.json` ("training" and "validation" lists
of {"image", "label"} paths relative to the data root) and the image/label files it lists. Sites differ in
size, noise and label balance (how many and how large the foreground circles are), as hospitals differ in
case volume, scanners and case mix; that heterogeneity is what federation has to cope with. The first site
stores NIfTI (.nii.gz, read with nibabel) and the others NumPy (.npy), so a study exercises both readers.
A held-out set, which no site sees, is kept by the lead to score the global model before and after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATALIST_NAME = "dataset.json"


@dataclass(frozen=True)
class SiteMix:
    """How one site's synthetic images look: how many, how noisy, how much foreground, stored as what."""

    n_images: int
    noise_max: float        # uniform noise amplitude added to the [0, 1] image
    num_objs: int           # foreground circles per image ...
    rad_max: int            # ... of radius up to this many pixels: label balance
    file_format: str        # "nifti" or "npy"


# A larger clean site with few small structures, a mid-sized noisy one with large ones, a small one between.
SITE_MIXES = [SiteMix(24, 0.2, 3, 8, "nifti"), SiteMix(16, 0.6, 6, 14, "npy"), SiteMix(10, 0.4, 4, 11, "npy")]
HELDOUT_MIX = SiteMix(12, 0.4, 5, 11, "nifti")


@dataclass(frozen=True)
class SegmentationData:
    site_dirs: dict[str, Path]
    heldout_dir: Path       # a data root of its own: dataset.json lists every held-out image under "validation"


def _save(path: Path, array: np.ndarray, file_format: str) -> str:
    """Write one image or label; returns the file's name (the suffix names the reader MONAI picks)."""
    if file_format == "nifti":
        import nibabel as nib  # only the lead's machine and client kits have it

        name = path.name + ".nii.gz"
        nib.save(nib.Nifti1Image(array, np.eye(4)), path.parent / name)
    elif file_format == "npy":
        name = path.name + ".npy"
        np.save(path.parent / name, array)
    else:
        raise ValueError(f"file_format '{file_format}': use 'nifti' or 'npy'")
    return name


def write_site_images(root: Path, mix: SiteMix, seed: int, image_size_px: int = 64,
                      validation_fraction: float = 0.25, all_validation: bool = False) -> Path:
    """Write `root/imagesTr/`, `root/labelsTr/` and `root/dataset.json` for one site; returns the datalist."""
    from monai.data import create_test_image_2d  # heavy import; only the segmentation demo needs it

    rng = np.random.RandomState(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(mix.n_images):
        image, label = create_test_image_2d(image_size_px, image_size_px, num_objs=mix.num_objs,
                                            rad_max=mix.rad_max, rad_min=min(4, mix.rad_max),
                                            noise_max=mix.noise_max, num_seg_classes=1, random_state=rng)
        image_name = _save(root / "imagesTr" / f"case_{i:03d}", image.astype(np.float32), mix.file_format)
        label_name = _save(root / "labelsTr" / f"case_{i:03d}", label.astype(np.uint8), mix.file_format)
        entries.append({"image": f"./imagesTr/{image_name}", "label": f"./labelsTr/{label_name}"})
    n_val = len(entries) if all_validation else max(2, round(len(entries) * validation_fraction))
    datalist = {
        "name": "fedkit synthetic circles",
        "description": "create_test_image_2d: bright circles on noise; label 1 = circle",
        "modality": {"0": "synthetic"},
        "labels": {"0": "background", "1": "circle"},
        "numTraining": len(entries) - n_val,
        "training": entries[n_val:],
        "validation": entries[:n_val],
    }
    path = root / DATALIST_NAME
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    return path


def write_segmentation_data(dest: Path, sites: list[str], seed: int = 0,
                            image_size_px: int = 64) -> SegmentationData:
    """Write `dest/<site>/` (a data root per site) and `dest/heldout/` (the lead's test set)."""
    site_dirs = {}
    for i, site in enumerate(sites):
        mix = SITE_MIXES[i % len(SITE_MIXES)]
        write_site_images(dest / site, mix, seed=seed * 1000 + i, image_size_px=image_size_px)
        site_dirs[site] = dest / site
    heldout = dest / "heldout"
    write_site_images(heldout, HELDOUT_MIX, seed=seed * 1000 + 999, image_size_px=image_size_px,
                      all_validation=True)
    return SegmentationData(site_dirs=site_dirs, heldout_dir=heldout)


def heldout_metrics(job_dir: Path, weights_file: Path, heldout_dir: Path) -> dict[str, float]:
    """Score a model file on the held-out set with the job's own learner (its config_fed_client.yml args),
    as a new site would: the same code path the sites validate with."""
    import importlib.util
    import sys

    import yaml

    from runtime.learner import SiteContext
    from runtime.weights import load_file

    config = yaml.safe_load((job_dir / "config_fed_client.yml").read_text())
    module_name, class_name = config["learner"]["path"].split(":")
    custom = job_dir / "custom"
    spec = importlib.util.spec_from_file_location(f"_heldout_{module_name}", custom / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(custom))  # the learner's own sibling modules (datalist.py)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(custom))
    work_dir = heldout_dir / ".scratch"
    work_dir.mkdir(exist_ok=True)
    context = SiteContext(site="heldout", job_id="heldout", data_root=heldout_dir, work_dir=work_dir)
    learner = getattr(module, class_name)(context, **(config["learner"].get("args") or {}))
    return learner.validate(load_file(weights_file))


def describe_site(site: str, site_dir: Path) -> str:
    """One line for the demo: how many images the site holds and in which format."""
    datalist = json.loads((site_dir / DATALIST_NAME).read_text())
    n_train, n_val = len(datalist["training"]), len(datalist["validation"])
    kind = "NIfTI" if datalist["training"][0]["image"].endswith(".nii.gz") else "NumPy"
    return (f"{site}: {n_train} training + {n_val} validation images ({kind}) listed in "
            f"{site_dir / DATALIST_NAME} (they never leave the site)")


def report_heldout(job_dir: Path, models_dir: Path, heldout_dir: Path) -> list[str]:
    """The demo's closing lines: Dice on the held-out images of the round-0 model and of the final global."""
    before = heldout_metrics(job_dir, models_dir / "initial.safetensors", heldout_dir)
    after = heldout_metrics(job_dir, models_dir / "global.safetensors", heldout_dir)
    n_images = int(after["n_samples"])
    verdict = "better" if after["dice"] > before["dice"] else "NOT better"
    return [f"held-out Dice ({n_images} images no site saw): round 0 {before['dice']:.4f} -> "
            f"final global {after['dice']:.4f} ({verdict})"]
