"""Bad input through the REST API: a 4xx naming the problem, the server keeps serving, the datastore is untouched."""

from __future__ import annotations

import gzip
import hashlib
import json
import re

import nibabel as nib
import numpy as np
import pytest


def _snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def _nifti(path, data, spacing=(2.0, 2.0, 2.0)):
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([*spacing, 1.0])), str(path))
    return path


def _bad_volumes(tmp):
    rng = np.random.default_rng(0)
    good = (rng.normal(0, 200, (32, 32, 8))).astype(np.int16)
    truncated = _nifti(tmp / "trunc.nii.gz", good)
    truncated.write_bytes(gzip.compress(gzip.decompress(truncated.read_bytes())[:500]))
    nan = good.astype(np.float32)
    nan[3, 3, 3] = np.nan
    bad_nrrd = tmp / "bad.nrrd"
    bad_nrrd.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 32 32\nencoding: raw\n\n" + b"\0" * 64)
    return {
        "truncated": (truncated, "unreadable|truncated|corrupt|read"),
        "2d": (_nifti(tmp / "flat.nii.gz", good[:, :, 0]), "3D|2D"),
        "4d": (_nifti(tmp / "four.nii.gz", np.stack([good, good], -1)), "3D|4D"),
        "constant": (_nifti(tmp / "const.nii.gz", np.full((32, 32, 8), 7, np.int16)), "same value|constant|blank"),
        "nan": (_nifti(tmp / "nan.nii.gz", nan), "NaN|finite"),
        "spacing": (_nifti(tmp / "space.nii.gz", good, spacing=(2.0, 2.0, 500.0)), "spacing"),
        "nrrd_header": (bad_nrrd, "nrrd|header|read"),
    }


def test_bad_volumes_get_422_and_nothing_changes(client, tmp_path):
    before = _snapshot(client.store["studies"])
    for name, (path, pattern) in _bad_volumes(tmp_path).items():
        with open(path, "rb") as f:
            r = client.post("/infer/samora", files={"file": (path.name, f)}, data={"params": "{}"})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        assert re.search(pattern, r.json()["detail"], re.IGNORECASE), (name, r.json())
        assert client.get("/info/").status_code == 200
    assert _snapshot(client.store["studies"]) == before


@pytest.mark.parametrize("batch_size", ["x", 0, -2, 1.5, [4]])
def test_wrong_typed_infer_param_gets_422(client, batch_size):
    before = _snapshot(client.store["studies"])
    image = client.store["unlabeled"][0]
    r = client.post(f"/infer/samora?image={image}", data={"params": json.dumps({"batch_size": batch_size})})
    assert r.status_code == 422, r.text[:300]
    assert "batch_size" in r.json()["detail"] and "positive integer" in r.json()["detail"], r.json()
    assert client.get("/info/").status_code == 200
    assert _snapshot(client.store["studies"]) == before


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"label": "liver", "foreground": [[500, 10, 3]]}, "outside the volume"),
        ({"label": "brain", "foreground": [[10, 10, 3]]}, "unknown label"),
        ({"label": "liver", "foreground": "here"}, "list of"),
        ({"label": "liver", "roi": [1, 2, 3]}, "roi"),
        ({"label": "liver"}, "foreground point or an roi"),
    ],
)
def test_bad_prompts_get_422(client, params, pattern):
    before = _snapshot(client.store["studies"])
    image = client.store["unlabeled"][0]
    r = client.post(f"/infer/samora_prompt?image={image}", data={"params": json.dumps(params)})
    assert r.status_code == 422, r.text[:300]
    assert re.search(pattern, r.json()["detail"]), r.json()
    assert client.get("/info/").status_code == 200
    assert _snapshot(client.store["studies"]) == before


def _put_label(client, image, path, params):
    with open(path, "rb") as f:
        return client.put(
            f"/datastore/label?image={image}&tag=final",
            files={"label": (path.name, f)},
            data={"params": json.dumps(params)},
        )


def test_bad_labels_are_refused_before_saving(client, tmp_path):
    image = client.store["unlabeled"][0]
    ref = nib.load(str(client.store["studies"] / f"{image}.nii.gz"))
    before = _snapshot(client.store["studies"])
    wrong_values = np.zeros(ref.shape, np.int16)
    wrong_values[5:9, 5:9, 5:9] = 9
    nib.save(nib.Nifti1Image(wrong_values, ref.affine), str(tmp_path / "v.nii.gz"))
    cases = {
        "values": (tmp_path / "v.nii.gz", {}, "not among"),
        "unnamed values": (tmp_path / "v.nii.gz", {"label_info": [{"name": "liver", "idx": 1}]}, "no entry"),
        "shape": (_nifti(tmp_path / "s.nii.gz", np.zeros((10, 10, 10), np.int16)), {}, "shape"),
    }
    shifted = nib.Nifti1Image(np.zeros(ref.shape, np.int16), ref.affine @ np.diag([1, 1, 1.5, 1]))
    nib.save(shifted, str(tmp_path / "a.nii.gz"))
    cases["affine"] = (tmp_path / "a.nii.gz", {}, "affine")
    for name, (path, params, pattern) in cases.items():
        r = _put_label(client, image, path, params)
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        assert re.search(pattern, r.json()["detail"]), (name, r.json())
    assert _snapshot(client.store["studies"]) == before
    assert client.get("/info/").status_code == 200


