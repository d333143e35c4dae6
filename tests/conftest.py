import contextlib
import fnmatch
import os
import pathlib
import sys
import types

import pytest
import torch


def _load_ops_library(path):
    """PK_OPS_LIBRARY=<path to libpretrain_kernels_ops.so> (scripts/sanitize.sh): the ops come
    from that library (the CMake build, e.g. with ASan/UBSan) instead of the extension
    pretrain_kernels._C, which a stand-in module replaces (build information only) so that
    the package imports without registering the ops twice."""
    torch.ops.load_library(path)
    stub = types.ModuleType("pretrain_kernels._C")
    stub.build_info = lambda: {"with_cuda": False, "cuda_archs": "", "cpu_isa": "see the library",
                               "cpu_parallel": "openmp", "torch_version": torch.__version__,
                               "compiler": f"ops library {path} (PK_OPS_LIBRARY)"}
    stub.parallel_threads = torch.get_num_threads
    sys.modules["pretrain_kernels._C"] = stub


if os.environ.get("PK_OPS_LIBRARY") and "pretrain_kernels._C" not in sys.modules:
    _load_ops_library(os.environ["PK_OPS_LIBRARY"])

import pretrain_kernels  # noqa: E402  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and pretrain_kernels.build_info()["with_cuda"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and a CUDA build of the extension")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
        _skip_audit.markers[item.nodeid] = {m.name for m in item.iter_markers()}


# ---- skip audit ---------------------------------------------------------------------------------
# With PK_EXPECTED_SKIPS=<file> (make test-py and .ci/run set it to tests/expected_skips.txt),
# every skipped test and every skipped module is checked against that file, and a skip it does
# not allow fails the session (exit status 1) with the list of offenders; so does a session in
# which no test passed. The file holds one rule a line, "<rule> -- <reason>":
#   marker:<name>     a test carrying that marker (marker:cuda counts only where no GPU is usable)
#   <node id glob>    fnmatch pattern on the node id (tests/test_x.py::test_y[param]); a skipped
#                     module is the node id of its file
# and the skip's own message must contain <reason>, so a test that starts skipping for another
# reason (a missing library, a broken fixture) is caught too. PK_SKIPS_REPORT=<file> writes
# every skip of the run as "<node id> -- <message>" lines (to write or review the list).


class _SkipAudit:
    def __init__(self):
        self.markers = {}     # node id -> marker names, from collection
        self.skipped = []     # (node id, message)
        self.passed = 0
        self.unexpected = []  # (node id, message)
        self.enabled = False

    @staticmethod
    def message(report):
        lr = report.longrepr
        if isinstance(lr, tuple) and len(lr) == 3:
            return str(lr[2]).removeprefix("Skipped: ")
        return str(lr)

    def rules(self, path):
        rules = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            rule, sep, reason = line.partition(" -- ")
            if not sep or not reason.strip():
                raise pytest.UsageError(f"{path}:{n}: expected '<rule> -- <reason>', got {line!r}")
            rules.append((rule.strip(), reason.strip()))
        return rules

    def allowed(self, rules, nodeid, message):
        for rule, reason in rules:
            if reason not in message:
                continue
            if rule.startswith("marker:"):
                name = rule[len("marker:"):]
                if name == "cuda" and HAS_CUDA:
                    continue
                if name in self.markers.get(nodeid, ()):
                    return True
            elif fnmatch.fnmatchcase(nodeid, rule):
                return True
        return False


_skip_audit = _SkipAudit()


def pytest_configure(config):
    _skip_audit.enabled = bool(os.environ.get("PK_EXPECTED_SKIPS"))


