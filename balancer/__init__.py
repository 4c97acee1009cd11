"""HTTP/1.1 balancer: routes requests by Host to app instances.

Sans-IO decisions live in http1.py (parsing, framing), admission.py (may this request
reach a backend), routes.py (host -> app), pool.py (backend choice), pages.py and
stats.py. Two engines move the bytes around them: asyncio (aio_*.py, the default,
uvloop when installed) and eventlet (proxy.py, daemon.py, subscriber.py); master.py
runs either as SO_REUSEPORT workers with reload and drain.
"""