@pytest.mark.parametrize("image_id", ["../escape", "../../tmp/escape", "a/b", ".."])
def test_path_traversal_in_image_ids_is_refused(client, tmp_path, image_id):
    studies = client.store["studies"]
    good = _nifti(tmp_path / "ok.nii.gz", np.random.default_rng(1).normal(0, 100, (16, 16, 8)).astype(np.int16))
    before = _snapshot(studies.parent)
    with open(good, "rb") as f:
        r = client.put(f"/datastore/?image={image_id}", files={"file": ("ok.nii.gz", f)}, data={"params": "{}"})
    assert 400 <= r.status_code < 500, r.text[:300]
    assert "invalid image id" in r.json()["detail"]
    r = _put_label(client, image_id, good, {})
    assert 400 <= r.status_code < 500
    assert _snapshot(studies.parent) == before  # nothing written inside or beside the datastore
    assert client.get("/info/").status_code == 200


def test_valid_image_upload_still_works(client, tmp_path):
    good = _nifti(tmp_path / "ok.nii.gz", np.random.default_rng(1).normal(0, 100, (16, 16, 8)).astype(np.int16))
    with open(good, "rb") as f:
        r = client.put("/datastore/?image=new_case", files={"file": ("ok.nii.gz", f)}, data={"params": "{}"})
    assert r.status_code == 200, r.text
    assert (client.store["studies"] / "new_case.nii.gz").is_file()


def _bad_json_requests(client, tmp_path):
    """Every endpoint that takes a JSON `params`, fed malformed JSON (form field or request body)."""
    image = client.store["unlabeled"][0]
    label = client.store["studies"] / "labels" / "final" / f"{client.store['labeled'][0]}.nii.gz"
    body = {"content": b"{bad", "headers": {"Content-Type": "application/json"}}
    return {
        "infer": lambda: client.post(f"/infer/samora?image={image}", data={"params": "{bad"}),
        "infer not an object": lambda: client.post(f"/infer/samora?image={image}", data={"params": '"liver"'}),
        "label upload": lambda: client.put(
            f"/datastore/label?image={image}&tag=final",
            files={"label": ("l.nii.gz", label.read_bytes())},
            data={"params": "{bad"},
        ),
        "image upload": lambda: client.put(
            "/datastore/?image=new_case",
            files={"file": ("i.nii.gz", (client.store["studies"] / f"{image}.nii.gz").read_bytes())},
            data={"params": "{bad"},
        ),
        "image info": lambda: client.put(f"/datastore/image/info?image={image}", data={"info": "{bad"}),
        "train": lambda: client.post("/train/samora?run_sync=true", **body),
        "scoring": lambda: client.post("/scoring/samora_uncertainty?run_sync=true", **body),
        "activelearning": lambda: client.post("/activelearning/first", **body),
    }


def test_malformed_params_json_gets_4xx_naming_it(client, tmp_path):
    before = _snapshot(client.store["studies"])
    for name, send in _bad_json_requests(client, tmp_path).items():
        r = send()
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        assert re.search("JSON|json", str(r.json()["detail"])), (name, r.json())
        assert client.get("/info/").status_code == 200
    assert _snapshot(client.store["studies"]) == before


def _broken_dicom_dirs(tmp, shared_data):
    """Copies of a real 3-slice CT series: tags removed, a slice without pixels, two series mixed."""
    import shutil

    import pydicom

    def variant(name, edit):
        folder = tmp / name
        shutil.copytree(shared_data / "ct_3slice_dcmqi" / "dicom", folder)
        for i, path in enumerate(sorted(folder.iterdir())):
            ds = pydicom.dcmread(path)
            edit(i, ds)
            ds.save_as(path)
        return folder

    def drop(*tags, only=None):
        def edit(i, ds):
            for tag in tags if only in (None, i) else ():
                delattr(ds, tag)

        return edit

    def second_series(i, ds):
        if i == 2:
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"

    return {
        "no position": (variant("pos", drop("ImagePositionPatient", only=1)), "ImagePositionPatient"),
        "no spacing": (variant("spacing", drop("PixelSpacing")), "PixelSpacing"),
        "no pixels": (variant("pixels", drop("PixelData", only=1)), "3 DICOM files but only 2 slices"),
        "mixed series": (variant("mixed", second_series), "2 DICOM series"),
    }


