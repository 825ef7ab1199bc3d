"""`dare demo`'s build logic without training anything: the example it prints comes from the real sample, and a
step runs again exactly when its stamp or its output says it must."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path

import pytest

from dare.demo import SAMPLE, DemoConfig, Stamps, Step, execute, model_name, pick_example, step_key
from dare_common import DareError


def test_example_is_the_longest_real_user_with_real_items() -> None:
    rows = Counter()
    pairs = set()
    with gzip.open(SAMPLE, "rt", newline="") as fh:
        for row in csv.reader(fh):
            if len(row) == 5 and row[4].isdigit():
                rows[row[0]] += 1
                pairs.add((int(row[1]), int(row[2])))
    example = pick_example(SAMPLE)
    assert example.user_id == rows.most_common(1)[0][0]
    assert example.history_events == rows.most_common(1)[0][1]
    assert len(example.candidates) == 5
    assert all((c["item_id"], c["category_id"]) in pairs for c in example.candidates)
    assert len({c["item_id"] for c in example.candidates}) == 5


class Recorder:
    """A step body that writes its output folder and remembers that it ran."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        self.output.mkdir(parents=True)
        (self.output / "result.txt").write_text("ok")

    def valid(self) -> bool:
        return (self.output / "result.txt").is_file()


def make_step(tmp_path: Path, name: str, key: str) -> tuple[Step, Recorder]:
    recorder = Recorder(tmp_path / name)
    return Step(name=name, key=key, output=recorder.output, is_valid=recorder.valid, run=recorder), recorder


def test_second_run_skips_what_is_built(tmp_path: Path) -> None:
    stamps = Stamps(tmp_path / ".demo")
    step, rec = make_step(tmp_path, "a", step_key("a", 1))
    execute([step], stamps)
    execute([step], stamps)
    assert rec.calls == 1


def test_changed_inputs_rebuild_from_a_clean_folder(tmp_path: Path) -> None:
    stamps = Stamps(tmp_path / ".demo")
    step, rec = make_step(tmp_path, "a", step_key("a", 1))
    execute([step], stamps)
    (rec.output / "stale.txt").write_text("from the old inputs")
    changed, rec2 = make_step(tmp_path, "a", step_key("a", 2))
    execute([changed], stamps)
    assert rec2.calls == 1
    assert not (rec.output / "stale.txt").exists(), "an outdated output must be removed before rebuilding"


def test_broken_output_is_rebuilt_even_with_a_matching_stamp(tmp_path: Path) -> None:
    stamps = Stamps(tmp_path / ".demo")
    step, rec = make_step(tmp_path, "a", step_key("a", 1))
    execute([step], stamps)
    (rec.output / "result.txt").unlink()
    execute([step], stamps)
    assert rec.calls == 2 and rec.valid()


def test_interrupted_step_leaves_no_stamp(tmp_path: Path) -> None:
    stamps = Stamps(tmp_path / ".demo")

    def interrupted() -> None:
        (tmp_path / "a").mkdir()
        raise KeyboardInterrupt

    step = Step(name="a", key="k", output=tmp_path / "a", is_valid=lambda: True, run=interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute([step], stamps)
    assert not stamps.matches("a", "k")
    again, rec = make_step(tmp_path, "a", "k")
    execute([again], stamps)
    assert rec.calls == 1


def test_step_whose_output_does_not_check_out_is_an_error(tmp_path: Path) -> None:
    step = Step(name="a", key="k", output=tmp_path / "a", is_valid=lambda: False, run=lambda: None)
    with pytest.raises(DareError, match="does not check out"):
        execute([step], Stamps(tmp_path / ".demo"))


def test_config_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(DareError, match="att-dims"):
        DemoConfig(att_dims=())
    with pytest.raises(DareError, match=">= 1"):
        DemoConfig(att_dims=(16, 0))
    with pytest.raises(DareError, match="no such file"):
        DemoConfig(sample=tmp_path / "missing.csv.gz")
    assert DemoConfig(work=tmp_path).models_dir == tmp_path / "models"
    assert model_name(64) == "dare-att64"


def test_port_check_refuses_a_listener_but_not_a_stopped_servers_connections() -> None:
    """`make demo` right after a previous demo: the old server's connections linger in TIME_WAIT on the port; that
    must not count as "in use" (uvicorn binds with SO_REUSEADDR), while a live listener must."""
    import socket

    from dare.demo import check_port_free

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with pytest.raises(DareError, match=f"port {port} on 127.0.0.1 is already in use"):
        check_port_free("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server side closes first: its end of the connection stays in TIME_WAIT on `port`
    listener.close()
    client.close()
    if Path("/proc/net/tcp").exists():  # Linux: the port really holds a TIME_WAIT connection (state 06), no listener
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        assert {row[3] for row in rows if row[1].endswith(f":{port:04X}")} == {"06"}
    check_port_free("127.0.0.1", port)  # no error
