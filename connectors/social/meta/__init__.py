"""What Meta's WhatsApp, Messenger and Instagram webhooks share.

- ``signature``: ``X-Hub-Signature-256`` over the raw body, and the
  verification handshake (``hub.mode`` / ``hub.verify_token`` / ``hub.challenge``);
- ``graph``: the Graph API client (errors to retry decisions);
- ``envelope``: the ``{"object", "entry": [...]}`` envelope, parsed strictly.
"""
