"""Shared fixtures: offline hub, fixed seeds, tiny saved models and a registry pointing at them."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging
import random
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny import FAMILIES, load_tiny, save_tiny_model


@pytest.fixture(autouse=True)
def seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random chat model of every supported family, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(root / family, family) for family in FAMILIES}


@pytest.fixture
def qwen(tiny_models):
    """The tiny qwen2 model and its tokenizer, freshly loaded."""
    return load_tiny(tiny_models["qwen2"])


def write_registry(path: Path, entries: dict[str, str], default: str) -> Path:
    """Write a studies TOML with the given raw entry bodies (TOML text after the [studies."key"] header)."""
    parts = [f'default = "{default}"']
    for key, body in entries.items():
        parts.append(f'[studies."{key}"]\n{body}')
    path.write_text("\n\n".join(parts) + "\n")
    return path


SMALL_SETTINGS = """
[studies."{key}".settings]
batch_size = 4
max_prompts_per_label = 6
jailbreak_base_prompts = 2
eval_prompts_per_set = 3
selection_prompts = 3
attribution_prompts = 4
attribution_steps = 2
cosine_top_k = 4
feature_set_size = 3
sequence_prompts = 2
sequence_new_tokens = 3
direction_candidates = 2
max_new_tokens = 6
jailbreak_prompts = 3
jailbreak_prompts_max = 6
probe_seeds = 5
upstream_candidates = 3
edge_prompts = 3
upstream_set_size = 2
capability_arc_questions = 4
capability_mmlu_per_subject = 1
"""


SMALL_SAES = """
[studies."{key}".saes]
kind = "train"
layers = [0, 1]
width = 96
k = 8
training_tokens = 4000
learning_rate = 0.01
"""


def local_entry(key: str, folder: Path) -> str:
    """Registry body for a local-folder study with small settings and one small trained SAE."""
    body = f'[studies."{key}".weights]\nkind = "local"\npath = "{folder}"\n'
    return body + SMALL_SETTINGS.format(key=key) + SMALL_SAES.format(key=key)


@pytest.fixture
def tiny_registry(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A registry with a tiny qwen2 study (the default) and a tiny gemma2 study."""
    entries = {"tiny-qwen2": local_entry("tiny-qwen2", tiny_models["qwen2"]),
               "tiny-gemma2": local_entry("tiny-gemma2", tiny_models["gemma2"])}
    return write_registry(tmp_path / "studies.toml", entries, "tiny-qwen2")


@pytest.fixture
def object_store(monkeypatch: pytest.MonkeyPatch):
    """An S3 endpoint on 127.0.0.1 (moto's server) with an empty bucket `refusal-sae`; yields a boto3 client."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets per process, across servers: start each test from an empty store.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST")).close()
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(name, value)
    # fsspec keeps one filesystem per set of arguments; the endpoint comes from the environment instead.
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3")
    client.create_bucket(Bucket="refusal-sae")
    try:
        yield client
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
