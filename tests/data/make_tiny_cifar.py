"""Write the tiny CIFAR-10 of tests/conftest.py (fixture cifar_tiny_dir) into a folder, to run the
scripts on it by hand (e.g. to regenerate the storages of tests/data/, see README.md there).

    PYTHONPATH=. python tests/data/make_tiny_cifar.py DIR   # -> DIR/cifar-10-batches-py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

from conftest import write_tiny_cifar  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_tiny_cifar(sys.argv[1]).batches)
