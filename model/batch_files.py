"""CIFAR-10's python batch files: their names and shapes, and reading one safely.

The batch files are pickles. A pickle can run any code while it is read, so a batch file is read
with a restricted Unpickler that admits only what CIFAR-10 batches contain (numpy arrays rebuilt
from bytes) and refuses the rest before any of it runs; a file from the internet is read only once
its checksum matched (model.download).
"""
import math
import os
import pickle
from pathlib import Path

import numpy as np

from clr_lambda_search.model.errors import DataError

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
D, K = 3072, 10  # pixels per image (3 planes of 32×32), classes

# What a CIFAR-10 batch pickle may reference: numpy arrays rebuilt from bytes (numpy 1 and 2 module
# names, protocols 2-5), and the codec Python 3 uses for bytes in protocol-2 pickles. Nothing else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Admits _ALLOWED_GLOBALS only, and no array larger than max_bytes (the file's size).

    numpy rebuilds an array from a declared shape and dtype, allocating it, and only then fills it
    from the pickle's bytes: a 150-byte file could declare 3 GB. A genuine array's bytes are in
    the file, so the declared size is checked against the file's before anything is allocated.
    """

    def __init__(self, file, max_bytes, **kwargs):
        super().__init__(file, **kwargs)
        self.max_bytes = max_bytes

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        found = super().find_class(module, name)
        if name == "_reconstruct":
            return self._reconstruct(found)
        if name == "scalar":
            return lambda dtype, *args: found(self._checked(dtype, ()), *args)
        if name == "ndarray":  # only ever _reconstruct's first argument, never called itself
            return _ARRAY_TYPE
        return found

    def _reconstruct(self, reconstruct):
        def checked(subtype, shape, dtype):
            if subtype is not _ARRAY_TYPE:
                raise pickle.UnpicklingError("an array of another type than numpy.ndarray")
            return reconstruct(np.ndarray, shape, self._checked(dtype, shape))
        return checked

    def _checked(self, dtype, shape):
        """np.dtype(dtype), once shape × itemsize fits in max_bytes (UnpicklingError if not)."""
        try:
            dt = np.dtype(dtype)
            dims = [shape] if isinstance(shape, int) else [int(n) for n in shape]
        except (TypeError, ValueError) as e:
            raise pickle.UnpicklingError(f"bad array declaration ({e})") from None
        if dt.hasobject or any(n < 0 for n in dims):
            raise pickle.UnpicklingError("an array of objects or of a negative size")
        size = math.prod(dims) * dt.itemsize
        if size > self.max_bytes:
            raise pickle.UnpicklingError(f"it declares a {size:,}-byte array in a "
                                         f"{self.max_bytes:,}-byte file")
        return dt


class _ArrayType:
    """What the unpickler hands out for numpy.ndarray: a token _reconstruct accepts, not a type
    that a pickle could call to allocate an array of any shape."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refused call of numpy.ndarray")


_ARRAY_TYPE = _ArrayType()


def load_batch(path):
    """Unpickle one CIFAR-10 batch file -> (X uint8 (N, 3072), y int64 (N,)).

    Only numpy array reconstruction is admitted: a pickle that would import or call anything else
    is refused before any of it runs.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            unpickler = _BatchUnpickler(f, max_bytes=os.fstat(f.fileno()).st_size, encoding="bytes")
            return _batch_arrays(unpickler.load(), path)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused global"):
            raise DataError(f"{path} is not a CIFAR-10 batch: it asks to run code ({e}); "
                            "delete it and use the official data") from None
        raise DataError(f"{path} is corrupt ({e}); re-download or rebuild the data set") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError,
            MemoryError) as e:  # what a damaged byte stream makes the unpickler raise
        raise DataError(f"{path} is truncated or corrupt ({type(e).__name__}); "
                        "re-download or rebuild the data set") from None


def _batch_arrays(batch, path):
    def bad(why):
        return DataError(f"{path} is not a CIFAR-10 batch ({why}); re-download or rebuild the data set")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise bad("no data/labels entries")
    X, y = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(X, np.ndarray) or X.dtype != np.uint8 or X.ndim != 2 or X.shape[1] != D:
        raise bad("data is not a uint8 array of 3072 columns")
    if (not np.issubdtype(y.dtype, np.integer) or y.shape != (X.shape[0],) or y.size == 0
            or y.min() < 0 or y.max() >= K):
        raise bad("labels do not match the data")
    return X, y.astype(np.int64)
