"""Hostile and unusual image files: one decoder (``rewards.wire.open_image``) for ``rlfh score`` and the server.

16-bit PNGs, decompression bombs, undecodable files among good ones, and RGBA / palette files,
which the references resize in their own mode before converting to RGB.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import Detection
from rewards.blip_preprocess import CLIP_MEAN, CLIP_STD, tokenize
from rewards.wire import PNG_MAGIC, RequestError, ServerConfig, decode_png, encode_png, parse_score_request
from rlfh.cli.rewards import add_reward_commands

LIMITS = ServerConfig().limits  # what the server and rlfh score both apply by default
FACE = (175.0, 25.0, 265.0, 140.0)  # the astronaut's face in skimage.data.astronaut()


def rlfh(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlfh")
    add_reward_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.fn(args)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, depth: int, color: int, row: bytes) -> bytes:
    """A valid PNG of ``height`` identical rows (filter byte 0 + ``row``), compressed as a stream
    so that a 20000 x 20000 image costs a few MB of memory, not the 50 MB+ of its raw rows."""
    z = zlib.compressobj(9)
    line = b"\x00" + row
    idat = b"".join(z.compress(line) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return PNG_MAGIC + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def sixteen_bit_pngs() -> dict[str, bytes]:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(buf, format="PNG")  # 16-bit grayscale
    return {"gray16": buf.getvalue(), "rgb16": raw_png(8, 8, 16, 2, bytes(range(48)))}  # 16-bit RGB


def _reason(message: str) -> str:
    return message.split(": ", 1)[1]  # drop the "what" prefix (the file or the request index)


@pytest.fixture
def jpeg_config(tmp_path):
    cfg = tmp_path / "rewards.yaml"
    cfg.write_text("rewards:\n  - jpeg_compressibility\n")
    return str(cfg)


def test_16_bit_pngs_are_rejected_alike_by_the_server_and_rlfh_score(tmp_path, jpeg_config, capsys):
    for name, data in sixteen_bit_pngs().items():
        with pytest.raises(RequestError) as server:
            decode_png(data, "images[0]", LIMITS)
        assert server.value.status == 400
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        assert rlfh(["score", jpeg_config, str(path)]) == 1
        (line,) = capsys.readouterr().out.splitlines()
        obj = json.loads(line)
        assert set(obj) == {"image", "error"} and obj["image"] == str(path)
        assert _reason(obj["error"]) == _reason(str(server.value))
        assert "16-bit PNG is not supported" in obj["error"]


def test_bombs_are_too_large_for_both_paths_without_decoding(tmp_path, jpeg_config, capsys):
    bomb = raw_png(20000, 20000, 1, 0, bytes(2500))  # 400 Mpixel, 1-bit gray: a small file
    big = raw_png(10000, 10000, 8, 0, bytes(10000))  # 100 Mpixel gray, 0.3 GB as RGB
    assert len(bomb) < 200_000 and len(big) < 200_000
    for data in (bomb, big):
        with pytest.raises(RequestError) as e:
            decode_png(data, "images[0]", LIMITS)
        assert e.value.status == 413 and "exceeds max_image_side" in str(e.value)
        body = json.dumps(
            {
                "images": [encode_png(np.zeros((4, 4, 3), np.uint8)), base64.b64encode(data).decode("ascii")],
                "prompts": ["", ""],
            }
        )
        with pytest.raises(RequestError) as e:
            parse_score_request(body.encode(), LIMITS)
        assert e.value.status == 413 and str(e.value).startswith("images[1]: ")
    # A format whose header Pillow refuses as a bomb itself: the same "too large" class.
    ppm = tmp_path / "bomb.ppm"
    ppm.write_bytes(b"P5\n20000 20000\n255\n" + bytes(64))
    paths = [tmp_path / "bomb.png", tmp_path / "big.png", ppm]
    paths[0].write_bytes(bomb)
    paths[1].write_bytes(big)
    start = time.monotonic()
    assert rlfh(["score", jpeg_config, *map(str, paths)]) == 1
    assert time.monotonic() - start < 10  # nothing was decoded
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["image"] for o in objs] == list(map(str, paths))
    assert all(set(o) == {"image", "error"} for o in objs)
    assert "exceeds max_image_side=2048" in objs[0]["error"] and "exceeds max_image_side=2048" in objs[1]["error"]
    assert "too large" in objs[2]["error"] and "decompression bomb" in objs[2]["error"]
    # The limits are the config's reward_server section, overridable like any key.
    assert rlfh(["score", jpeg_config, str(paths[1]), "reward_server.max_image_side=100000"]) == 1
    assert "exceeds max_image_pixels=4194304" in json.loads(capsys.readouterr().out)["error"]


def test_one_bad_file_among_good_ones_keeps_the_good_results(tmp_path, jpeg_config, capsys):
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    paths = []
    for k, im in enumerate(good):
        paths.append(tmp_path / f"good{k}.png")
        Image.fromarray(im).save(paths[-1])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(paths[0].read_bytes()[:60])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    argv = [paths[0], truncated, paths[1], tmp_path / "absent.png", text, paths[2]]
    assert rlfh(["score", jpeg_config, *map(str, argv), "--batch-size", "2"]) == 1
    captured = capsys.readouterr()
    objs = [json.loads(line) for line in captured.out.splitlines()]
    assert [o["image"] for o in objs] == list(map(str, argv))
    for o in (objs[0], objs[2], objs[5]):
        assert "error" not in o and o["jpeg_compressibility"]["value"] is not None
    assert "cannot decode image" in objs[1]["error"]
    assert "does not exist" in objs[3]["error"]
    assert "cannot decode image" in objs[4]["error"]
    assert "3 of 6 image(s) could not be scored" in captured.err
    # The good files' numbers are those they get when scored alone.
    assert rlfh(["score", jpeg_config, str(paths[1])]) == 0
    assert json.loads(capsys.readouterr().out) == objs[2]


class OneFace:
    """A face detector for the tests: the astronaut's face in every image (a config's module:callable)."""

    region = "face"

    def detect(self, images):
        return [[Detection(FACE, 0.99)] for _ in images]


def _reference_transform(pil: Image.Image) -> torch.Tensor:
    """The references' _transform: Resize(224, BICUBIC) on the PIL image in its own mode,
    CenterCrop(224), then convert("RGB"), ToTensor, Normalize (torchvision's order)."""
    w, h = pil.size
    size = (int(224 * w / h), 224) if h <= w else (224, int(224 * h / w))
    pil = pil.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    x = np.asarray(pil.crop((left, top, left + 224, top + 224)).convert("RGB"), dtype=np.float32) / 255
    x = torch.from_numpy(x).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from tests.rewards.tiny_blip import TINY_MED_CONFIG, TINY_VISION, random_model, save_published

    d = save_published(
        random_model(TINY_VISION, TINY_MED_CONFIG, seed=0),
        TINY_MED_CONFIG,
        tmp_path_factory.mktemp("blip"),
        "FS_model.pt",
    )
    os.link(d / "FS_model.pt", d / "ImageReward.pt")
    return d


def test_rgba_and_palette_files_score_like_the_reference_order(tmp_path, blip_dir, capsys):
    import skimage.data

    from rewards.imagereward import IR_MEAN, IR_STD
    from rewards.registry import build_reward

    astronaut = skimage.data.astronaut()
    yy, xx = np.mgrid[0:512, 0:512]
    alpha = np.clip((xx + yy) // 3, 0, 255).astype(np.uint8)  # transparent corner to opaque
    files = {
        "rgba.png": Image.fromarray(np.dstack([astronaut, alpha]), "RGBA"),
        "palette.png": Image.fromarray(astronaut).quantize(32),
    }
    for name, im in files.items():
        im.save(tmp_path / name)
    cfg = tmp_path / "blip.yaml"
    cfg.write_text(
        f"rewards:\n"
        f"  - target: facescore\n    options: {{model: '{blip_dir}', vision_heads: 2,"
        f" detector: '{__name__}:OneFace'}}\n"
        f"  - target: imagereward\n    options: {{model: '{blip_dir}', vision_heads: 2}}\n"
    )
    paths = [str(tmp_path / n) for n in files]
    assert rlfh(["score", str(cfg), *paths]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    fs = build_reward("facescore", {"model": str(blip_dir), "vision_heads": 2, "detector": OneFace()})
    y0, y1, x0, x1 = 24, 141, 174, 266  # FaceScore's crop of FACE: one extra pixel per side
    for obj, path in zip(objs, paths):
        with Image.open(path) as src:
            src.load()
        # FaceScore crops the file in its own mode (ToTensor keeps the alpha channel), IR takes it whole.
        crop = (
            Image.fromarray(np.asarray(src)[y0:y1, x0:x1], src.mode)
            if src.mode == "RGBA"
            else src.crop((x0, y0, x1, y1))
        )
        with torch.no_grad():
            face = fs.model(_reference_transform(crop)[None], fs.input_ids, fs.attention_mask).item()
            ids, mask = tokenize(fs.tokenizer, [""])  # rlfh score's prompt for files
            whole = fs.model(_reference_transform(src)[None], ids, mask).item()
            # RGB first (the order this file used to be scored in) is measurably different.
            rgb = src.convert("RGB")
            face_rgb = fs.model(
                _reference_transform(rgb.crop((x0, y0, x1, y1)))[None], fs.input_ids, fs.attention_mask
            ).item()
        assert obj["facescore"]["value"] == pytest.approx(face, abs=1e-5), path
        assert obj["imagereward"]["info"]["raw"] == pytest.approx(whole, abs=1e-5), path
        assert obj["imagereward"]["value"] == pytest.approx((whole - IR_MEAN) / IR_STD, abs=1e-5)
        assert abs(face_rgb - face) > 1e-3, path
