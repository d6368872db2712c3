"""The report and the Dagster UI, opened in a real headless Chromium (Debian's `chromium` package)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from pipelines.definitions import build_definitions, study_job
from pipelines.partitions import SETTINGS, studies
from warehouse.figures import FIGURES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH; install it (Debian: apt-get install chromium)")

# As root in a closed network: no sandbox, and no background connections that would be refused.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
KEY = "tiny-qwen2"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_models):
    """A tiny study materialized into a warehouse, with a Dagster home that recorded the run."""
    from tests.conftest import local_entry, write_registry

    root = tmp_path_factory.mktemp("browser")
    registry = write_registry(root / "studies.toml", {KEY: local_entry(KEY, tiny_models["qwen2"])}, KEY)
    home = root / "dagster_home"
    home.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "..", "dagster.yaml"), home / "dagster.yaml")
    defs = build_definitions(str(registry), str(root / "warehouse"), str(root / "cache"), "cpu")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(studies.name, [KEY])
        assert defs.resolve_job_def(study_job.name).execute_in_process(partition_key=KEY, instance=instance).success
    return {"registry": registry, "warehouse": root / "warehouse", "cache": root / "cache", "home": home}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


def test_report_renders_in_chromium_with_every_figure_and_table(study, browser):
    page = browser.new_page()
    page.goto((study["warehouse"] / "report" / f"model={KEY}" / "index.html").as_uri())
    assert page.locator("h1").inner_text() == f"Refusal study: {KEY}"
    images = page.locator("figure img")
    # The tiny study has rows for every figure's query, so each figure is on the page.
    assert sorted(images.evaluate_all("nodes => nodes.map(n => n.alt)")) == sorted(FIGURES)
    # Every figure decoded into a picture, not a broken-image icon.
    widths = images.evaluate_all("nodes => nodes.map(n => n.complete ? n.naturalWidth : 0)")
    assert all(width > 500 for width in widths)
    for table in ("main_table", "feature_table", "probe_comparison", "jailbreak_summary", "latent_guard", "feature_edges"):
        assert page.locator(f"#table-{table}").is_visible()
    assert page.locator("#table-probe_comparison + table tr").count() == 1 + 10  # header + 5 probes x 2 test sets
    assert "refusal_probes  sha256" in page.locator("#lineage + pre").inner_text()
    # Every link resolves: in-page anchors to an element, file links to a file (Neuronpedia's are not followed).
    hrefs = page.locator("a").evaluate_all("nodes => nodes.map(n => [n.getAttribute('href'), n.href])")
    assert hrefs
    for raw, resolved in hrefs:
        if raw.startswith("#"):
            assert page.locator(raw).count() == 1, raw
        elif resolved.startswith("file://"):
            assert Path(urllib.parse.unquote(urllib.parse.urlparse(resolved).path)).is_file(), raw
    # Each selected latent's page opens from the report, with its histogram decoded and a way back.
    links = page.locator("#feature-pages a")
    assert links.count() > 0
    links.first.click()
    assert page.locator("h1").inner_text().startswith("Layer ")
    assert page.locator("img").evaluate_all("nodes => nodes.map(n => n.complete ? n.naturalWidth : 0)")[0] > 300
    page.locator("a:has-text('report of')").click()
    assert page.locator("h1").inner_text() == f"Refusal study: {KEY}"
    overview = browser.new_page()
    overview.goto((study["warehouse"] / "report" / "index.html").as_uri())
    overview.locator(f"#studies a:has-text('{KEY}')").click()
    assert overview.locator("h1").inner_text() == f"Refusal study: {KEY}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _matches(label: str, name: str) -> bool:
    """The graph shortens long names with an ellipsis in the middle (jailb…_generations)."""
    head, _, tail = label.partition("…")
    return label == name or (bool(tail) and name.startswith(head) and name.endswith(tail))


def test_dagster_ui_on_localhost_shows_the_study_assets_in_the_asset_graph(study, browser):
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(study["home"]), "REFUSAL_SAE_REGISTRY": str(study["registry"]),
           "REFUSAL_SAE_WAREHOUSE": str(study["warehouse"]), "REFUSAL_SAE_CACHE": str(study["cache"])}
    log = (study["home"] / "webserver.log").open("w")  # a file, so a chatty server never blocks on a full pipe
    server = subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port),
                               "-m", "pipelines.definitions"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                    assert b"dagster_webserver_version" in response.read()
                break
            except OSError:
                assert server.poll() is None, (study["home"] / "webserver.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the Dagster UI did not answer within 180 s"
                time.sleep(1)
        defs = build_definitions(str(study["registry"]), str(study["warehouse"]), str(study["cache"]), "cpu")
        graph = defs.resolve_asset_graph()
        groups: dict[str, set[str]] = {}
        for key in graph.get_all_asset_keys():
            groups.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
        # The graph draws only what is in view, and each asset brings its settings/<asset> node into its group's view.
        page = browser.new_page(viewport={"width": 4000, "height": 4000})
        settings = groups.pop(SETTINGS)
        for group, names in sorted(groups.items()):
            page.goto(f"{url}/locations/pipelines.definitions/asset-groups/{group}/lineage")
            nodes = page.locator("[class*='AssetNode_assetName']")
            nodes.first.wait_for(timeout=60_000)
            deadline = time.monotonic() + 30
            while True:  # nodes appear as the layout settles
                labels = nodes.all_inner_texts()
                missing = [name for name in names if not any(_matches(label, name) for label in labels)]
                if not missing or time.monotonic() > deadline:
                    break
                page.wait_for_timeout(500)
            assert not missing, f"group {group}: {missing} not in the graph ({labels})"
        # The settings group lays its unconnected nodes out wider than any view: each has its own page instead.
        assert settings == {f"{SETTINGS}/{name}" for names in groups.values() for name in names}
        for name in sorted(settings):
            page.goto(f"{url}/assets/{name}")
            page.get_by_text(f"The registry fields {name.split('/', 1)[1]} reads").first.wait_for(timeout=60_000)
        # The study's partition and its materialization are on the asset's page.
        page.goto(f"{url}/assets/jailbreak_summary?view=partitions")
        page.get_by_text(KEY).first.wait_for(timeout=60_000)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
