import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nexus_extproc", *args], capture_output=True, text=True,
                          timeout=60, input=stdin, env=env)


def test_check_config_accepts_the_demo_config():
    r = run("check-config", str(ROOT / "examples/demo.yaml"))
    assert r.returncode == 0 and "OK" in r.stdout


def test_check_config_names_the_bad_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("backends: {openai: {cluster: openai, type: cloud, provider: openai}}\n"
                 "budget: {monthly_limit_usd: 10, hard_limit_action: block_everything}\n")
    r = run("check-config", str(f))
    assert r.returncode == 2 and "budget.hard_limit_action" in r.stderr


def test_serve_refuses_a_bad_config(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("backends: {}\n")
    r = run("serve", "--config", str(f))
    assert r.returncode == 2 and "backends" in r.stderr


def test_hash_key_is_salted(tmp_path):
    import os

    a = run("hash-key", stdin="sk-abc\n", env={**os.environ, "NEXUS_API_KEY_SALT": "s1"}).stdout.strip()
    b = run("hash-key", stdin="sk-abc\n", env={**os.environ, "NEXUS_API_KEY_SALT": "s2"}).stdout.strip()
    assert a.startswith("hmac-sha256:") and a != b and "sk-abc" not in a


def test_serve_names_a_taken_port_and_how_to_move_it(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        f = tmp_path / "c.yaml"
        f.write_text("backends: {openai: {cluster: openai, type: cloud, provider: openai}}\n"
                     f"store: {{kind: sqlite, path: {tmp_path / 'l.db'}}}\n")
        r = run("serve", "--config", str(f), "--grpc-port", str(port), "--admin-port", "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} (the ext_proc gRPC port)" in lines[0] and "--grpc-port" in lines[0], \
        r.stderr
