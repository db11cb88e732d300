#!/usr/bin/env python3
"""Builds the real-data test fixtures of sgr-data from public wheels (run once; outputs are committed).

    pip download --no-deps foolbox==3.3.4 scikit-image -d /tmp/wheels
    pip install pillow numpy scipy
    python3 scripts/make_fixtures.py /tmp/wheels

Writes
- sgr-data/tests/fixtures/cifar10-foolbox/test_batch.bin: the 20 real CIFAR-10 test images that
  foolbox 3.3.4 ships as PNGs (foolbox/data/cifar10_<idx>_<label>.png), repacked into the CIFAR-10
  binary format (1 label byte + 1024 R + 1024 G + 1024 B, row-major), in index order;
- sgr-data/tests/fixtures/photos/: CC0 / public-domain photos from scikit-image's wheel
  (rocket.jpg, chelsea.png, camera.png) for the image-folder reader;
- sgr-data/tests/fixtures/svhn/tiny_32x32.mat: an SVHN-format MATLAB v5 file written by scipy
  (X: 32x32x3xN uint8, y: Nx1 double with 10 meaning digit 0), an oracle independent of our reader,
  with its expected contents in tiny_32x32.json.
"""
import glob
import io
import json
import os
import re
import sys
import zipfile

import numpy as np
from PIL import Image
import scipy.io

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sgr-data", "tests", "fixtures")


def wheel(folder, prefix):
    hits = glob.glob(os.path.join(folder, prefix + "*.whl"))
    if not hits:
        sys.exit(f"no {prefix}*.whl in {folder}")
    return zipfile.ZipFile(hits[0])


def cifar(folder):
    z = wheel(folder, "foolbox-3.3.4")
    names = sorted(n for n in z.namelist() if re.search(r"foolbox/data/cifar10_\d+_\d+\.png$", n))
    assert len(names) == 20, names
    out = bytearray()
    labels = []
    for n in names:
        idx, label = map(int, re.findall(r"cifar10_(\d+)_(\d+)\.png", n)[0])
        img = np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB"), dtype=np.uint8)
        assert img.shape == (32, 32, 3)
        out.append(label)
        out += img.transpose(2, 0, 1).tobytes()
        labels.append(label)
    path = os.path.join(ROOT, "cifar10-foolbox", "test_batch.bin")
    with open(path, "wb") as f:
        f.write(out)
    print(path, len(out), labels)


def photos(folder):
    z = wheel(folder, "scikit_image")
    for name in ["rocket.jpg", "chelsea.png", "camera.png"]:
        path = os.path.join(ROOT, "photos", name)
        with open(path, "wb") as f:
            f.write(z.read("skimage/data/" + name))
        print(path)


def svhn():
    rng = np.random.default_rng(0)
    n = 5
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [5], [10], [9]], dtype=np.float64)
    path = os.path.join(ROOT, "svhn", "tiny_32x32.mat")
    scipy.io.savemat(path, {"X": x, "y": y}, format="5", do_compression=False)
    pathz = os.path.join(ROOT, "svhn", "tiny_32x32_compressed.mat")
    scipy.io.savemat(pathz, {"X": x, "y": y}, format="5", do_compression=True)
    # Expected: labels with 10 -> 0; a few pixels (row, col, channel, sample) -> value.
    probes = [[0, 0, 0, 0], [31, 0, 1, 2], [0, 31, 2, 4], [7, 19, 1, 3]]
    expect = {
        "labels": [0, 1, 5, 0, 9],
        "probes": [[r, c, ch, s, int(x[r, c, ch, s])] for r, c, ch, s in probes],
    }
    with open(os.path.join(ROOT, "svhn", "tiny_32x32.json"), "w") as f:
        json.dump(expect, f)
    print(path, pathz)


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "/tmp/wheels"
    cifar(folder)
    photos(folder)
    svhn()