def test_broken_dicom_series_get_422_and_nothing_changes(client, tmp_path, shared_data):
    # the local datastore lists files only; a DICOM directory reaches the app by server path (as DICOMweb's cache does)
    before = _snapshot(client.store["studies"])
    for name, (folder, pattern) in _broken_dicom_dirs(tmp_path, shared_data).items():
        r = client.post(f"/infer/samora?image={folder}", data={"params": "{}"})
        assert r.status_code == 422, (name, r.status_code, r.text[:300])
        assert pattern in r.json()["detail"], (name, r.json())
        assert client.get("/info/").status_code == 200
    assert _snapshot(client.store["studies"]) == before


def test_volume_over_the_voxel_budget_gets_413_before_loading(client, tmp_path, monkeypatch):
    from samora.data import volumes

    assert volumes._max_voxels == 512 * 512 * 2048  # the app set the default conf max_voxels
    monkeypatch.setattr(volumes, "_max_voxels", 32 * 32 * 8 - 1)  # what `--conf max_voxels 8191` sets
    monkeypatch.setattr(volumes, "_read", lambda *a: pytest.fail("voxels read despite the budget"))
    big = _nifti(tmp_path / "big.nii.gz", np.random.default_rng(2).normal(0, 100, (32, 32, 8)).astype(np.int16))
    image = client.store["unlabeled"][0]
    before = _snapshot(client.store["studies"])
    with open(big, "rb") as f:
        r = client.post("/infer/samora", files={"file": ("big.nii.gz", f)}, data={"params": "{}"})
    assert r.status_code == 413, r.text[:300]
    assert re.search(r"32 x 32 x 8 = 8,192 voxels .* limit of 8,191 voxels \(max_voxels\)", r.json()["detail"])
    for send in (
        lambda: client.post(f"/infer/samora?image={image}", data={"params": "{}"}),
        lambda: client.put("/datastore/?image=big_case", files={"file": ("big.nii.gz", big.read_bytes())}),
        lambda: _put_label(client, image, big, {}),
    ):
        r = send()
        assert r.status_code == 413, r.text[:300]
        assert "max_voxels" in r.json()["detail"]
        assert str(client.store["studies"]) not in r.json()["detail"], "the answer shows a server path"
    r = client.post(f"/infer/samora?image={image}", data={"params": "{}"})
    detail = r.json()["detail"]
    assert f"infer samora on {image}:" in detail and f"{image}: volume of" in detail, detail
    assert client.get("/info/").status_code == 200
    assert _snapshot(client.store["studies"]) == before


@pytest.mark.parametrize(
    ("trainer", "params", "pattern"),
    [
        ("samora", {"epochs": "many"}, "'epochs' must be a positive integer"),
        ("samora", {"batch_size": 0}, "'batch_size' must be a positive integer"),
        ("samora", {"lr": -1e-3}, "'lr' must be a positive number"),
        ("samora", {"lr": "nan"}, "'lr' must be a positive number"),
        ("samora", {"prompt_training": "maybe"}, "'prompt_training' must be true or false"),
        ("samora_ssl", {"max_steps": "0"}, "'max_steps' must be a positive integer"),
    ],
)
def test_bad_training_params_get_422_naming_them(client, trainer, params, pattern):
    r = client.post(f"/train/{trainer}?run_sync=true", json=params)
    assert r.status_code == 422, r.text[:300]
    assert f"training {trainer} failed" in r.json()["detail"] and pattern in r.json()["detail"], r.json()
    info = client.get("/info/")
    assert info.status_code == 200 and info.json()["train_stats"][trainer]["status"] == "ERROR"


def test_synchronous_training_failure_answers_with_its_reason(client):
    """run_sync=true runs the trainer inside the server: a failure is an answer naming why, no version is published."""
    image = client.store["labeled"][0]
    broken = client.store["studies"] / "labels" / "final" / f"{image}.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])  # damaged on disk after it was accepted
    r = client.post("/train/samora?run_sync=true", json={"epochs": 1})
    assert r.status_code == 422, r.text[:300]
    assert f"{broken}: unreadable or corrupt file" in r.json()["detail"], r.json()
    info = client.get("/info/").json()
    assert info["train_stats"]["samora"]["status"] == "ERROR"
    r = client.post(f"/infer/samora?image={client.store['unlabeled'][0]}", data={"params": "{}"})
    assert r.status_code == 409  # still answering, and still untrained: no version was published
