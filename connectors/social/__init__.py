"""Social connectors: WhatsApp Cloud API, Messenger and Instagram (Meta), Telegram Bot API.

Meta's three channels share one webhook envelope, one signature scheme and one
Graph API client (``connectors.social.meta``); each channel keeps its own
mapping. ``connectors.social.media`` fetches provider media SSRF-safely.
"""
