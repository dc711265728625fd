"""Write ``fastgen/assets/digits-data/digits.npz``: scikit-learn's bundled handwritten digits as a package asset.

The built-in models, the digits FID reference and ``fastgen teleport-stats`` use these 1,797 8x8 images
(UCI optdigits, bundled with scikit-learn). Shipping the arrays (about 30 kB compressed) lets a plain
``pip install fastgen`` run every default command without scikit-learn; this script is the only place
that needs it (``pip install 'fastgen[train]'``). The result is byte-for-byte reproducible.

    python scripts/make_digits_data.py            # rewrite the asset
    python scripts/make_digits_data.py --check    # exit 1 if the shipped asset differs from scikit-learn's data
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "fastgen" / "assets" / "digits-data" / "digits.npz"


def digits_arrays() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images
    if not (np.array_equal(images, np.round(images)) and images.min() >= 0 and images.max() <= 16):
        raise ValueError("scikit-learn's digits are no longer integers in 0..16; update fastgen.datasets.")
    return {"images": images.astype(np.uint8), "target": data.target.astype(np.uint8)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the shipped asset with scikit-learn's data")
    args = parser.parse_args()
    arrays = digits_arrays()
    if args.check:
        with np.load(OUT, allow_pickle=False) as f:
            same = all(np.array_equal(f[k], v) and f[k].dtype == v.dtype for k, v in arrays.items())
        print(f"{OUT}: {'matches' if same else 'DIFFERS FROM'} scikit-learn's digits")
        return 0 if same else 1
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=OUT.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): images {arrays['images'].shape} uint8, "
          f"target {arrays['target'].shape} uint8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