def pytest_collectreport(report):
    if report.skipped:
        _skip_audit.skipped.append((report.nodeid, _SkipAudit.message(report)))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skip_audit.skipped.append((report.nodeid, _SkipAudit.message(report)))
    elif report.passed and report.when == "call":
        _skip_audit.passed += 1


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("PK_SKIPS_REPORT")
    if out:
        pathlib.Path(out).write_text("".join(f"{n} -- {m}\n" for n, m in _skip_audit.skipped))
    if not _skip_audit.enabled or exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.USAGE_ERROR):
        return
    path = pathlib.Path(os.environ["PK_EXPECTED_SKIPS"])
    if not path.is_absolute():
        path = session.config.rootpath / path
    rules = _skip_audit.rules(path)
    _skip_audit.unexpected = [(n, m) for n, m in _skip_audit.skipped if not _skip_audit.allowed(rules, n, m)]
    if _skip_audit.unexpected or (_skip_audit.passed == 0 and exitstatus == pytest.ExitCode.OK):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not _skip_audit.enabled:
        return
    audit, tr = _skip_audit, terminalreporter
    if audit.unexpected:
        tr.section("unexpected skips", sep="=", red=True, bold=True)
        tr.line(f"{len(audit.unexpected)} skip(s) not allowed by {os.environ['PK_EXPECTED_SKIPS']} "
                "(make the test run, or list it there with its reason):", red=True)
        for nodeid, message in audit.unexpected:
            tr.line(f"  {nodeid} -- {message}")
    if audit.passed == 0:
        tr.line("skip audit: no test passed", red=True, bold=True)


class CudaKernels:
    """Where the CUDA kernels of a CPU-versus-CUDA test run: a GPU (device "cuda"), or CPU
    tensors with the ops routed to the emulated kernels while run() is active."""

    def __init__(self, kind):
        self.kind = kind
        self.device = torch.device("cuda" if kind == "cuda" else "cpu")

    def run(self):
        if self.kind == "cuda":
            return contextlib.nullcontext()
        import emulated_cuda
        return emulated_cuda.routed()


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda),
                        pytest.param("emulated", marks=pytest.mark.emulated)])
def cuda_kernels(request):
    return CudaKernels(request.param)


@pytest.fixture(scope="module")
def emu():
    """The emulated CUDA ops (torch.ops.pretrain_kernels_emu) on an emulated sm_90 with 4 SMs,
    restored to that configuration after the module."""
    import emulated_cuda
    mod = emulated_cuda.load()
    mod.configure(major=9, sm_count=4)
    yield emulated_cuda.ops()
    mod.configure(major=9, sm_count=4)


def pytest_generate_tests(metafunc):
    # `device`: the CPU, CUDA where a GPU is present, and in modules that set
    # EMULATE_CUDA = True the CUDA kernels run on the CPU by the emulator (tests/emulated_cuda.py).
    if "device" in metafunc.fixturenames:
        params = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
        if getattr(metafunc.module, "EMULATE_CUDA", False):
            params.append(pytest.param("emulated", marks=pytest.mark.emulated))
        metafunc.parametrize("device", params, indirect=True)


@pytest.fixture
def device(request):
    """Runs a test on the CPU, on CUDA where a GPU is present, and (EMULATE_CUDA modules) on
    CPU tensors with the pretrain_kernels ops routed to their emulated CUDA kernels."""
    if request.param == "emulated":
        skip = request.node.get_closest_marker("not_emulated")
        if skip is not None:
            pytest.skip(skip.args[0])
        import emulated_cuda
        with emulated_cuda.routed():
            yield torch.device("cpu")
    else:
        yield torch.device(request.param)


@pytest.fixture(scope="module")
def transformers():
    """The transformers module with the package's attention registered (idempotent); a test
    taking it skips alone where transformers cannot be imported."""
    try:
        import transformers
    except ImportError as e:
        pytest.skip(f"transformers is not importable: {e}")
    from pretrain_kernels.integrations import transformers as pk_transformers
    pk_transformers.register()
    return transformers


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch thread for a whole module (the model and training tests: tiny shapes, where
    a second thread only adds synchronisation)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _threads():
    # Keep tests deterministic in cost on small machines; tests that vary threads set them.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def pytest_report_header(config):
    info = pretrain_kernels.build_info()
    return [f"pretrain-kernels build: {info}", f"cuda available: {torch.cuda.is_available()}",
            f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"]
