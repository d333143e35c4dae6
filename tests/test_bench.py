"""pk-bench, the benchmark suite shipped in the package: family discovery, the report's ratios,
the command line's errors, and one end-to-end run (`pk-bench masking --quick` on the CPU, a
few cases) that must leave the table, the plot and the machine description in --out."""
import json
import os
import re
import subprocess
import sys

import pytest

from pretrain_kernels.bench import HERE, families, select
from pretrain_kernels.bench import cli, report
from pretrain_kernels.bench.common import ALTERNATIVES, installed, skip_message

pytest.importorskip("pytest_benchmark", reason="pk-bench runs on pytest-benchmark")

FAMILIES_OF_RECORD = {"masking", "sampling", "diffusion", "attention", "attention_cuda", "integrations", "train"}


def test_families_found_by_file_name():
    fams = families()
    assert FAMILIES_OF_RECORD <= set(fams)
    for fam, path in fams.items():
        assert path.name == f"bench_{fam}.py" and path.parent == HERE
    assert [p.name for p in select(["attention"])] == ["bench_attention.py", "bench_attention_cuda.py"]
    assert [p.name for p in select(["attention_cuda"])] == ["bench_attention_cuda.py"]
    assert [p.name for p in select(["masking", "masking"])] == ["bench_masking.py"]
    assert select([]) == list(fams.values())
    with pytest.raises(ValueError, match="unknown benchmark family 'nope'.*masking"):
        select(["nope"])


def _bench_json(path, rows):
    """A pytest-benchmark JSON file holding rows (group, name, impl, baseline, median)."""
    data = {"machine_info": {}, "benchmarks": [
        {"group": g, "name": n, "stats": {"median": m}, "extra_info": dict(impl=i, baseline=b, **extra)}
        for g, n, i, b, m, extra in rows]}
    path.write_text(json.dumps(data))
    return path


def test_report_ratios(tmp_path):
    rows = [("op A", "test_a_pk", "pk", True, 2e-3, {"bytes": 4e6}),
            ("op A", "test_a_torch", "torch", False, 6e-3, {}),
            ("op A", "test_a_numba", "numba", False, 1e-3, {}),
            ("op B", "test_b_pk", "pk", True, 5e-6, {}),
            ("op B", "test_b_x", "x", False, 7.5e-6, {})]
    _, loaded = report.load(_bench_json(tmp_path / "b.json", rows))
    lines = report.table(loaded).splitlines()
    assert lines[0].startswith("| group | implementation |")
    body = {(c[1].strip(), c[2].strip()): c for c in (line.split("|") for line in lines[2:])}
    assert body[("op A", "pk")][5].strip() == "1.00 (ours)"
    assert body[("op A", "pk")][4].strip() == "2.0 GB/s"
    assert body[("op A", "torch")][5].strip() == "3.00x"
    assert body[("op A", "numba")][5].strip() == "0.50x"
    assert body[("op B", "x")][5].strip() == "1.50x"
    assert body[("op B", "x")][3].strip() == "7.5 us"
    # the baseline row leads its group, then the others from the fastest
    assert [c[2].strip() for c in (line.split("|") for line in lines[2:5])] == ["pk", "numba", "torch"]


def test_skipped_alternatives_named():
    lines = {skip_message("numba"), skip_message("CuPy"), "needs an NVIDIA GPU and a CUDA build of the extension",
             "flash-attn does not import: ImportError: libcudart.so.12"}
    notes = cli.skipped_alternatives(lines)
    assert notes == ["skipped: flash-attn does not import: ImportError: libcudart.so.12",
                     "skipped: numba not installed (pip install numba)",
                     "skipped: CuPy not installed (pip install cupy-cuda12x)"]


def test_cli_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2
    assert "unknown benchmark family 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--device", "tpu"])
    assert "--device" in capsys.readouterr().err
    # without pytest-benchmark: says how to install it
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda n, *a: None if n == "pytest_benchmark" else real(n, *a))
    assert cli.main(["masking"]) == 2
    assert 'pip install "pretrain-kernels[bench]"' in capsys.readouterr().err
    monkeypatch.undo()
    import torch
    if not torch.cuda.is_available():
        assert cli.main(["masking", "--device", "cuda"]) == 2
        assert "no usable GPU" in capsys.readouterr().err


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for fam in FAMILIES_OF_RECORD:
        assert fam in out
    for name in ALTERNATIVES:
        assert name in out


