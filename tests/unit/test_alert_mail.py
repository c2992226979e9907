"""Alert mail (issue 28 item 6, seed 004) against a real SMTP server started here (aiosmtpd) that requires
STARTTLS and a login: recipients from the config, $BUDGET_ALERT_EMAIL_RECIPIENTS and the budget's own; a
temporary refusal retried; a refused recipient not retried."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from email import message_from_bytes
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from nexus_extproc.app import budget_service
from nexus_extproc.budget.alert_mail import MailSender, render
from nexus_extproc.budget.policy import Target
from nexus_extproc.budget.scopes import RequestFacts
from nexus_extproc.config import AlertsConfig, parse_config
from nexus_extproc.edge.email import send_mail
from nexus_extproc.ledger import SpendRecord
from tests.conftest import make_config


class Inbox:
    def __init__(self, refuse_first: int = 0, bad: str = "") -> None:
        self.got: list[tuple[list[str], bytes]] = []
        self.refuse_first = refuse_first
        self.bad = bad
        self.attempts = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == self.bad:
            return "550 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.attempts += 1
        if self.attempts <= self.refuse_first:
            return "451 try again later"
        self.got.append((list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"), "-out",
                    str(d / "cert.pem")], check=True, capture_output=True)
    return d


def smtp(inbox: Inbox, cert: Path) -> Controller:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert / "cert.pem", cert / "key.pem")
    c = Controller(inbox, hostname="127.0.0.1", port=_port(), tls_context=ctx, require_starttls=True,
                   auth_required=True, auth_require_tls=True,
                   authenticator=lambda server, session, envelope, mechanism, auth_data: AuthResult(
                       success=auth_data.login == b"nexus" and auth_data.password == b"s3cret"))
    c.start()
    return c


def alerts_cfg(c: Controller, cert: Path, **kw) -> AlertsConfig:
    return AlertsConfig(backoff_secs=0.01, max_attempts=3, email={
        "smtp_host": "127.0.0.1", "smtp_port": c.port, "tls_ca_file": str(cert / "cert.pem"), "username": "nexus",
        "recipients": ["finops@example.com"], "sender": "nexus@example.com"} | kw)


async def test_a_budget_alert_mails_every_recipient_over_starttls(tmp_path, cert, monkeypatch):
    inbox = Inbox()
    c = smtp(inbox, cert)
    try:
        monkeypatch.setenv("NEXUS_SMTP_PASSWORD", "s3cret")
        cfg = make_config(
            budgets=[{"name": "team-ml", "scope": {"team": "ml"}, "limit_usd": 1, "alert_thresholds": [50],
                      "alert_emails": ["ml-lead@example.com"]}],
            store={"kind": "sqlite", "path": str(tmp_path / "l.db")},
            alerts=alerts_cfg(c, cert, recipients=["finops@example.com", "cfo@example.com"]).model_dump())
        svc = budget_service(cfg)
        facts = RequestFacts("gpt-4o", "cloud", team="ml")
        adm = await svc.admit("r1", Target("openai", "cloud", "gpt-4o", 600_000), None, facts)
        await svc.settle("r1", adm, 600_000, SpendRecord(time.time(), "gpt-4o", "openai", 1, 1, 0, "usage"))
        for _ in range(100):
            if any(b"at 50 %" in raw for _, raw in inbox.got):
                break
            await asyncio.sleep(0.05)
        await svc.alerts.drain(5)
        # The 50 % threshold, and (after the month's first day) the forecast passing the limit: one mail each.
        mails = {message_from_bytes(raw)["Subject"]: (to, message_from_bytes(raw)) for to, raw in inbox.got}
        assert "[nexus] budget team-ml at 50 %" in mails and len(mails) == len(inbox.got)
        assert set(mails) <= {"[nexus] budget team-ml at 50 %", "[nexus] budget team-ml: forecast passes the limit"}
        to, msg = mails["[nexus] budget team-ml at 50 %"]
        assert sorted(to) == ["cfo@example.com", "finops@example.com", "ml-lead@example.com"]
        assert msg["From"] == "nexus@example.com"
        body = msg.get_payload()
        assert "threshold: 50" in body and "limit_usd: 1" in body
    finally:
        c.stop()


def test_the_seed_variable_adds_recipients():
    doc = {"backends": {"o": {"cluster": "o", "type": "cloud", "provider": "openai", "default": True}},
           "alerts": {"email": {"smtp_host": "mail", "recipients": ["a@example.com"]}}}
    cfg = parse_config(doc, environ={"BUDGET_ALERT_EMAIL_RECIPIENTS": " b@example.com, c@example.com "})
    assert cfg.alerts.email.recipients == ["a@example.com", "b@example.com", "c@example.com"]


async def mail_one(c: Controller, cert: Path, password: str = "s3cret", attempts: int = 3) -> None:
    """One alert through a MailSender with the real SMTP client, to the server `c`, until it gives up."""
    cfg = alerts_cfg(c, cert, timeout_secs=2).model_copy(update={"max_attempts": attempts})
    sender = MailSender(cfg, lambda to, s, b: send_mail(cfg.email, password, to, s, b), lambda _: [])
    sender.send({"budget": "b", "threshold": "80", "period": "2026-12"})
    await sender.drain(10)


async def test_a_temporary_refusal_is_retried_and_a_refused_recipient_is_not(cert):
    inbox = Inbox(refuse_first=1)
    c = smtp(inbox, cert)
    try:
        await mail_one(c, cert)
        assert inbox.attempts == 2 and len(inbox.got) == 1  # 451, then delivered
        bad = Inbox(bad="finops@example.com")
        c2 = smtp(bad, cert)
        try:
            await mail_one(c2, cert)
            assert bad.got == [] and bad.attempts == 0  # refused at RCPT, once: not retried into the same 550
        finally:
            c2.stop()
        # A wrong password delivers nothing (aiosmtpd answers a failed login by going silent, so the client
        # times out: one attempt here keeps the test short).
        before = len(inbox.got)
        await mail_one(c, cert, password="wrong", attempts=1)
        assert len(inbox.got) == before
    finally:
        c.stop()


def test_tls_is_verified(cert, tmp_path):
    """A server whose certificate the configured CA did not sign is refused, not mailed in the clear."""
    inbox = Inbox()
    c = smtp(inbox, cert)
    try:
        other = tmp_path / "other"
        other.mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=x", "-keyout", str(other / "k.pem"), "-out", str(other / "c.pem")], check=True,
                       capture_output=True)
        cfg = alerts_cfg(c, cert, tls_ca_file=str(other / "c.pem"))
        with pytest.raises(ValueError):
            asyncio.run(send_mail(cfg.email, "s3cret", ["a@example.com"], "s", "b"))
        assert inbox.got == []
    finally:
        c.stop()


def test_render_subjects():
    assert render({"budget": "g", "threshold": "forecast"})[0] == "[nexus] budget g: forecast passes the limit"
    assert render({"budget": "runaway", "threshold": "runaway", "dimension": "session", "action": "throttle"}
                  )[0] == "[nexus] runaway spend: session (throttle)"


async def test_a_scheduled_report_can_go_by_mail(tmp_path, cert, monkeypatch):
    inbox = Inbox()
    c = smtp(inbox, cert)
    try:
        monkeypatch.setenv("NEXUS_SMTP_PASSWORD", "s3cret")
        cfg = make_config(budgets=[{"name": "team-ml", "limit_usd": 1, "reports": {
                              "schedule": "00:00", "to": "mailto:finops@example.com, cfo@example.com"}}],
                          store={"kind": "sqlite", "path": str(tmp_path / "r.db")},
                          alerts=alerts_cfg(c, cert).model_dump())
        svc = budget_service(cfg)
        made = await svc.reports.run_due()
        assert made == ["mailto (2)"]
        to, raw = inbox.got[0]
        msg = message_from_bytes(raw)
        assert sorted(to) == ["cfo@example.com", "finops@example.com"]
        assert msg["Subject"].startswith("[nexus] team-ml report ") and msg["Subject"].endswith("(json)")
        doc = json.loads(msg.get_payload(decode=True))
        assert doc["budget"] == "team-ml" and doc["cost_usd"] == 0.0
        assert await svc.reports.run_due() == []  # once per window
    finally:
        c.stop()
