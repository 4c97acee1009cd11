"""Berth's settings for Django and Flask apps, applied in layers (later ones win):

1. the app's own settings module (Django) or what Flask starts with;
2. platform base (django_base.py / flask_base.py): hostnames, secret key, DEBUG off,
   databases and caches from DATABASE_URL / REDIS_URL, static files, logs to stdout;
3. per-host: `<BERTH_SETTINGS_HOST_DIR>/django.py` or `flask.py`, an optional file
   the operator keeps on the runner host (runner setting `settings_dir`);
4. the app's own overrides from its config: DJANGO_<NAME> / FLASK_<NAME> config vars.

This package runs inside the app's processes, on the app's own interpreter: standard
library only. What the platform passes, by environment variable:
    BERTH_FRAMEWORK          django | flask (set by the runner when injection is on)
    BERTH_DJANGO_SETTINGS    the app's own settings module (detected at build)
    BERTH_HOSTNAMES          the app's host names, comma-separated (controller)
    BERTH_STATIC_ROOT        where collectstatic writes (the release's static dir)
    BERTH_STATIC_URL         URL prefix of static files (app manifest), optional
    BERTH_STATIC_DIRS        more source dirs of static files (app manifest), optional
    BERTH_SETTINGS_HOST_DIR  the per-host layer's directory, optional
    SECRET_KEY, DATABASE_URL, REDIS_URL, DJANGO_*, FLASK_*   the app's config
"""
