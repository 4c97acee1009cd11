"""The wire protocol: the one place that knows frames, channels and message shapes.

Components import its modules (messaging.channels, .envelope, .messages, .errors) and
never build frames themselves. This package imports no eventlet and no component, and
its __init__ imports nothing at all: `messaging.errors` must stay importable without
pyzmq, for the slug unpacker that runs as an app's user.
"""
