"""HTTP/1.1 balancer: routes requests by Host to app instances.

Sans-IO decisions live in http1.py (parsing, framing), routes.py (host -> app) and
pool.py (backend choice); proxy.py and daemon.py are the eventlet I/O around them.
"""
