"""Alert mail over SMTP: the standard library's smtplib (STARTTLS, login), run in a thread so that a slow mail
server never holds the event loop. No new dependency for one message per alert."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage

from nexus_extproc.config import EmailConfig


class PermanentMailError(ValueError):
    """The server refused the message, a recipient or the login: sending it again will not help."""


def _send(cfg: EmailConfig, password: str | None, to: list[str], subject: str, body: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = cfg.sender, ", ".join(to), subject
    msg.set_content(body)
    try:
        with smtplib.SMTP(cfg.smtp_host or "", cfg.smtp_port, timeout=cfg.timeout_secs) as s:
            if cfg.starttls:
                ctx = ssl.create_default_context(cafile=cfg.tls_ca_file)
                s.starttls(context=ctx)
            if cfg.username:
                s.login(cfg.username, password or "")
            s.send_message(msg)
    except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPAuthenticationError,
            smtplib.SMTPNotSupportedError, ssl.SSLCertVerificationError) as e:
        raise PermanentMailError(type(e).__name__) from None


async def send_mail(cfg: EmailConfig, password: str | None, to: list[str], subject: str, body: str) -> None:
    """Raises PermanentMailError (do not retry) or OSError (smtplib's errors included: retry)."""
    await asyncio.to_thread(_send, cfg, password, to, subject, body)
