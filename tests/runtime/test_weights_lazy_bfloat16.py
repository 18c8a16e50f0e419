"""ml_dtypes costs about 1.6 CPU-seconds to import (NumPy 2.4 ufunc registration), once per training worker:
a float32 model is read, written, checked and averaged without it, and a bfloat16 one still round-trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FLOAT32_PATH = """
import sys
from pathlib import Path
import numpy as np
from runtime.weights import check_update, from_bytes, is_float_dtype, load_file, save_file, to_bytes, wide_dtype
from runtime.model_bytes import SerializedModel
from runtime.aggregators.fedavg import fold, start_sum, server_step
model = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, dtype=np.int64)}
path = Path(sys.argv[1])
save_file(model, path)
back = load_file(path)
check_update(back, model)
assert from_bytes(to_bytes(model))["w"].tolist() == model["w"].tolist()
SerializedModel.save(model, path)
acc = fold(start_sum(model), {"w": np.ones((2, 3), np.float32)}, 2.0)
new, _ = server_step(model, acc, 1.0, 0.0, {})
assert new["w"].tolist() == (model["w"] + 1).tolist()
assert is_float_dtype(np.dtype(np.float32)) and wide_dtype(np.dtype(np.float16)) == np.float32
print("ml_dtypes" in sys.modules)
"""

BFLOAT16_PATH = """
import sys
from pathlib import Path
import numpy as np
from runtime.weights import load_file, save_file, is_half_dtype, is_float_dtype
import ml_dtypes
model = {"w": np.linspace(-1, 1, 8).astype(ml_dtypes.bfloat16)}
path = Path(sys.argv[1])
save_file(model, path)
back = load_file(path)
assert back["w"].dtype == np.dtype(ml_dtypes.bfloat16) and is_half_dtype(back["w"].dtype)
assert is_float_dtype(back["w"].dtype) and back["w"].tobytes() == model["w"].tobytes()
print("ok")
"""


def _run(code: str, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.safetensors")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_float32_model_never_imports_ml_dtypes(tmp_path: Path) -> None:
    assert _run(FLOAT32_PATH, tmp_path) == "False"


def test_a_bfloat16_model_still_round_trips_through_a_file(tmp_path: Path) -> None:
    assert _run(BFLOAT16_PATH, tmp_path) == "ok"


def test_bfloat16_and_half_dtypes_stay_importable_by_name() -> None:
    import ml_dtypes
    import numpy as np

    from runtime.weights import BFLOAT16, HALF_DTYPES

    assert BFLOAT16 == np.dtype(ml_dtypes.bfloat16)
    assert HALF_DTYPES == (np.dtype(np.float16), BFLOAT16)
