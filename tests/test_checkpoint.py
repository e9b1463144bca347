"""Params as .npz, JSON with numpy scalars, atomic folder publishing and the --out check."""
import json

import numpy as np
import pytest

from clr_lambda_search.model.checkpoint import load_json, load_params, save_json, save_params
from clr_lambda_search.model.outputs import MANIFEST, check_results_dir, publish_dir
from clr_lambda_search.model.errors import InputError
from clr_lambda_search.model.network import PARAM_KEYS, init_params


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_params_round_trip(tmp_path, dtype):
    params = init_params(20, 10, 10, np.random.default_rng(0), dtype=dtype)
    params["b1"] += 0.25
    save_params(tmp_path / "params.npz", params)
    loaded = load_params(tmp_path / "params.npz")
    assert set(loaded) == set(PARAM_KEYS)
    for k in PARAM_KEYS:  # bit-exact values, same dtype and shape
        assert loaded[k].dtype == params[k].dtype
        np.testing.assert_array_equal(loaded[k], params[k])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.npz"]  # no temp file left


def test_params_file_is_a_plain_npz(tmp_path):
    params = init_params(4, 3, 2, np.random.default_rng(0))
    save_params(tmp_path / "p.npz", params)
    with np.load(tmp_path / "p.npz") as z:  # a plain np.load works: users can open it directly
        assert sorted(z.files) == sorted(PARAM_KEYS)


def test_save_json_handles_numpy_scalars_and_arrays(tmp_path):
    obj = {"f32": np.float32(0.5), "f64": np.float64(1e-3), "i64": np.int64(7), "b": np.bool_(True),
           "arr": np.arange(3), "nested": [{"acc": np.float64(0.25)}], "plain": "x"}
    save_json(tmp_path / "m.json", obj)
    back = load_json(tmp_path / "m.json")
    # numpy scalars become plain JSON numbers/bools with the same value
    assert back == {"f32": 0.5, "f64": 1e-3, "i64": 7, "b": True, "arr": [0, 1, 2],
                    "nested": [{"acc": 0.25}], "plain": "x"}
    assert isinstance(back["i64"], int) and isinstance(back["b"], bool)
    json.loads((tmp_path / "m.json").read_text())  # standard JSON, readable by anything


def test_save_json_refuses_unknown_objects_and_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        save_json(tmp_path / "m.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file


def test_save_json_replaces_an_existing_file(tmp_path):
    save_json(tmp_path / "m.json", {"v": 1})
    save_json(tmp_path / "m.json", {"v": 2})
    assert load_json(tmp_path / "m.json") == {"v": 2}


def test_publish_dir_creates_and_replaces(tmp_path):
    out = tmp_path / "runs" / "run"  # parents are created
    publish_dir(out, lambda d: (d / "a.txt").write_text("old"))
    assert (out / "a.txt").read_text() == "old"
    publish_dir(out, lambda d: (d / "b.txt").write_text("new"))
    # the new folder replaced the old one as a whole: no stale file survives
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "b.txt"]
    assert (out / "b.txt").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # no temp or old folders left


def test_publish_dir_keeps_the_old_folder_when_the_writer_fails(tmp_path):
    out = tmp_path / "run"
    publish_dir(out, lambda d: (d / "a.txt").write_text("old"))

    def failing(d):
        (d / "half.txt").write_text("partial")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        publish_dir(out, failing)
    # the previous results are intact and the half-written folder is gone
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "a.txt"]
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_publish_dir_failure_without_old_folder_creates_nothing(tmp_path):
    with pytest.raises(ValueError):
        publish_dir(tmp_path / "run", lambda d: (_ for _ in ()).throw(ValueError("boom")))
    assert list(tmp_path.iterdir()) == []


def test_check_results_dir(tmp_path):
    check_results_dir(tmp_path)  # an existing empty folder is fine
    check_results_dir(tmp_path / "new" / "run")  # so is a path that does not exist yet
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    with pytest.raises(InputError, match="file"):
        check_results_dir(f)
    with pytest.raises(InputError):
        check_results_dir(f / "run")  # under a file: can never be created
    assert f.read_text() == "keep me"  # the check touches nothing
    assert not (tmp_path / "new").exists()
