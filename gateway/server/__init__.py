"""The gRPC GatewayService: send on any channel, status timelines, connectors, event streams.

:class:`~gateway.server.app.GatewayServer` runs it (``channel-gateway run gateway``);
:mod:`gateway.server.client` holds the ``send`` and ``trace`` commands' client side.
"""