def test_pk_bench_quick_end_to_end(tmp_path):
    """pk-bench masking --quick on the CPU, the pk op, the torch composite and numba (which the
    run skips and names where it is not installed); one thread."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pretrain_kernels.bench", "masking", "--quick", "--device", "cpu", "--threads", "1",
           "--out", str(out), "-k", "pk_mlm_mask or torch_composite or numba"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (out / "report.md").read_text()
    machine = json.loads((out / "machine.json").read_text())
    bench = json.loads((out / "bench.json").read_text())

    # the table: the shape of --quick (64x512 only), one group per input variant; the variant the
    # alternatives run (special ids, int64) has the package's row as the baseline
    groups = {line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| mlm_mask")}
    assert groups and all(g.startswith("mlm_mask 64x512 ") and g.endswith(" cpu") for g in groups)
    group = "mlm_mask 64x512 special int64 cpu"
    rows = [line for line in md.splitlines() if line.startswith(f"| {group} ")]
    bench["benchmarks"] = [b for b in bench["benchmarks"] if b["group"] == group]
    impls = {r.split("|")[2].strip(): r.split("|")[5].strip() for r in rows}
    assert impls["pk"] == "1.00 (ours)"
    assert re.fullmatch(r"\d+\.\d\dx", impls["torch composite"])
    assert {b["extra_info"]["device"] for b in bench["benchmarks"]} == {"cpu"}
    assert {b["extra_info"]["impl"] for b in bench["benchmarks"]} == \
        {"pk", "torch composite"} | ({"numba parallel"} if installed("numba") else set())
    # the ratio printed is the medians' ratio
    med = {b["extra_info"]["impl"]: b["stats"]["median"] for b in bench["benchmarks"]}
    assert impls["torch composite"] == f"{med['torch composite'] / med['pk']:.2f}x"

    # the alternatives missing here are named, in the output and in the report
    named = "skipped: numba not installed (pip install numba)"
    assert (named in r.stdout) == (not installed("numba"))
    assert (named in md) == (not installed("numba"))

    # the machine description
    assert machine["logical_cpus"] == os.cpu_count() and machine["torch_threads"] == 1
    assert machine["cpu"] and machine["torch"] and "with_cuda" in machine["build_info"]
    assert set(machine["alternatives"]) == set(ALTERNATIVES)
    assert machine["alternatives"]["torch SDPA"] is not None
    assert "- CPU: " in md and "torch threads 1" in md and "pretrain-kernels 0.1.0" in md
    try:
        import matplotlib  # noqa: F401
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![plot](report.png)" in md
    except ImportError:
        assert not (out / "report.png").exists()


@pytest.mark.parametrize("want", ["cpu", "cuda"], ids=["cpu_cases", "cuda_cases"])
def test_device_selection(tmp_path, want):
    """PK_BENCH_DEVICE (pk-bench --device) keeps the cases of that device only: the `device` /
    `bench_device` parameter, else the cuda marker."""
    ini = tmp_path / "pytest.ini"
    ini.write_text(cli.PYTEST_INI)
    files = [str(HERE / "bench_masking.py"), str(HERE / "bench_attention_cuda.py"), str(HERE / "bench_sampling.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", *files, "-c", str(ini), "--rootdir", str(HERE), "--confcutdir",
                        str(HERE), "-p", "no:cacheprovider", "--collect-only", "-q"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PK_BENCH_DEVICE=want))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    assert ids
    cuda_ids = [i for i in ids if "cuda" in i or "cupy" in i]
    if want == "cuda":
        assert cuda_ids == ids
        assert any("bench_attention_cuda.py::test_cuda_attention_decode" in i for i in ids)
        assert any("test_cupy_composite" in i for i in ids)
    else:
        assert cuda_ids == []
        assert any("test_transformers_collator" in i for i in ids)
        assert any("test_filtered_numba[cpu-" in i for i in ids)
