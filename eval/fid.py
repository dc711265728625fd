"""FID evaluation script: ``python eval/fid.py ...`` is the same command as ``fastgen eval fid ...``.

Examples:
    python eval/fid.py --fake builtin:digits --n 2000 --steps 20
    python eval/fid.py --fake builtin:digits --solver fastgen/assets/digits-schedules/nfe5.json --steps 5 --n 2000
    accelerate launch --multi_gpu --num_processes 2 eval/fid.py --fake builtin:digits --n 2000 --device cpu --json
    python eval/fid.py --fake samples/ --real real_images/ --features inception --inception-weights W.pth
"""
import sys
from pathlib import Path

try:
    from fastgen.cli import main
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fastgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "fid", *sys.argv[1:]]))
