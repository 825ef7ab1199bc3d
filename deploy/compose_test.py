"""`make compose-test`: bring the stack of docker-compose.yml up for real, check it end to end, tear it down.

    python deploy/compose_test.py [--keep] [--timeout 1800]

With `docker compose` where a Docker engine answers, else podman-compose, on docker-compose.yml plus the local
override deploy/compose.local.yml (the images `make images` built, host network, explicit ulimits, Redis on its own
port, Grafana left out). Steps, each printed with its time:

  1. `down -v` of any earlier run, so the trainer really trains
  2. the services of the stack started one by one with `up -d --no-deps SERVICE`, in docker-compose.yml's
     depends_on order, each once its dependencies' conditions hold: redis healthy (its healthcheck passes), the
     trainer (prepare, train + export four models, load Redis) exited 0, then api and prometheus
  0. compose refuses the stack without DARE_API_TOKEN (`config` fails naming it); the run then uses a fresh random
     token and Grafana password (the environment's, when set), as `.env` would give them
  3. the api answers /readyz and its image's HEALTHCHECK passes
  4. POST /score for a Taobao user of the bundled sample returns scores with history_length > 0
  5. POST /events, then GET /users/{id}/history shows the event; without the token, POST /events, POST /score and
     POST /admin/reload are 401, with it /admin/reload is 200
  6. Prometheus has the api as a healthy target and holds dare_* series (its HTTP API)
  7. `down -v` (unless --keep), and the engine holds no container of the project

Exit 0 when every step passed; 1 with the failing step, the services' logs and a teardown otherwise.
A summary goes to var/compose-test/summary.json (docs/deploy.md quotes it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "dare"
FILES = ["docker-compose.yml", "deploy/compose.local.yml"]
SAMPLE = ROOT / "data" / "taobao-sample" / "UserBehavior.csv.gz"
API = "http://127.0.0.1:8000"
PROMETHEUS = "http://127.0.0.1:9090"
OUT = ROOT / "var" / "compose-test"
SERVICES_UP = ("redis", "trainer", "api", "prometheus")


class Failed(Exception):
    pass


# -------------------------------------------------------------------------------------------------------------
# Engine and compose tool
# -------------------------------------------------------------------------------------------------------------


def read_images_env() -> dict[str, str]:
    path = ROOT / "var" / "images.env"
    if not path.is_file():
        raise Failed("var/images.env is missing: run `make images` first (it builds and names the images)")
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def podman_compose_tool() -> str:
    """podman-compose: the locked one in .venv first (Debian 12's own, 1.0.3, has no --in-pod), else one on PATH."""
    locked = Path(sys.executable).with_name("podman-compose")
    return str(locked) if locked.is_file() else shutil.which("podman-compose") or str(locked)


def find_compose(engine: str) -> tuple[list[str], list[str]]:
    """(compose command, engine command) for the engine `make images` used."""
    if engine == "docker":
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
            raise Failed("`docker compose` (the Compose v2 plugin) is not installed")
        return ["docker", "compose"], ["docker"]
    if engine != "podman":
        raise Failed(f"var/images.env names engine {engine!r}; expected docker or podman")
    tool = podman_compose_tool()
    if not Path(tool).is_file():
        raise Failed("podman-compose is not installed (pip install podman-compose; `make install` puts it in .venv)")
    # runc: crun fails on hybrid cgroups; no pod: every service is on the host network already.
    return [tool, "--in-pod", "false", "--podman-args=--runtime runc"], ["podman", "--runtime", "runc"]


def run(cmd: list[str], *, env: dict[str, str], log: Path | None = None, timeout: float = 600) -> int:
    if log is None:
        return subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
    with log.open("ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode


def containers(engine_cmd: list[str], service: str | None = None) -> list[dict[str, str]]:
    """The project's containers (both compose tools set the com.docker.compose.* labels) with state and exit code."""
    cmd = [*engine_cmd, "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}", "--format", "{{.ID}}"]
    if service:
        cmd[-2:-2] = ["--filter", f"label=com.docker.compose.service={service}"]
    ids = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.split()
    out = []
    for cid in ids:
        fmt = '{{.State.Status}} {{.State.ExitCode}} {{index .Config.Labels "com.docker.compose.service"}}'
        line = subprocess.run([*engine_cmd, "inspect", "--format", fmt, cid], capture_output=True, text=True,
                              timeout=60).stdout.split()  # fmt: skip
        if len(line) == 3:
            out.append({"id": cid, "status": line[0], "exit_code": line[1], "service": line[2]})
    return out


# -------------------------------------------------------------------------------------------------------------
# HTTP, Redis, ports
# -------------------------------------------------------------------------------------------------------------


def http(method: str, url: str, body: object | None = None, timeout: float = 10, token: str = "") -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def taobao_user() -> tuple[str, list[dict[str, int]]]:
    """The sample's user with the most `pv` events and two candidates: items that user never viewed, in categories
    the user did view (real ids from the same log)."""
    events: dict[str, list[tuple[int, int]]] = {}
    with gzip.open(SAMPLE, "rt") as fh:
        for line in fh:
            fields = line.rstrip("\n").split(",")
            if len(fields) != 5:
                continue  # the sample's last line is cut short
            user, item, cate, behavior, _ = fields
            if behavior == "pv":
                events.setdefault(user, []).append((int(item), int(cate)))
    user = max(events, key=lambda u: len(events[u]))
    seen = {item for item, _ in events[user]}
    cates = Counter(cate for _, cate in events[user])
    candidates: list[dict[str, int]] = []
    for other, evs in events.items():
        for item, cate in evs:
            if other != user and item not in seen and cate in cates and all(c["item_id"] != item for c in candidates):
                candidates.append({"item_id": item, "category_id": cate})
            if len(candidates) == 2:
                return user, candidates
    raise Failed(f"the sample {SAMPLE} has no candidate items for user {user}")


# -------------------------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------------------------


def stack_services() -> tuple[list[str], dict[str, dict[str, str]]]:
    """The services `up` starts (no profile in either file), in depends_on order, and their dependencies."""
    import yaml

    merged: dict[str, dict] = {}
    for file in FILES:
        for name, spec in (yaml.safe_load((ROOT / file).read_text(encoding="utf-8"))["services"] or {}).items():
            merged.setdefault(name, {}).update(spec)
    active = [name for name, spec in merged.items() if not spec.get("profiles")]
    depends: dict[str, dict[str, str]] = {}
    for name in active:
        deps = merged[name].get("depends_on", {}) or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        depends[name] = {d: (v or {}).get("condition", "service_started") for d, v in deps.items()}
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise Failed(f"depends_on cycle: {' -> '.join(path + (name,))}")
        if name not in active:
            raise Failed(f"a started service depends on {name}, which is not started (profile?)")
        for dep in depends[name]:
            visit(dep, path + (name,))
        order.append(name)

    for name in active:
        visit(name, ())
    return order, depends


def wait_condition(service: str, condition: str, engine_cmd: list[str], steps: "Steps", timeout: float) -> None:
    """Wait until `service` meets a depends_on condition; print and time it."""
    began = time.monotonic()

    def container() -> dict[str, str]:
        found = containers(engine_cmd, service)
        if not found:
            raise Failed(f"{service}: no container")
        return found[0]

    if condition == "service_completed_successfully":
        def exited():
            c = container()
            return c if c["status"] in ("exited", "stopped") else None

        c = wait_for(f"{service} exit", exited, timeout, steps, every=2)
        full = subprocess.run([*engine_cmd, "logs", c["id"]], capture_output=True, text=True, timeout=60)
        (OUT / f"{service}.log").write_text(full.stdout + full.stderr, encoding="utf-8")
        if c["exit_code"] != "0":
            tail = "\n".join((full.stdout + full.stderr).splitlines()[-30:])
            raise Failed(f"{service} exited {c['exit_code']}:\n{tail}")
        # The trainer's own per-step lines (`dare demo` prints "<step> done in N s" and "built in N s").
        for line in (full.stdout + full.stderr).splitlines():
            if " done in " in line or line.startswith("built in"):
                print(f"    {service} | {line.strip()}")
        steps.done(f"{service} completed", began, "exit 0 (service_completed_successfully)")
    elif condition == "service_healthy":
        def healthy() -> bool:
            c = container()
            if c["status"] in ("exited", "stopped"):
                raise Failed(f"{service} exited {c['exit_code']} before it was healthy")
            if engine_cmd[0] == "podman":
                # No systemd here to schedule podman's healthcheck timers: run the healthcheck command now.
                return subprocess.run([*engine_cmd, "healthcheck", "run", c["id"]], capture_output=True,
                                      timeout=60).returncode == 0  # fmt: skip
            status = subprocess.run(["docker", "inspect", "--format", "{{.State.Health.Status}}", c["id"]],
                                    capture_output=True, text=True, timeout=60).stdout.strip()  # fmt: skip
            return status == "healthy"

        wait_for(f"{service} healthy", healthy, timeout, steps)
        steps.done(f"{service} healthy", began, "its healthcheck passes (service_healthy)")
    elif condition == "service_started":
        wait_for(f"{service} running", lambda: container()["status"] == "running", timeout, steps)
    else:
        raise Failed(f"{service}: unknown depends_on condition {condition!r}")


class Steps:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.rows: list[dict[str, object]] = []

    def done(self, name: str, began: float, detail: str) -> None:
        seconds = time.monotonic() - began
        self.rows.append({"step": name, "seconds": round(seconds, 1), "detail": detail})
        total = time.monotonic() - self.start
        print(f"[compose-test {total:7.1f} s] ok   {name} ({seconds:.1f} s): {detail}", flush=True)

    def say(self, text: str) -> None:
        print(f"[compose-test {time.monotonic() - self.start:7.1f} s] {text}", flush=True)


def wait_for(what: str, check, timeout: float, steps: Steps, *, fail=None, every: float = 1.0):
    """Poll `check()` until it returns a truthy value; `fail()` may raise Failed early (a container that died)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if fail is not None:
            fail()
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the stack running after the checks")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the trainer to finish")
    args = parser.parse_args(argv)

    steps = Steps()
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "compose.log"
    log.write_text("", encoding="utf-8")
    try:
        images = read_images_env()
        compose, engine_cmd = find_compose(images.get("DARE_ENGINE", ""))
    except Failed as exc:
        print(f"[compose-test] FAILED: {exc}", file=sys.stderr)
        return 1
    redis_port = int(os.environ.get("DARE_COMPOSE_REDIS_PORT", "6390"))
    # The secrets docker-compose.yml requires (from `.env` in a real deployment): the environment's, or fresh ones.
    token = os.environ.get("DARE_API_TOKEN") or secrets.token_urlsafe(24)
    grafana = os.environ.get("GRAFANA_ADMIN_PASSWORD") or secrets.token_urlsafe(18)
    env = {**os.environ, **images, "DARE_COMPOSE_REDIS_PORT": str(redis_port), "DARE_API_TOKEN": token,
           "GRAFANA_ADMIN_PASSWORD": grafana}  # fmt: skip
    token_file = OUT / "api-token"
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    files = [arg for f in FILES for arg in ("-f", f)]
    base = [*compose, "-p", PROJECT, *files]
    steps.say(f"compose: {' '.join(base)}  (log: {log.relative_to(ROOT)})")
    steps.say("images: " + ", ".join(f"{k}={v}" for k, v in images.items() if k.endswith("_IMAGE")))

    def down(name: str) -> None:
        began = time.monotonic()
        code = run([*base, "down", "-v"], env=env, log=log)
        left = containers(engine_cmd)
        if code != 0 or left:
            raise Failed(f"`down -v` exited {code}; containers left: {left}")
        steps.done(name, began, "`down -v`: no container or volume of the project left")

    failed: str | None = None
    try:
        # 0. Without the token compose stops before anything starts, naming the variable (an empty .env value too).
        t = time.monotonic()
        unset = {k: v for k, v in env.items() if k != "DARE_API_TOKEN"}
        refused = subprocess.run([*base, "config"], cwd=ROOT, env={**unset, "DARE_API_TOKEN": ""}, capture_output=True,
                                 text=True, timeout=120)  # fmt: skip
        if refused.returncode == 0 or "DARE_API_TOKEN" not in refused.stdout + refused.stderr:
            raise Failed(f"compose without DARE_API_TOKEN did not refuse naming it: exit {refused.returncode}, "
                         f"{(refused.stdout + refused.stderr)[-500:]}")  # fmt: skip
        message = next((line for line in refused.stderr.splitlines() if "DARE_API_TOKEN" in line), "")
        steps.done("no token, no stack", t, f"`config` exit {refused.returncode}: {message.strip()[:140]}")

        # 1. A clean slate: no containers or volumes (models, Redis data) of an earlier run.
        down("clean slate")
        if redis_port == 6379:
            raise Failed("DARE_COMPOSE_REDIS_PORT=6379 would share the host's default Redis port; pick another")
        busy = [p for p in (redis_port, 8000, 9090) if port_in_use(p)]
        if busy:
            raise Failed(f"ports in use on 127.0.0.1: {busy} (the stack runs on the host network and needs them)")

        # 2-5. Start the services in docker-compose.yml's depends_on order, each with `up -d --no-deps SERVICE`
        # after its dependencies' conditions hold (service_healthy: the service's healthcheck passes;
        # service_completed_successfully: it exited 0; service_started: it runs). This is what `up` does with
        # Docker; the driver does it itself because podman-compose on podman < 4.6 skips service_healthy, and
        # its --requires links make podman re-start the finished one-shot trainer when the api starts.
        services, depends = stack_services()
        reached: set[tuple[str, str]] = set()
        for name in services:
            for dep, condition in depends.get(name, {}).items():
                if (dep, condition) not in reached:
                    wait_condition(dep, condition, engine_cmd, steps, args.timeout)
                    reached.add((dep, condition))
            began = time.monotonic()
            if run([*base, "up", "-d", "--no-deps", name], env=env, log=log) != 0:
                raise Failed(f"`up -d --no-deps {name}` failed (see {log.relative_to(ROOT)})")
            steps.done(f"{name} started", began, "`up -d --no-deps " + name + "`")

        # The api: /readyz answers, and its healthcheck (the image's HEALTHCHECK) passes.
        t_api = time.monotonic()

        def ready():
            try:
                status, body = http("GET", f"{API}/readyz", timeout=3)
            except (urllib.error.URLError, OSError):
                return None
            return body if status == 200 else None

        def api_failed() -> None:
            for c in containers(engine_cmd, "api"):
                if c["status"] in ("exited", "stopped"):
                    raise Failed(f"the api container exited {c['exit_code']}")

        body = wait_for("api /readyz", ready, 300, steps, fail=api_failed)
        wait_condition("api", "service_healthy", engine_cmd, steps, 120)
        steps.done("api ready", t_api, f"/readyz 200 {json.dumps(body)[:150]}")

        # 6. A real score for a Taobao user through the api container.
        t = time.monotonic()
        user, candidates = taobao_user()
        status, scored = http("POST", f"{API}/score", {"user_id": user, "candidates": candidates}, token=token)
        if status != 200 or not isinstance(scored, dict):
            raise Failed(f"POST /score for user {user}: {status} {scored}")
        scores = scored.get("scores")
        if not (isinstance(scores, list) and len(scores) == len(candidates)
                and all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)):  # fmt: skip
            raise Failed(f"POST /score for user {user}: scores are not {len(candidates)} probabilities: {scored}")
        if not scored.get("history_length", 0) > 0:
            raise Failed(f"POST /score for user {user}: history_length {scored.get('history_length')}: {scored}")
        steps.done("POST /score", t, f"user {user}, model {scored['model']}: scores {[round(s, 4) for s in scores]}, "
                   f"history_length {scored['history_length']} of {scored['stored_length']} stored")  # fmt: skip

        # 7. An event appended through the api is in the user's history.
        t = time.monotonic()
        before = http("GET", f"{API}/users/{user}/history?limit=1", token=token)
        event = {"item_id": candidates[0]["item_id"], "category_id": candidates[0]["category_id"],
                 "timestamp": int(time.time())}  # fmt: skip
        status, appended = http("POST", f"{API}/events", {"user_id": user, "events": [event]}, token=token)
        if status != 200:
            raise Failed(f"POST /events: {status} {appended}")
        status, history = http("GET", f"{API}/users/{user}/history?limit=1", token=token)
        if status != 200 or not isinstance(history, dict) or not history.get("events"):
            raise Failed(f"GET /users/{user}/history: {status} {history}")
        last = history["events"][-1]
        if {k: last[k] for k in event} != event or history["length"] != before[1]["length"] + 1:
            raise Failed(f"GET /users/{user}/history does not show the event {event}: {history} (before: {before})")
        steps.done("POST /events + GET history", t, f"length {before[1]['length']} -> {history['length']}, "
                   f"last event {last}")  # fmt: skip

        # No write without the token; /admin/* takes it.
        t = time.monotonic()
        open_doors = {}
        for method, path, body in (("POST", "/events", {"user_id": user, "events": [event]}),
                                   ("POST", "/score", {"user_id": user, "candidates": candidates}),
                                   ("POST", "/admin/reload", None)):  # fmt: skip
            for wrong in ("", "not-the-token"):
                status, _ = http(method, f"{API}{path}", body, token=wrong)
                if status != 401:
                    open_doors[f"{method} {path} token={wrong!r}"] = status
        if open_doors:
            raise Failed(f"answered without the right token: {open_doors}")
        status, reloaded = http("POST", f"{API}/admin/reload", None, token=token)
        if status != 200:
            raise Failed(f"POST /admin/reload with the token: {status} {reloaded}")
        steps.done("auth", t, "POST /events, /score, /admin/reload: 401 without or with a wrong token; "
                   "/admin/reload 200 with it")  # fmt: skip

        # 8. Prometheus scraped the api's dare_* series, including a scrape after the event appended above.
        t = time.monotonic()

        def query(promql: str) -> float | None:
            _, answer = http("GET", f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": promql}),
                             timeout=3)  # fmt: skip
            result = (answer or {}).get("data", {}).get("result", []) if isinstance(answer, dict) else []
            return float(result[0]["value"][1]) if result else None

        def scraped():
            try:
                _, targets = http("GET", f"{PROMETHEUS}/api/v1/targets", timeout=3)
                series = query('count({__name__=~"dare_.+", job="dare-api"})')
                appended = query('sum(dare_events_appended_total{job="dare-api"})')
            except (urllib.error.URLError, OSError):
                return None
            active = (targets or {}).get("data", {}).get("activeTargets", []) if isinstance(targets, dict) else []
            up_targets = [a["scrapeUrl"] for a in active if a.get("health") == "up"]
            if up_targets and series and appended is not None and appended >= 1:
                return up_targets, int(series), int(appended)
            return None

        up_targets, count, appended = wait_for("prometheus: dare_* series scraped after the event", scraped, 120,
                                               steps, every=2)  # fmt: skip
        steps.done("prometheus", t, f"target up: {', '.join(up_targets)}; {count} dare_* series of job dare-api; "
                   f"sum(dare_events_appended_total) = {appended} (query API)")  # fmt: skip
    except Failed as exc:
        failed = str(exc)
    except Exception as exc:  # anything else still ends in the logs and the teardown below
        import traceback

        traceback.print_exc()
        failed = f"{type(exc).__name__}: {exc}"

    if failed is not None:
        print(f"[compose-test] FAILED: {failed}", file=sys.stderr)
        for service in SERVICES_UP:
            for c in containers(engine_cmd, service):
                logs = subprocess.run([*engine_cmd, "logs", "--tail", "40", c["id"]], capture_output=True, text=True,
                                      timeout=60)  # fmt: skip
                print(f"---- {service} ({c['status']}, exit {c['exit_code']}) ----\n{logs.stdout}{logs.stderr}",
                      file=sys.stderr)  # fmt: skip

    if args.keep and failed is None:
        steps.say("--keep: the stack stays up (its api token: var/compose-test/api-token); `"
                  + " ".join([*base, "down", "-v"]) + "` tears it down")
    else:
        try:
            down("teardown")
        except (Failed, subprocess.TimeoutExpired) as exc:
            failed = failed or f"teardown: {exc}"
            print(f"[compose-test] FAILED: teardown: {exc}", file=sys.stderr)

    total = time.monotonic() - steps.start
    summary = {"ok": failed is None, "failed": failed, "total_seconds": round(total, 1), "steps": steps.rows,
               "compose": " ".join(base), "images": {k: v for k, v in images.items() if k.endswith("_IMAGE")}}  # fmt: skip
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'step':<28} {'seconds':>8}")
    for row in steps.rows:
        print(f"{row['step']:<28} {row['seconds']:>8}")
    print(f"{'total':<28} {total:>8.1f}")
    print("compose-test: " + ("PASSED" if failed is None else f"FAILED: {failed}"))
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
