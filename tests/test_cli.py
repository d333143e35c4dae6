"""The console scripts' rough edges: PNGs without a plotting package, --weights raw|ema, an --out
that already holds a run, --warmup beyond --steps, --device the build or machine cannot serve,
and options of another task. Tiny runs (a few steps of a tiny DiT on the digits)."""
import json
import os
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels.train.cli import generate_main, png_bytes, sample_images_main, train_main

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = ["--size", "tiny", "--arch", "dit", "--steps", "2", "--batch-size", "2", "--no-progress", "--threads", "1",
        "--eval-samples", "4", "--no-final-eval"]
SAMPLE = ["--n", "4", "--nrow", "2", "--steps", "2", "--scale", "1"]


def _error(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _read_png(data: bytes) -> np.ndarray:
    """A minimal decoder for what png_bytes writes (8-bit RGB, filter 0), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        pos += 12 + n
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    W, H, depth, colour, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(H, 1 + 3 * W)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(H, W, 3)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (38, 40)])
def test_png_writer_round_trip(shape):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    data = png_bytes(rgb)
    np.testing.assert_array_equal(_read_png(data), rgb)
    with pytest.raises(ValueError, match="rgb"):
        png_bytes(rgb[..., :2])


def test_png_writer_read_by_pil(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(1).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(png_bytes(rgb))
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "flow")
    train_main(["flow", "--out", out, *TINY, "--ema", "0.5"])
    assert os.path.isfile(os.path.join(out, "ema.safetensors"))
    return out


def test_sample_images_without_matplotlib(flow_run, tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.pyplot", "matplotlib.image", "PIL", "PIL.Image"):
        monkeypatch.setitem(sys.modules, mod, None)     # import raises ImportError
    png = str(tmp_path / "grid.png")
    sample_images_main(["--checkpoint", flow_run, "--out", png, *SAMPLE])
    img = _read_png(open(png, "rb").read())
    assert img.shape == (2 * 10 + 2, 2 * 10 + 2, 3)
    assert (img[:2] == 255).all() and (img[:, :2] == 255).all()    # the white frame
    tile = img[2:10, 2:10]
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all()   # grey digits


def test_sample_images_weights(flow_run, tmp_path, capsys):
    def grid(*extra):
        png = str(tmp_path / f"g{len(os.listdir(tmp_path))}.png")
        sample_images_main(["--checkpoint", flow_run, "--out", png, *SAMPLE, *extra])
        return open(png, "rb").read(), capsys.readouterr().out

    default, msg = grid()
    assert "ema weights" in msg
    ema, _ = grid("--weights", "ema")
    raw, msg = grid("--weights", "raw")
    assert "raw weights" in msg
    assert default == ema and raw != ema
    # a run without a moving average: raw is what there is; asking for ema is a usage error
    no_ema = str(tmp_path / "no_ema")
    shutil.copytree(flow_run, no_ema)
    os.remove(os.path.join(no_ema, "ema.safetensors"))
    assert grid("--checkpoint", no_ema)[0] == raw
    assert "kept no moving average" in _error(capsys, sample_images_main,
                                              ["--checkpoint", no_ema, "--weights", "ema"])
    assert "invalid choice" in _error(capsys, sample_images_main, ["--checkpoint", flow_run, "--weights", "best"])


def test_rerun_into_a_run_folder_needs_resume_or_force(flow_run, tmp_path, capsys):
    out = str(tmp_path / "again")
    shutil.copytree(flow_run, out)
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    err = _error(capsys, train_main, ["flow", "--out", out, *TINY])
    assert "already holds a run" in err and "finished flow run, step 2 of 2" in err
    assert "--resume" in err and "--force" in err
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before    # untouched
    assert "cannot go with --resume" in _error(capsys, train_main, ["flow", "--out", out, "--resume", "--force"])
    # --force: a new run, without the old run's files (its moving average), and a --warmup
    # longer than the run is clipped with a notice
    train_main(["flow", "--out", out, *TINY, "--force", "--seed", "3", "--warmup", "50", "--ema", "0"])
    err = capsys.readouterr().err
    assert "warmup of 50 steps is longer than the run (2 steps); clipped to 2" in err
    assert not os.path.exists(os.path.join(out, "ema.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["train"]["warmup"] == 2 and cfg["train"]["seed"] == 3 and cfg["step"] == 2
    assert open(os.path.join(out, "model.safetensors"), "rb").read() != before


@pytest.mark.parametrize("argv,message", [
    (["gpt", "--arch", "dit"], "--arch: only for the image tasks (diffusion, flow), not gpt"),
    (["gpt", "--uncond"], "--uncond: only for the image tasks"),
    (["mlm", "--guidance", "2"], "--guidance: only for the image tasks"),
    (["mlm", "--eval-samples", "10"], "--eval-samples: only for the image tasks"),
    (["flow", "--prediction", "epsilon"], "--prediction: only for diffusion, not flow"),
    (["flow", "--schedule", "linear"], "--schedule: only for diffusion, not flow"),
    (["diffusion", "--coupling", "ot"], "--coupling: only for flow, not diffusion"),
    (["flow", "--seq-len", "32"], "--seq-len: only for the text tasks (gpt, mlm, mdlm, hybrid), not flow"),
    (["diffusion", "--tokenizer", "bpe"], "--tokenizer: only for the text tasks"),
    (["gpt", "--mask-prob", "0.2"], "--mask-prob: only for mlm, hybrid, not gpt"),
    (["mlm", "--kv-heads", "2"], "--kv-heads: only for gpt, hybrid, not mlm"),
    (["diffusion", "--p-uncond", "0.1"], None),          # valid: reaches the data loading (no such folder)
])
def test_options_of_another_task_are_refused(argv, message, capsys):
    err = _error(capsys, train_main, argv + ["--no-progress", "--data", "/nonexistent/folder"])
    assert (message or "does not exist") in err


def test_device_the_build_or_machine_cannot_serve(flow_run, capsys):
    cuda_ok = torch.cuda.is_available() and pk.build_info()["with_cuda"]
    bad = "cuda:99" if cuda_ok else "cuda"
    want = "CUDA device(s)" if cuda_ok else ("no CUDA kernels" if not pk.build_info()["with_cuda"]
                                             else "no CUDA device is available")
    for fn, argv in ((train_main, ["gpt", "--no-progress"]), (generate_main, ["--checkpoint", flow_run]),
                     (sample_images_main, ["--checkpoint", flow_run])):
        err = _error(capsys, fn, argv + ["--device", bad])
        assert "argument --device" in err and want in err and "Traceback" not in err
        assert "expected" in _error(capsys, fn, argv + ["--device", "tpu"])
    assert "auto" in _error(capsys, train_main, ["gpt", "--device", "gpu0"])
    assert "expected cpu, cuda" in _error(capsys, generate_main, ["--checkpoint", flow_run, "--device", "auto"])
