"""transformers' own model test suite (`ModelTesterMixin`, `tests/test_modeling_common.py`), taken from the source
distribution of the installed transformers version on PyPI and cached, so that the WEMoE classes are held to the
checks every transformers model passes, on whichever transformers a user has.

The sdist's `tests/` lacks two modules the common file imports (`exporters/test_export.py`,
`generation/test_utils.py`); empty stand-ins for their mixins are enough to import it.
"""

import hashlib
import importlib
import io
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"  # where the sdist's tests are importable (relative imports need a package)
FILES = ("test_modeling_common.py", "test_configuration_common.py")
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}
SIMPLE_INDEX = "https://pypi.org/simple/transformers/"


def cache_root() -> Path:
    return Path(os.environ.get("WEMOE_TEST_CACHE", Path.home() / ".cache" / "wemoe-tests"))


def fetch_sdist(version: str) -> bytes:
    """The sdist of `transformers==version` from PyPI's simple index (JSON form), checked against its sha256."""
    request = urllib.request.Request(SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    name = f"transformers-{version}.tar.gz"
    entry = next((file for file in files if file["filename"] == name), None)
    if entry is None:
        raise OSError(f"PyPI lists no {name}")
    with urllib.request.urlopen(entry["url"], timeout=300) as response:
        content = response.read()
    if hashlib.sha256(content).hexdigest() != entry["hashes"]["sha256"]:
        raise OSError(f"{name} from PyPI does not match its sha256")
    return content


def extract_tests(content: bytes, version: str, directory: Path) -> None:
    """The common test files into `directory/PACKAGE`, with the stand-ins; staged and renamed, so a cache is whole."""
    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    package = staging / PACKAGE
    package.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(content)) as archive:
        for name in FILES:
            member = archive.extractfile(f"transformers-{version}/tests/{name}")
            (package / name).write_bytes(member.read())
    for path, text in {"__init__.py": "", **STAND_INS}.items():
        (package / path).parent.mkdir(parents=True, exist_ok=True)
        (package / path).write_text(text)
        (package / path).with_name("__init__.py").touch()
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(directory)
    except OSError:  # another process filled the cache meanwhile
        if not (directory / PACKAGE).is_dir():
            raise


def load_common_tests():
    """`test_modeling_common` of the installed transformers version (fetched once into the cache)."""
    version = transformers.__version__
    directory = cache_root() / f"transformers-{version}"
    if not (directory / PACKAGE / FILES[0]).is_file():
        extract_tests(fetch_sdist(version), version, directory)
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
