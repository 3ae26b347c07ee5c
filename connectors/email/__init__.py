"""Email connectors: SMTP (in and out), IMAP polling, and the SendGrid,
Mailgun and Postmark inbound and event webhooks.

Shared pieces: :mod:`~connectors.email.mime` (hostile-mail-safe MIME
normalization off the event loop), :mod:`~connectors.email.mapping` (mail to
``gateway.api.v1`` events), :mod:`~connectors.email.compose` (outbound MIME),
:mod:`~connectors.email.ingest` (parse, map, publish or quarantine).
"""
