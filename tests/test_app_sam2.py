"""The MONAI Label app on the SAM2 (Hiera) backbone family: the same REST flow as with SAM ViT, in-process."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import app_client


@pytest.fixture()
def sam2_client(tmp_path, monkeypatch):
    with app_client(tmp_path, monkeypatch, preset="sam2_tiny", image_size=64, epochs=1) as c:
        yield c


def _label_volume(response, tmp_path) -> np.ndarray:
    """The label image of an `output=image` answer (a .nii.gz file)."""
    path = tmp_path / "answer.nii.gz"
    path.write_bytes(response.content)
    return np.asarray(nib.load(str(path)).dataobj)


def test_sam2_preset_serves_segments_and_trains(sam2_client, tmp_path):
    client = sam2_client
    image = client.store["unlabeled"][0]
    shape = nib.load(str(client.store["studies"] / f"{image}.nii.gz")).shape

    r = client.post(f"/infer/samora?image={image}&output=image", data={"params": "{}"})
    assert r.status_code == 409, r.text[:300]  # untrained heads: no auto-segmentation before the first training

    params = {"label": "liver", "foreground": [[32, 32, 12]], "background": [], "roi": [], "slice": 12}
    r = client.post(f"/infer/samora_prompt?image={image}&output=image", data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text[:300]
    assert _label_volume(r, tmp_path).shape == shape

    r = client.post("/train/samora_ssl?run_sync=true", json={"max_steps": 2, "batch_size": 2})
    assert r.status_code == 200, r.text[:300]
    r = client.post("/train/samora?run_sync=true", json={"epochs": 1})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["model_version"] == 1
    meta = client.get("/info/").json()["train_stats"]["samora"]
    assert meta["epoch"] == 1 and meta["total_epochs"] == 1
    model_dir = tmp_path / "model"
    assert sorted(p.name for p in (model_dir / "experts").glob("expert_*.safetensors")) == [
        "expert_image.safetensors",
        "expert_patch.safetensors",
        "expert_pixel.safetensors",
    ]
    published = json.loads((model_dir / "versions" / "v000001" / "model.json").read_text())
    assert published["backbone"] == {"family": "sam2", "preset": "sam2_tiny"}
    r = client.post(f"/infer/samora?image={image}&output=image", data={"params": "{}"})
    assert r.status_code == 200, r.text[:300]
    assert _label_volume(r, tmp_path).shape == shape


def test_sam2_preset_refuses_an_image_size_hiera_cannot_pool(tmp_path, monkeypatch):
    """S must be a multiple of 32 for Hiera's four stages; the server says so instead of failing at the first infer."""
    with pytest.raises(Exception, match="divisible by 32"):
        with app_client(tmp_path, monkeypatch, preset="sam2_tiny", image_size=48):
            pass
