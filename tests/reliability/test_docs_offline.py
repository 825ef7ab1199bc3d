"""/docs and /redoc work without internet: a real headless Chromium (Debian's `chromium`) loads them from a running
`dare serve` with every host but this machine unreachable, and the rendered page lists the API's operations.
`make test` installs chromium in CI (the Makefile's ci-tools); elsewhere the tests skip when it is absent."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; `make test` installs it in CI)"
)


def render(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran, in a Chromium that can reach 127.0.0.1 and nothing else."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={profile}",
         # No network beyond this machine: every other host name resolves to nothing, and anything that would
         # still leave goes to a proxy that is not there (loopback bypasses it).
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9",
         "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, exported_model_dir: Path, redis_server):
    from tests.reliability.conftest import start_service

    folder = tmp_path_factory.mktemp("docs")
    shutil.copytree(exported_model_dir, folder / "models" / "dare-a")
    service = start_service(folder / "logs", models_dir=folder / "models", redis_url=redis_server.start().url,
                            data_dir=folder / "var")  # fmt: skip
    yield service
    service.stop()


def operations(service) -> list[tuple[str, str, str]]:
    """(method, path, operationId) of every documented operation."""
    schema = httpx.get(service.base_url + "/openapi.json", timeout=10).json()
    return [(method.upper(), path, op["operationId"]) for path, ops in schema["paths"].items()
            for method, op in ops.items()]  # fmt: skip


def rendered_offline(service, path: str, profile: Path) -> str:
    """The page at `path`, which must load every asset from the service itself, as the offline browser renders it."""
    page = httpx.get(service.base_url + path, timeout=10)
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and all(a.startswith("/") for a in assets), f"{path} loads assets from elsewhere: {assets}"
    return render(service.base_url + path, profile)


def test_the_browser_really_has_no_internet(tmp_path: Path) -> None:
    """The control: the CDN script FastAPI's default /docs loads never arrives in this browser."""
    page = tmp_path / "cdn.html"
    page.write_text('<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>'
                    '<body><p id="r">waiting</p><script>document.getElementById("r").textContent = '
                    '"loaded:" + (typeof SwaggerUIBundle)</script></body>', encoding="utf-8")  # fmt: skip
    assert "loaded:undefined" in render(page.as_uri(), tmp_path / "profile")


def test_swagger_ui_renders_every_operation_offline(service, tmp_path: Path) -> None:
    dom = rendered_offline(service, "/docs", tmp_path / "profile")
    assert 'class="swagger-ui' in dom and "DARE scoring service" in dom
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    expected = {path for _, path, _ in operations(service)}
    assert {"/score", "/events", "/users/{user_id}/history", "/admin/reload"} <= expected
    assert rendered == expected, f"rendered {sorted(rendered)}, documented {sorted(expected)}"


def test_redoc_renders_every_operation_offline(service, tmp_path: Path) -> None:
    dom = rendered_offline(service, "/redoc", tmp_path / "profile")
    rendered = set(re.findall(r'data-section-id="operation/([^"]+)"', dom))
    expected = {op_id for _, _, op_id in operations(service)}
    assert rendered == expected, f"rendered {sorted(rendered)}, documented {sorted(expected)}"
