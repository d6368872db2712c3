from pathlib import Path

from refusal_core.storage import is_remote, location, shown, uri


def test_local_paths_and_file_urls_are_plain_paths(tmp_path):
    assert location(tmp_path) == tmp_path and isinstance(location(tmp_path), Path)
    assert location(tmp_path.as_uri()) == tmp_path and not is_remote(location(tmp_path.as_uri()))
    assert shown(tmp_path) == str(tmp_path) and uri(tmp_path) == tmp_path.as_uri()


def test_object_store_urls_are_shown_without_a_trailing_slash():
    for text in ("s3://bucket", "s3://bucket/", "s3://bucket/prefix/"):
        root = location(text)
        assert is_remote(root) and shown(root) == text.rstrip("/")
    assert shown(location("s3://bucket") / "prompts") == "s3://bucket/prompts"
