"""The segmentation demo's data and the segmentation template's datalist and learner, without a study:
the files a site is given are what dataset.json says, readable by nibabel/NumPy, and heterogeneous across
sites; a wrong dataset.json fails with one line naming the file, entry and field; 3D is a config change."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from provision.demo import SEGMENTATION_TEMPLATE
from provision.demo_segmentation import SiteMix, write_segmentation_data, write_site_images
from runtime.learner import SiteContext

from ..conftest import REPO

CUSTOM = SEGMENTATION_TEMPLATE / "custom"


def _template_module(name: str):
    """A module of the template's custom/ folder, loaded as the worker does (custom/ on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"segmentation_{name}", CUSTOM / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(CUSTOM))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(CUSTOM))
    return module


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) if path.name.endswith(".nii.gz") else np.load(path)


def test_sites_get_a_valid_datalist_of_readable_heterogeneous_images(tmp_path):
    data = write_segmentation_data(tmp_path, ["site-1", "site-2", "site-3"])
    datalist = _template_module("datalist")
    sizes, foreground, formats = [], [], set()
    for site, root in data.site_dirs.items():
        raw = json.loads((root / "dataset.json").read_text())
        assert raw["numTraining"] == len(raw["training"]) > 0 and raw["validation"], site
        files = datalist.read_datalist(root)  # every listed path resolves to a file under the data root
        assert len(files["training"]) == len(raw["training"])
        site_fg = []
        for pair in files["training"] + files["validation"]:
            image, label = _read(Path(pair["image"])), _read(Path(pair["label"]))
            assert image.shape == label.shape == (64, 64)
            assert set(np.unique(label)) <= {0, 1} and label.any()
            site_fg.append(label.mean())
            formats.add(Path(pair["image"]).suffix)
        sizes.append(len(files["training"]))
        foreground.append(float(np.mean(site_fg)))
    assert len(set(sizes)) == 3, "sites differ in size"
    assert max(foreground) > 1.5 * min(foreground), f"sites differ in label balance: {foreground}"
    assert formats == {".gz", ".npy"}, "one site is NIfTI, the others NumPy"
    nifti = next((data.site_dirs["site-1"] / "imagesTr").glob("*.nii.gz"))
    assert nib.load(nifti).header.get_data_dtype() == np.float32
    heldout = json.loads((data.heldout_dir / "dataset.json").read_text())
    assert heldout["training"] == [] and len(heldout["validation"]) == 12


@pytest.mark.parametrize("content, expected", [
    (None, "dataset.json: no such file"),
    ("{not json", "not readable JSON"),
    (json.dumps({"training": [{"image": "./imagesTr/case_000.nii.gz"}]}), "training.0.label: Field required"),
    (json.dumps({"training": [{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/missing.nii.gz"}]}),
     "training[0].label = './labelsTr/missing.nii.gz': no such file"),
    (json.dumps({"validation": [{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.png"}]}),
     "validation[0].label = './labelsTr/case_000.png': not a NIfTI"),
])
def test_a_wrong_datalist_fails_with_one_line_naming_file_and_field(tmp_path, content, expected):
    write_site_images(tmp_path, SiteMix(2, 0.1, 2, 8, "nifti"), seed=0)
    (tmp_path / "labelsTr" / "case_000.png").write_bytes(b"x")
    (tmp_path / "dataset.json").unlink()
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    datalist = _template_module("datalist")
    with pytest.raises(datalist.DatalistError) as raised:
        datalist.read_datalist(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "dataset.json") in message and expected in message, message


def test_3d_is_a_config_change(tmp_path):
    """spatial_dims: 3 with a 3-number spatial_size trains and validates on NIfTI volumes."""
    from monai.data import create_test_image_3d

    rng = np.random.RandomState(0)
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    entries = []
    for i in range(3):
        image, label = create_test_image_3d(20, 20, 20, num_objs=2, rad_max=6, rad_min=3, num_seg_classes=1,
                                            random_state=rng)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), tmp_path / "imagesTr" / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), tmp_path / "labelsTr" / f"v{i}.nii.gz")
        entries.append({"image": f"imagesTr/v{i}.nii.gz", "label": f"labelsTr/v{i}.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({"training": entries[1:], "validation": entries[:1]}))
    learner_module = _template_module("learner")
    context = SiteContext(site="s", job_id="j", data_root=tmp_path, work_dir=tmp_path)
    learner = learner_module.SegmentationLearner(context, spatial_dims=3, spatial_size=[16, 16, 16],
                                                 channels=[4, 8], epochs=1, batch_size=2)
    weights = learner.initial_weights()
    assert any(w.ndim == 5 for w in weights.values()), "3D convolutions"
    result = learner.train(weights, round=1)
    assert result.n_samples == 2 and np.isfinite(result.metrics["loss"])
    metrics = learner.validate(result.weights)
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n_samples"] == 1.0

    with pytest.raises(ValueError, match=r"spatial_size \[18, 18, 18\] must be divisible by 4"):
        learner_module.SegmentationLearner(context, spatial_dims=3, spatial_size=[18, 18, 18])


def test_demo_refuses_an_unknown_task_in_one_line():
    done = subprocess.run([sys.executable, "-m", "provision.cli", "demo", "--task", "detection"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert "--task detection: choose one of tabular, segmentation" in done.stderr
    assert "Traceback" not in done.stderr
