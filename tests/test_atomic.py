"""Writes go to a temporary name and are renamed when complete: a failure leaves the old file as it was."""

import errno

import pytest

from concept_erase.io.atomic import atomic_dir, atomic_path, write_text
from concept_erase.errors import UserError


def test_full_disk_keeps_the_previous_file_and_says_so(tmp_path):
    target = tmp_path / "report.json"
    write_text(target, "good")
    with pytest.raises(UserError, match="no space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left behind


def test_failed_folder_write_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "pipeline"
    with atomic_dir(target) as tmp:
        (tmp / "model_index.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "model_index.json").write_text("new, half")
            raise RuntimeError("crash while exporting")
    assert (target / "model_index.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    with pytest.raises(UserError, match="already exists"):
        with atomic_dir(target):
            pass


def test_full_disk_during_export_of_erased_weights(tmp_path, monkeypatch, tiny_pipe, make_config):
    """save_delta under ENOSPC: a one-line error, the earlier erased.safetensors untouched."""
    import copy

    import safetensors.torch

    from concept_erase.training.trainer import erase

    cfg = make_config(method="fixed", steps=1)
    path = erase(cfg, pipe=copy.deepcopy(tiny_pipe))
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    from concept_erase.export.delta import save_delta
    from concept_erase.families.sd import StableDiffusion
    from concept_erase.training.subsets import select_trainable

    unet = copy.deepcopy(tiny_pipe.unet)
    trained = select_trainable(unet, "xattn")
    with pytest.raises(UserError, match="no space left"):
        save_delta(path, unet, trained, config=cfg, fingerprint={"digest": "x", "stats": {}, "dtype": "float32"},
                   steps=1, lambda_final=0.0, family=StableDiffusion())
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_a_finished_file_has_the_modes_an_ordinary_write_gives(tmp_path):
    from concept_erase.io.atomic import write_text

    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == ordinary.stat().st_mode & 0o777
