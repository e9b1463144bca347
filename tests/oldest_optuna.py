"""tests/test_optuna_internals.py on the oldest Optuna that pyproject.toml allows (CI runs this
beside the suite, which runs on the newest): a throwaway venv holding only that Optuna, the other
dependencies taken from this interpreter's environment through a .pth file. ~15 s.

    .venv/bin/python tests/oldest_optuna.py
"""
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def oldest_optuna():
    """The X of pyproject.toml's optuna>=X."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"optuna\s*[<>=!~]", d)]
    return re.search(r">=\s*([\w.]+)", spec).group(1)


def main():
    version = oldest_optuna()
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        python = venv / "bin" / "python"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        site = subprocess.run([python, "-c", PURELIB], check=True, capture_output=True,
                              text=True).stdout.strip()
        Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                        "--no-deps", f"optuna=={version}"], check=True)
        check = ("import optuna; from packaging.version import Version; "
                 f"assert Version(optuna.__version__) == Version({version!r}), optuna.__file__")
        subprocess.run([python, "-c", check], check=True)
        print(f"optuna {version} (the oldest pyproject.toml allows):", flush=True)
        return subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_optuna_internals.py"], cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
