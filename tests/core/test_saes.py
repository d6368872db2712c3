import shutil
import json
from importlib.resources import files
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file, save_file
from sae_lens import StandardSAE, TopKSAE
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.sae_trainer import SAETrainer

from refusal_core.activations import length_batches, tokenize_batch
from refusal_core.registry import SaeSpec
from refusal_core.saes import (
    PINNED_FORMATS,
    choose_sae_id,
    hook_point_to_layer,
    layer_to_hook_point,
    load_local_sae,
    load_sae,
    residual_tokens,
    sae_quality,
    splice,
    train_saes,
)
from tests.tiny import load_tiny, random_sae

HARMLESS = [json.loads(line)["text"] for line in (files("refusal_core") / "data" / "harmless.jsonl").read_text().splitlines()]
TOPK = dict(width=128, architecture="topk", k=8, training_tokens=40_000, learning_rate=1e-2, seed=0, progress=False,
            train_batch_size=256, forward_batch_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one CPU thread: its tensors are tiny, and two threads contending with another
    process on a two-core machine made it 10x slower (measured: 180 s instead of 15 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_qwen(tiny_models):
    """The tiny qwen2, trained for 30 steps on the harmless prompts.

    The random model predicts worse than uniform, so zero-ablating a layer *lowers* its loss and CE loss
    recovered means nothing; a few steps of training make the clean loss the best of the three.
    """
    model, tokenizer = load_tiny(tiny_models["qwen2"])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        inputs = tokenize_batch(tokenizer, HARMLESS[(step * 32) % 320:][:32], torch.device("cpu"))
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval().requires_grad_(False), tokenizer


@pytest.fixture(scope="module")
def trained_saes(trained_qwen, tmp_path_factory) -> Path:
    """train_saes output folder with a TopK SAE for layer 1 of the trained tiny qwen2."""
    output = tmp_path_factory.mktemp("saes")
    train_saes(*trained_qwen, HARMLESS, [1], output_dir=output, **TOPK)
    return output


def test_hook_point_to_layer_maps_resid_post_only():
    assert hook_point_to_layer("blocks.12.hook_resid_post") == 12
    assert hook_point_to_layer(layer_to_hook_point(3)) == 3
    for name in ("blocks.12.hook_resid_pre", "blocks.3.hook_mlp_out", "model.layers.3", "blocks.x.hook_resid_post"):
        with pytest.raises(ValueError, match="is not a residual-stream output; this project reads SAEs at"):
            hook_point_to_layer(name)


def test_residual_tokens_equal_output_hidden_states_without_padding_and_first_tokens(qwen):
    model, tokenizer = qwen
    prompts = ["How do I bake bread?", "Hi", "Write a haiku about the sea and the long summer evenings.", "Name three rivers."]
    batches = list(residual_tokens(model, tokenizer, prompts, [0, 1], batch_size=3, skip_first=4))
    assert len(batches) == 2
    order = [i for batch in length_batches(tokenizer, prompts, 3) for i in batch]  # shortest first, as batched
    assert order[-1] == 2  # the longest prompt comes last, alone
    for layer in (0, 1):
        got = torch.cat([batch[layer] for batch in batches])  # [n_tokens, d_model]
        expected = []
        for prompt in [prompts[i] for i in order]:  # each prompt alone: no padding at all
            inputs = tokenize_batch(tokenizer, [prompt], torch.device("cpu"))
            with torch.no_grad():
                hidden = model(**inputs, output_hidden_states=True).hidden_states[layer + 1]  # [1, seq, d_model]
            expected.append(hidden[0, 4:])
        assert got.dtype == torch.float32 and got.shape == torch.cat(expected).shape
        assert torch.allclose(got, torch.cat(expected), atol=1e-5)
    # Within one padded batch, the tokens are exactly those of output_hidden_states at the same positions.
    inputs = tokenize_batch(tokenizer, [prompts[i] for i in order[:3]], torch.device("cpu"))
    keep = inputs["attention_mask"].bool() & (inputs["position_ids"] >= 4)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert torch.equal(batches[0][1], hidden[2][keep])


def test_train_saes_writes_a_loadable_sae_that_explains_variance(trained_qwen, trained_saes):
    model, tokenizer = trained_qwen
    folder = trained_saes / "layer_1"
    assert {"cfg.json", "sae_weights.safetensors", "training.json"} <= {path.name for path in folder.iterdir()}
    assert not (trained_saes / "layer_1.partial").exists()
    loaded = load_local_sae(folder, 1, 64)
    assert isinstance(loaded.sae, TopKSAE) and loaded.sae.cfg.k == 8 and loaded.sae.cfg.d_sae == 128
    spec = SaeSpec(kind="local", path=trained_saes, layers=[1])
    assert load_sae(spec, 1, 64).weights_sha256 == loaded.weights_sha256
    quality = sae_quality(model, tokenizer, {1: loaded.sae}, HARMLESS[:64])[1]
    assert quality.explained_variance > 0.5
    assert quality.mean_l0 == pytest.approx(8.0)
    assert 0 <= quality.dead_fraction < 0.5


def test_train_saes_does_not_retrain_a_finished_layer(trained_qwen, trained_saes):
    weights = trained_saes / "layer_1" / "sae_weights.safetensors"
    before = weights.stat().st_mtime_ns
    assert train_saes(*trained_qwen, HARMLESS, [1], output_dir=trained_saes, **TOPK) == {1: trained_saes / "layer_1"}
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="holds an SAE trained with"):
        train_saes(*trained_qwen, HARMLESS, [1], output_dir=trained_saes, **{**TOPK, "k": 4})


def _interrupt_training_after(n_steps, trained_qwen, output_dir, monkeypatch):
    """Train layer 1 into `output_dir` and stop it with a KeyboardInterrupt after `n_steps`; return the real step."""
    step = SAETrainer.step
    calls = []

    def failing_step(self, batch):
        calls.append(1)
        if len(calls) > n_steps:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(SAETrainer, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        train_saes(*trained_qwen, HARMLESS, [1], output_dir=output_dir, **TOPK)
    return step


def test_train_saes_resumes_an_interrupted_layer_from_its_last_checkpoint(trained_qwen, trained_saes, tmp_path, monkeypatch):
    step = _interrupt_training_after(100, trained_qwen, tmp_path, monkeypatch)
    assert not (tmp_path / "layer_1").exists()
    assert [path.name for path in (tmp_path / "layer_1.partial" / "checkpoints").iterdir()] == ["24064"]
    monkeypatch.setattr(SAETrainer, "step", step)
    train_saes(*trained_qwen, HARMLESS, [1], output_dir=tmp_path, **TOPK)
    resumed = load_file(tmp_path / "layer_1" / "sae_weights.safetensors")
    uninterrupted = load_file(trained_saes / "layer_1" / "sae_weights.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def test_train_saes_standard_architecture(trained_qwen, tmp_path):
    settings = {**TOPK, "architecture": "standard", "training_tokens": 2048}
    folders = train_saes(*trained_qwen, HARMLESS[:40], [0, 2], output_dir=tmp_path, **settings)
    assert all(isinstance(load_local_sae(folders[layer], layer, 64).sae, StandardSAE) for layer in (0, 2))


def test_splice_with_error_term_leaves_logits_unchanged(trained_qwen, trained_saes):
    model, tokenizer = trained_qwen
    sae = load_local_sae(trained_saes / "layer_1", 1, 64).sae
    inputs = tokenize_batch(tokenizer, HARMLESS[:4], torch.device("cpu"))
    with torch.no_grad():
        clean = model(**inputs).logits
        with splice(model, sae, 1, use_error_term=True):
            with_error = model(**inputs).logits
        with splice(model, sae, 1, use_error_term=False):
            reconstructed = model(**inputs).logits
        after = model(**inputs).logits
    assert torch.allclose(with_error, clean, atol=1e-4)
    assert (reconstructed - clean).abs().max() > 0.1
    assert torch.equal(after, clean)


def test_ce_loss_recovered_of_trained_sae_beats_a_random_sae(trained_qwen, trained_saes):
    model, tokenizer = trained_qwen
    trained = sae_quality(model, tokenizer, {1: load_local_sae(trained_saes / "layer_1", 1, 64).sae}, HARMLESS[:64])[1]
    untrained = sae_quality(model, tokenizer, {1: random_sae()}, HARMLESS[:64])[1]
    both = sae_quality(model, tokenizer, {1: load_local_sae(trained_saes / "layer_1", 1, 64).sae, 2: random_sae(layer=2)},
                       HARMLESS[:64])
    assert both[1] == trained and both[2].ce_clean == trained.ce_clean
    assert trained.ce_clean < trained.ce_spliced < trained.ce_zero_ablation
    assert torch.isfinite(torch.tensor(trained.ce_loss_recovered))
    assert trained.ce_loss_recovered > untrained.ce_loss_recovered
    assert trained.explained_variance > untrained.explained_variance
    assert trained.n_tokens == untrained.n_tokens > 1000


def test_width_mismatch_is_one_sentence_error(tmp_path):
    random_sae(d_in=2304, d_sae=8, k=2).save_model(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"has width 2304 but the model's residual stream has width 64; "
                                         r"use an SAE trained on this model\.$"):
        load_local_sae(tmp_path / "wide", 1, 64)


def test_wrong_hook_is_one_sentence_error(tmp_path, qwen):
    random_sae(layer=2).save_model(tmp_path / "layer2")
    with pytest.raises(ValueError, match=r"reads blocks\.2\.hook_resid_post but was asked for layer 1; "
                                         r"use the SAE for blocks\.1\.hook_resid_post\.$"):
        load_local_sae(tmp_path / "layer2", 1, 64)
    with pytest.raises(ValueError, match="but was asked for layer 1"):
        with splice(qwen[0], random_sae(layer=2), 1, use_error_term=True):
            pass
    random_sae(metadata=SAEMetadata(hook_name="blocks.1.hook_mlp_out")).save_model(tmp_path / "mlp")
    with pytest.raises(ValueError, match=r"reads hook point 'blocks\.1\.hook_mlp_out', not a residual-stream output"):
        load_local_sae(tmp_path / "mlp", 1, 64)


def no_network(*args, **kwargs):
    raise AssertionError(f"tried to download {args} {kwargs}")


def test_unknown_release_lists_valid_releases_before_any_download(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", no_network)
    spec = SaeSpec(kind="pretrained", release="gemma-scope-2b-pt-rez", sae_id_template="layer_{layer}/width_16k/canonical")
    with pytest.raises(ValueError, match=r"Release 'gemma-scope-2b-pt-rez' is not in the sae-lens registry; "
                                         r"valid releases include gemma-scope-2b-pt-res"):
        load_sae(spec, 1, 64)
    with pytest.raises(ValueError, match="has no SAE 'layer_99/width_16k/canonical'; close ids are"):
        load_sae(spec.model_copy(update={"release": "gemma-scope-2b-pt-res-canonical"}), 99, 2304)


def test_l0_template_picks_the_id_with_the_closest_l0():
    template = "layer_{layer}/width_16k/average_l0_{l0}"  # layer 12 has L0 22, 41, 82, 176 and 445
    assert choose_sae_id("gemma-scope-2b-pt-res", template, 12, 50.0) == "layer_12/width_16k/average_l0_41"
    assert choose_sae_id("gemma-scope-2b-pt-res", template, 12, 70.0) == "layer_12/width_16k/average_l0_82"
    with pytest.raises(ValueError, match="has {l0} but saes.l0_target is unset"):
        choose_sae_id("gemma-scope-2b-pt-res", template, 12, None)


def test_pretrained_downloads_are_pinned_to_the_revision(monkeypatch, tmp_path):
    sae = random_sae()
    sae.save_model(tmp_path / "hub")
    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename, kwargs.get("revision"), kwargs.get("cache_dir")))
        path = tmp_path / "hub" / Path(filename).name
        if not path.exists():
            raise EntryNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = SaeSpec(kind="pretrained", release="gpt2-small-resid-post-v5-32k", revision="0123abc",
                   sae_id_template="blocks.{layer}.hook_resid_post")
    loaded = load_sae(spec, 1, 64, cache_dir=tmp_path / "cache")
    assert loaded.sae_id == "blocks.1.hook_resid_post"
    assert loaded.source == "pretrained:gpt2-small-resid-post-v5-32k/blocks.1.hook_resid_post@0123abc"
    assert torch.equal(loaded.sae.W_dec, sae.W_dec)
    assert calls and all(call[2:] == ("0123abc", tmp_path / "cache") for call in calls)
    assert {call[0] for call in calls} == {"jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs"}


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_residual_tokens_reuse_a_shared_prefix_and_match_the_full_pass(tiny_models, family):
    model, tokenizer = load_tiny(tiny_models[family])
    prefix = "System: you are a helpful assistant. User:"
    prompts = [f"{prefix} {text}" for text in ["How do I bake bread?", "Hi", "Write a haiku about the sea.", "Name rivers."]]
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert all(tokenizer(p, add_special_tokens=False)["input_ids"][:n_prefix] ==
               tokenizer(prefix, add_special_tokens=False)["input_ids"] for p in prompts)
    cached = list(residual_tokens(model, tokenizer, prompts, [0, 1], batch_size=3, skip_first=n_prefix))
    for layer in (0, 1):  # not the last: output_hidden_states gives it after the final norm
        got = torch.cat([batch[layer] for batch in cached])
        expected = []
        for prompt in [prompts[i] for batch in length_batches(tokenizer, prompts, 3) for i in batch]:  # as batched
            inputs = tokenize_batch(tokenizer, [prompt], torch.device("cpu"))
            with torch.no_grad():
                expected.append(model(**inputs, output_hidden_states=True).hidden_states[layer + 1][0, n_prefix:])
        assert got.shape == torch.cat(expected).shape
        assert torch.allclose(got, torch.cat(expected), atol=1e-4)


def test_corrupt_checkpoint_or_sae_is_one_sentence_error_and_writes_nothing(trained_qwen, trained_saes, tmp_path, monkeypatch):
    step = _interrupt_training_after(100, trained_qwen, tmp_path, monkeypatch)
    monkeypatch.setattr(SAETrainer, "step", step)
    for weights in (tmp_path / "layer_1.partial" / "checkpoints").glob("*/*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot be read .*; delete .*layer_1.partial to train layer 1 from the start\."):
        train_saes(*trained_qwen, HARMLESS, [1], output_dir=tmp_path, **TOPK)
    assert not (tmp_path / "layer_1").exists()

    broken = tmp_path / "broken"
    shutil.copytree(trained_saes / "layer_1", broken)
    (broken / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"The SAE in .*broken cannot be read .*delete the folder to train it again"):
        load_local_sae(broken, 1, 64)


@pytest.mark.parametrize("file_format, repo_id, folder", [
    ("gemma_2", "google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_41"),
    ("llama_scope", "fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L1R-8x"),
])
def test_pinned_converters_read_what_the_sae_lens_loaders_read(file_format, repo_id, folder, monkeypatch, tmp_path):
    """Small files in the release's layout, read by our converter and by sae-lens' loader of the same format."""
    torch.manual_seed(0)
    hub = tmp_path / "hub" / folder
    if file_format == "gemma_2":
        hub.mkdir(parents=True)
        np.savez(hub / "params.npz", W_enc=np.random.randn(4, 8).astype("float32"), W_dec=np.random.randn(8, 4).astype("float32"),
                 b_enc=np.random.randn(8).astype("float32"), b_dec=np.random.randn(4).astype("float32"),
                 threshold=np.random.rand(8).astype("float32"))
    else:
        (hub / "checkpoints").mkdir(parents=True)
        (hub / "hyperparams.json").write_text(json.dumps({
            "d_model": 4, "d_sae": 8, "jump_relu_threshold": 0.5, "hook_point_in": "blocks.1.hook_resid_post",
            "dataset_average_activation_norm": {"in": 3.0}}))
        save_file({"encoder.weight": torch.randn(8, 4), "decoder.weight": torch.randn(4, 8), "encoder.bias": torch.randn(8),
                   "decoder.bias": torch.randn(4)}, hub / "checkpoints" / "final.safetensors")
    calls = []

    def fake_download(repo_id: str, filename: str, subfolder: str | None = None, **kwargs) -> str:
        calls.append(kwargs.get("revision"))
        return str(tmp_path / "hub" / (f"{subfolder}/{filename}" if subfolder else filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", fake_download)
    overrides = {"device": "cpu", "dtype": "float32"}  # what SAE.from_pretrained passes
    ours = PINNED_FORMATS[file_format](repo_id=repo_id, folder_name=folder, device="cpu", force_download=False,
                                       cfg_overrides=dict(overrides), revision="0123abc", cache_dir=tmp_path / "cache")
    theirs = pretrained_sae_loaders.NAMED_PRETRAINED_SAE_LOADERS[file_format](
        repo_id=repo_id, folder_name=folder, device="cpu", force_download=False, cfg_overrides=dict(overrides))
    assert ours[0] == theirs[0]
    assert ours[1].keys() == theirs[1].keys()
    assert all(torch.equal(ours[1][name], theirs[1][name]) for name in ours[1])
    assert calls.count("0123abc") == len(calls) // 2 > 0  # ours pinned every download; sae-lens' loader pins none
