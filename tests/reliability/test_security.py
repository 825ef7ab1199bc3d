"""Security: bearer tokens (optional for /score and /events, required for /admin/* when set), compared in constant
time and never logged; limits configurable from the environment; no pickle or torch.load that a request or the
store can reach; the container image runs as a non-root user."""

from __future__ import annotations

import ast
import hmac
import re
import signal
from pathlib import Path

import pytest
import yaml

from tests.conftest import TEST_CATE_RAW_IDS, TEST_ITEM_RAW_IDS
from tests.reliability.conftest import CANDIDATES, ROOT

API_TOKEN = "api-tok-7c1e52f0d9b3"
ADMIN_TOKEN = "adm-tok-42b8e9a1c6d0"
REDIS_PASSWORD = "redis-pw-5d2a7f"
EVENT = {"item_id": TEST_ITEM_RAW_IDS[0], "category_id": TEST_CATE_RAW_IDS[0], "timestamp": 1_511_600_000}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_required_where_configured_and_never_logged(make_redis_server, make_service, models_dir) -> None:
    server = make_redis_server(password=REDIS_PASSWORD)
    service = make_service(models_dir=models_dir, redis_url=server.url, api_token=API_TOKEN, admin_token=ADMIN_TOKEN,
                           log_level="debug")  # fmt: skip
    seen: list[str] = []  # every body the service answered, checked for secrets below
    wrong = [
        {},
        bearer("nope"),
        bearer(API_TOKEN[:-1]),  # a prefix: all but the last character right
        bearer(API_TOKEN + "x"),
        bearer(API_TOKEN.upper()),
        {"Authorization": f"Basic {API_TOKEN}"},
        {"Authorization": API_TOKEN},
        {"X-Api-Token": API_TOKEN},
    ]
    with service.client() as http:
        calls = [
            ("POST", "/score", {"user_id": "sec", "candidates": CANDIDATES}),
            ("POST", "/events", {"user_id": "sec", "events": [EVENT]}),
            ("GET", "/users/sec/history", None),
        ]
        for method, path, body in calls:
            for headers in wrong:
                r = http.request(method, path, json=body, headers=headers)
                seen.append(r.text)
                assert r.status_code == 401 and r.json()["error"] == "unauthorized", (path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
            r = http.request(method, path, json=body, headers=bearer(API_TOKEN))
            seen.append(r.text)
            assert r.status_code == 200, (path, r.text)
            # the admin token is not an API token
            assert http.request(method, path, json=body, headers=bearer(ADMIN_TOKEN)).status_code == 401
        # /admin/*: the admin token only
        for headers in [*wrong, bearer(API_TOKEN)]:
            r = http.post("/admin/reload", headers=headers)
            seen.append(r.text)
            assert r.status_code == 401, headers
        assert http.post("/admin/reload", headers=bearer(ADMIN_TOKEN)).status_code == 200
        # probes, scrapers and the API description stay open
        for path in ("/healthz", "/readyz", "/metrics", "/models", "/openapi.json"):
            r = http.get(path)
            seen.append(r.text)
            assert r.status_code == 200, path
        spec = http.get("/openapi.json").json()
        assert spec["paths"]["/score"]["post"].get("security") and spec["paths"]["/admin/reload"]["post"].get("security")
        assert not spec["paths"]["/healthz"]["get"].get("security")
    service.process.send_signal(signal.SIGTERM)  # a clean stop, so every log line is written
    service.process.wait(timeout=30)
    log = service.log_text()
    assert "401" in log and "/admin/reload" in log  # the log did record these requests (debug level)...
    for secret in (API_TOKEN, ADMIN_TOKEN, REDIS_PASSWORD, API_TOKEN[:-1], API_TOKEN.upper()):
        assert secret not in log, "a secret is in the service log"  # ... but none of the secrets
        assert not any(secret in text for text in seen), "a secret is in an answer"


def test_api_token_also_guards_admin_when_no_admin_token(make_service, models_dir, redis_url) -> None:
    service = make_service(models_dir=models_dir, redis_url=redis_url, api_token=API_TOKEN)
    with service.client() as http:
        assert http.post("/admin/reload").status_code == 401
        assert http.post("/admin/reload", headers=bearer(API_TOKEN)).status_code == 200


def test_open_by_default_admin_guarded_by_its_own_token(make_service, models_dir, redis_url) -> None:
    """No DARE_API_TOKEN: /score and /events are open. DARE_ADMIN_TOKEN alone still guards /admin/*."""
    service = make_service(models_dir=models_dir, redis_url=redis_url, admin_token=ADMIN_TOKEN)
    with service.client() as http:
        assert http.post("/events", json={"user_id": "open", "events": [EVENT]}).status_code == 200
        assert http.post("/score", json={"user_id": "open", "candidates": CANDIDATES}).status_code == 200
        assert http.post("/admin/reload").status_code == 401
        assert http.post("/admin/reload", headers=bearer(ADMIN_TOKEN)).status_code == 200


def test_tokens_are_compared_with_hmac_compare_digest(monkeypatch, tmp_path, redis_url) -> None:
    """Every decision goes through hmac.compare_digest (constant time): with a spy that answers "equal" for any
    input, a wrong token is let through, so no other comparison (`==`, startswith, ...) decides anything."""
    from fastapi.testclient import TestClient

    import service.api.deps as deps
    from service.core.config import Settings
    from service.main import create_app

    calls: list[tuple[bytes, bytes]] = []
    verdict = {"equal": False}
    real_compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return verdict["equal"] or real_compare(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    settings = Settings(redis_url=redis_url, models_dir=tmp_path, data_dir=tmp_path / "var", api_token=API_TOKEN,
                        admin_token=ADMIN_TOKEN)  # fmt: skip
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.post("/events", json={"user_id": "u", "events": [EVENT]}, headers=bearer("x")).status_code == 401
        assert calls[-1][1] == API_TOKEN.encode()
        assert client.post("/admin/reload", headers=bearer("y")).status_code == 401
        assert calls[-1][1] == ADMIN_TOKEN.encode()
        verdict["equal"] = True
        assert client.post("/events", json={"user_id": "u", "events": [EVENT]}, headers=bearer("x")).status_code == 200
        assert client.post("/admin/reload", headers=bearer("y")).status_code == 200


def test_limits_come_from_the_environment(make_service, models_dir, redis_url) -> None:
    service = make_service(
        models_dir=models_dir, redis_url=redis_url, max_body_bytes=4096, max_candidates=5,
        max_events_per_request=3, max_history=10, max_user_id_length=8, lifelong_max_events=20,
    )  # fmt: skip
    with service.client() as http:
        for start in range(0, 24, 3):  # 24 events, 3 per request (the maximum)
            events = [{**EVENT, "item_id": TEST_ITEM_RAW_IDS[k]} for k in range(start, start + 3)]
            assert http.post("/events", json={"user_id": "lim", "events": events}).status_code == 200
        r = http.post("/events", json={"user_id": "lim", "events": [EVENT] * 4})
        assert r.status_code == 422 and "DARE_MAX_EVENTS_PER_REQUEST" in r.json()["detail"]
        r = http.post("/score", json={"user_id": "lim", "candidates": CANDIDATES[:6]})
        assert r.status_code == 422 and "DARE_MAX_CANDIDATES" in r.json()["detail"]
        r = http.post("/score", json={"user_id": "lim", "candidates": CANDIDATES[:5]})
        assert r.status_code == 200
        assert r.json()["history_length"] == 10 and r.json()["stored_length"] == 20  # read 10, kept 20
        r = http.post("/score", json={"user_id": "lim-too-long", "candidates": CANDIDATES[:1]})
        assert r.status_code == 422 and "DARE_MAX_USER_ID_LENGTH" in r.json()["detail"]
        r = http.get("/users/lim/history", params={"limit": 11})
        assert r.status_code == 422 and "DARE_MAX_HISTORY" in r.json()["detail"]
        r = http.get("/users/lim/history")  # the default limit respects the configured maximum
        assert r.status_code == 200 and len(r.json()["events"]) == 10 and r.json()["length"] == 20
        r = http.post("/score", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413 and "DARE_MAX_BODY_BYTES" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------------------------
# Static checks
# ---------------------------------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "torch"}


def service_sources() -> list[Path]:
    files = sorted((ROOT / "service").rglob("*.py"))
    assert len(files) > 10
    return files


def test_no_pickle_or_torch_load_reachable_from_the_service() -> None:
    """Nothing in service/ can unpickle: no pickle-family or torch import, no torch.load, every np.load passes
    allow_pickle=False, no eval/exec, no unsafe yaml.load, no onnxruntime custom-op library (native code)."""
    problems = []
    for path in service_sources():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        for pattern in (r"allow_pickle\s*=\s*True", r"torch\.load", r"register_custom_ops_library", r"pickle\.loads?"):
            for m in re.finditer(pattern, text):
                problems.append(f"{rel}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0)}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    if name.split(".")[0] in UNSAFE_MODULES:
                        problems.append(f"{rel}:{node.lineno}: imports {name}")
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
                kwargs = {k.arg: k.value for k in node.keywords}
                if name in ("eval", "exec") and not owner:
                    problems.append(f"{rel}:{node.lineno}: {name}()")
                if owner in ("np", "numpy") and name == "load":
                    flag = kwargs.get("allow_pickle")
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        problems.append(f"{rel}:{node.lineno}: np.load without allow_pickle=False")
                if owner == "yaml" and name == "load":
                    problems.append(f"{rel}:{node.lineno}: yaml.load (use yaml.safe_load)")
    assert not problems, "\n".join(problems)


def test_the_checker_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The static check is not vacuous: the same patterns match in code that does unpickle."""
    bad = "import pickle\nimport numpy as np\nx = np.load('f.npy')\ny = np.load('g.npz', allow_pickle=True)\n"
    tree = ast.parse(bad)
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "load"]
    assert len(loads) == 2 and re.search(r"allow_pickle\s*=\s*True", bad)
    imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert "pickle" in imports


def test_training_loads_checkpoints_weights_only() -> None:
    """Outside the service, the one torch.load (a run's model.pt) refuses pickled objects too."""
    for path in sorted((ROOT / "training").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):  # fmt: skip
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{node.lineno}"


@pytest.mark.parametrize("target", ["serve", "train"])
def test_container_images_run_as_a_non_root_user(target: str) -> None:
    from tests.shipping import dockerfile

    parsed = dockerfile.parse(ROOT / "Dockerfile")
    chain = parsed.chain(target)
    instructions = [i for stage in chain for i in stage.instructions]
    users = [i for i in instructions if i.keyword == "USER"]
    assert users, f"the {target} image sets no USER: it would run as root"
    user = users[-1].value.split(":")[0].strip()
    assert user not in ("root", "0"), f"the {target} image runs as {user}"
    if user.isdigit():  # a numeric uid must exist in the image: created by useradd/adduser in the chain
        runs = " ".join(i.value for i in instructions if i.keyword == "RUN")
        assert re.search(rf"(useradd|adduser)\b[^&;]*--uid {user}\b", runs), f"uid {user} is never created"
    last_cmd = max(i.line for i in instructions if i.keyword in ("CMD", "ENTRYPOINT"))
    assert users[-1].line < last_cmd  # the command runs as that user


def test_compose_does_not_run_the_service_as_root() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    for name, svc in compose.get("services", {}).items():
        user = str(svc.get("user", "")).split(":")[0]
        assert user not in ("root", "0"), f"compose service {name} runs as root"
        assert not svc.get("privileged"), f"compose service {name} is privileged"
