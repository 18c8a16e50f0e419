"""The site's datalist: a Medical-Decathlon-style `dataset.json` in its data root, read into checked paths.

    {"training":   [{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}, ...],
     "validation": [{"image": "./imagesTr/case_100.npy",    "label": "./labelsTr/case_100.npy"}, ...]}

Paths are relative to the data root (absolute ones are taken as they are). Other keys (name, labels,
modality, numTraining, a Decathlon "test" list of bare paths) are allowed and ignored. The file is the
site's, but a wrong one should fail with one line naming the file, the entry and the fix, before any
training starts, rather than as a reader's traceback halfway through a round.
"""

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SUFFIXES = (".nii", ".nii.gz", ".npy")


class DatalistError(ValueError):
    """dataset.json is missing, malformed, or lists a file that cannot be read; the message says which."""


class Pair(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str = Field(min_length=1)
    label: str = Field(min_length=1)


class Datalist(BaseModel):
    model_config = ConfigDict(extra="ignore")
    training: list[Pair] = Field(default_factory=list)
    validation: list[Pair] = Field(default_factory=list)


def _resolve(root: Path, source: Path, split: str, index: int, field: str, value: str) -> str:
    path = Path(value) if Path(value).is_absolute() else root / value
    where = f"{source}: {split}[{index}].{field}"
    if not path.name.endswith(SUFFIXES):
        raise DatalistError(f"{where} = '{value}': not a NIfTI (.nii, .nii.gz) or NumPy (.npy) file; convert it")
    if not path.is_file():
        raise DatalistError(f"{where} = '{value}': no such file under {root}; fix the path or add the file")
    return str(path)


def read_datalist(data_root: Path, name: str = "dataset.json") -> dict[str, list[dict[str, str]]]:
    """{"training": [{"image": abs path, "label": abs path}, ...], "validation": [...]} from the site's file."""
    source = data_root / name
    try:
        raw = json.loads(source.read_text())
    except FileNotFoundError:
        raise DatalistError(f"{source}: no such file; write the site's datalist there (docs/segmentation.md) "
                            "or set the learner's `datalist` argument") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatalistError(f"{source}: not readable JSON ({e}); fix the file") from None
    try:
        datalist = Datalist.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise DatalistError(f"{source}: {field}: {first['msg']}; each entry needs \"image\" and \"label\" "
                            "paths") from None
    return {split: [{field: _resolve(data_root, source, split, i, field, getattr(pair, field))
                     for field in ("image", "label")} for i, pair in enumerate(getattr(datalist, split))]
            for split in ("training", "validation")}
