"""`python -m nexus_dev.image DIR`: the build context `make image` hands to buildah: the project's wheel and the
runtime wheels uv.lock pins, with their hashes checked, so the image build runs offline and installs exactly the
lock.

Markers that test only the Python version are dropped before downloading: pip would evaluate them for this
machine's Python, not the image's (redis needs async-timeout below CPython 3.11.3, which Debian bookworm ships
and this venv may not be). A wheel the image does not need is harmless: pip installs by the image's own markers.
Platform markers stay (an emscripten-only package has no Linux wheel).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prepare(out: Path) -> list[Path]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    uv = str(BIN / "uv")
    subprocess.run([uv, "build", "-q", "--wheel", "--out-dir", str(out), str(REPO)], check=True)
    req = subprocess.run([uv, "export", "-q", "--frozen", "--no-dev", "--no-emit-project", "--format",
                          "requirements-txt"], check=True, capture_output=True, text=True, cwd=REPO).stdout
    reqs = out.parent / "requirements.txt"
    reqs.write_text(re.sub(r" ; python_(?:full_)?version [<>=!]+ '[^']+'(?= \\)", "", req))
    subprocess.run([str(BIN / "python"), "-m", "pip", "download", "-q", "--only-binary=:all:", "--require-hashes",
                    "-r", str(reqs), "-d", str(out)], check=True)
    return sorted(out.iterdir())


if __name__ == "__main__":
    files = prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "build" / "wheels")
    print(f"{len(files)} wheels in {files[0].parent}")
