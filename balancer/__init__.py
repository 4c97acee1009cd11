"""HTTP/1.1 balancer: routes requests by Host to app instances.

Sans-IO decisions live in http1.py (parsing, framing), admission.py (may this request
reach a backend), routes.py (host -> app), pool.py (backend choice), pages.py and
stats.py. The life of a connection (exchange.py), a worker (daemon.py) and route
replication (subscriber.py) are written once as coroutines; two engines run them:
asyncio (aio.py, the default, uvloop when installed) and eventlet (green.py).
master.py runs workers as SO_REUSEPORT processes with reload and drain.
"""
