"""Social connectors: WhatsApp Cloud API, Messenger and Instagram (Meta), Telegram Bot API.

Meta's three channels share one webhook envelope, one signature scheme and one
Graph API client (``connectors.social.meta``); each channel keeps its own
mapping. ``connectors.social.media`` fetches provider media SSRF-safely.
``channel-gateway run social`` hosts every enabled one of them::

    connectors:
      whatsapp.meta:
        app_secret: {env: META_APP_SECRET}        # signs X-Hub-Signature-256
        verify_token: {env: META_VERIFY_TOKEN}    # the subscription handshake
        accounts:
          main: {phone_number_id: "106540352242922", access_token: {env: WA_TOKEN}}
      messenger.meta:
        app_secret: {env: META_APP_SECRET}
        verify_token: {env: META_VERIFY_TOKEN}
        accounts:
          shop: {page_id: "110198307491234", access_token: {env: PAGE_TOKEN}}
      instagram.meta:
        app_secret: {env: META_APP_SECRET}
        verify_token: {env: META_VERIFY_TOKEN}
        accounts:
          shop: {page_id: "17841405822304914", access_token: {env: PAGE_TOKEN}}
      telegram.bot:
        bots:
          support: {token: {env: TG_TOKEN}, secret_token: {env: TG_SECRET}}

Callback URLs: ``<public base>/webhooks/whatsapp/meta``, ``.../messenger/meta``,
``.../instagram/meta`` and ``.../telegram/bot/<bot>`` (register the latter
with ``channel-gateway telegram set-webhook <bot>``).
"""
