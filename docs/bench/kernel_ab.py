"""The fused search kernel at an earlier commit against the working tree's, interleaved call by call.

Compiles service/_search.c (and its _search_kernel.h) from `--before` and from the working tree with the flags
setup.py uses, loads both builds into this process, and calls each on the same synthetic user in turn (the order
alternates every call; four users rotate, so each call meets rows the previous one did not warm). Both must retrieve
the same events with the same weights. Reports p50 ms per workload (W1/W2/W3 of `dare bench`) and attention dim, for
the instruction set this CPU runs (or `--isa`).

    .venv/bin/python docs/bench/kernel_ab.py --before 9556995 --out docs/bench/kernel_ab.md
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dare.bench import _machine  # noqa: E402
from service.search import ISA_NAMES  # noqa: E402
SOURCES = ("service/_search.c", "service/_search_kernel.h")
WORKLOADS = (("W1", 200, 100), ("W2", 10_000, 200), ("W3", 50_000, 200))
ITEM_ROWS, CATE_ROWS, MAX_POSITION, TOP_K = 95_002, 1_002, 200, 20


def build(sources: dict[str, bytes], out: Path) -> ModuleType:
    """Compile the kernel from these file contents into out/ and import it (under its own name, beside the other)."""
    (out / "service").mkdir(parents=True)
    for name, text in sources.items():
        (out / name).write_bytes(text)
    so = out / f"_search{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = ["gcc", "-shared", "-fPIC", "-O3", "-std=gnu11", "-Wno-psabi", f"-I{sysconfig.get_paths()['include']}",
           str(out / "service/_search.c"), "-o", str(so)]  # fmt: skip
    subprocess.run(cmd, check=True)
    spec = importlib.util.spec_from_file_location("_search", so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources_at(rev: str | None) -> dict[str, bytes]:
    if rev is None:
        return {name: (ROOT / name).read_bytes() for name in SOURCES}
    return {name: subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True).stdout for name in SOURCES}


def run(kernel: ModuleType, tables: dict[str, np.ndarray], d: int, user: tuple[np.ndarray, ...], isa: int) -> tuple[np.ndarray, np.ndarray]:
    hist_item, hist_cate, cand_item, cand_cate = user
    index = np.empty((len(cand_item), TOP_K), dtype=np.int64)
    weight = np.empty((len(cand_item), TOP_K), dtype=np.float32)
    kernel.search(tables["item"], tables["cate"], tables["position_column"], d, hist_item, hist_cate, cand_item, cand_cate,
                  1.0 / np.sqrt(3 * d), MAX_POSITION, TOP_K, index, weight, isa)  # fmt: skip
    return index, weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--dims", default="16,32,64,128")
    parser.add_argument("--isa", type=int, default=0, help="0: the best this CPU has; 512 or 256 to pick one")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per workload and dim (both builds)")
    args = parser.parse_args()
    dims = [int(x) for x in args.dims.split(",")]
    with tempfile.TemporaryDirectory(prefix="dare-kernel-ab-") as tmp:
        builds = {"before": build(sources_at(args.before), Path(tmp) / "before"), "now": build(sources_at(None), Path(tmp) / "now")}
        isa = args.isa or builds["now"].isa()
        if not isa:
            raise SystemExit("this CPU has neither AVX-512F nor AVX2 + FMA: the kernel does not run here")
        rng = np.random.default_rng(0)
        rows = []
        for d in dims:
            # Random tables (no operator's cost depends on the weights); row 0 is padding (zeros).
            tables = {"item": rng.standard_normal((ITEM_ROWS, d), dtype=np.float32), "cate": rng.standard_normal((CATE_ROWS, d), dtype=np.float32),
                      "position_column": rng.standard_normal(MAX_POSITION + 1, dtype=np.float32)}  # fmt: skip
            tables["item"][0] = tables["cate"][0] = 0.0
            for name, n, c in WORKLOADS:
                # Zipf-popular items, as in `dare bench`'s synthetic log (a few items recur, most are rare).
                users = [(np.minimum(rng.zipf(1.2, n), ITEM_ROWS - 1).astype(np.int64), rng.integers(1, CATE_ROWS, n),
                          rng.integers(1, ITEM_ROWS, c), rng.integers(1, CATE_ROWS, c)) for _ in range(4)]  # fmt: skip
                times: dict[str, list[float]] = {"before": [], "now": []}
                deadline, i = time.perf_counter() + args.seconds, 0
                while time.perf_counter() < deadline or i < 20:
                    user = users[i % 4]
                    answers = {}
                    for which in ("before", "now") if i % 2 else ("now", "before"):
                        t0 = time.perf_counter()
                        answers[which] = run(builds[which], tables, d, user, isa)
                        times[which].append(time.perf_counter() - t0)
                    if np.abs(np.sort(answers["before"][1], 1) - np.sort(answers["now"][1], 1)).max() > 1e-5:
                        raise SystemExit(f"{name}, att {d}: the two builds' weights differ")
                    i += 1
                before, now = (float(np.median(times[k])) * 1000.0 for k in ("before", "now"))
                rows.append(f"| {name} (N={n:,}, C={c}) | {d} | {i} | {before:.3f} | {now:.3f} | {before / now:.2f}x |")
                print(rows[-1], flush=True)
    text = "\n".join([
        "# The fused search kernel: before / now (`docs/bench/kernel_ab.py`)", "",
        f"Command: `.venv/bin/python docs/bench/kernel_ab.py --before {args.before} --out {args.out}`  ",
        f"Machine: {_machine()['cpu']}, instruction set {ISA_NAMES.get(isa, isa)}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.  ",
        f"`before` = service/_search.c at {args.before}, `now` = the working tree; both compiled with setup.py's flags and "
        "called on the same users in alternating order; p50 ms over the calls.", "",
        "| workload | att dim | calls each | before p50 ms | now p50 ms | speedup |", "|---|---:|---:|---:|---:|---:|", *rows, "",
    ])  # fmt: skip
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
