"""Static files served by the app itself: the fallback behind the platform's static
file server (runner/static.py).

The balancer sends GET and HEAD requests under STATIC_URL to the static file server
of a host holding the release's collected files, so they never reach the app while
one answers. This middleware answers them when none does: a runner with
`serve_static` off, a static server restarting, a release whose static URL the
platform does not serve (a CDN's, or "/"), an older balancer. It is always installed
rather than switched off by the runner, because whether a given request reaches it is
decided per request by the balancer, after the instance started; it costs one prefix
test per request.

A middleware placed first: GET and HEAD requests under STATIC_URL are answered from
STATIC_ROOT (what collectstatic gathered at build) with Django's own `serve` view
(safe path joining, content type, Last-Modified and 304s); anything not found there
goes on to the project as usual.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

CACHE_CONTROL = "public, max-age=3600"


class StaticFilesMiddleware:
    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        from django.conf import settings
        from django.core.exceptions import MiddlewareNotUsed

        self.get_response = get_response
        self.root = settings.STATIC_ROOT
        url = urlsplit(str(settings.STATIC_URL or ""))
        # a static URL on another host (a CDN) is not ours to serve
        self.prefix = url.path if url.path.startswith("/") and not url.netloc else ""
        if not self.root or self.prefix in ("", "/"):
            raise MiddlewareNotUsed

    def __call__(self, request: Any) -> Any:
        if request.method in ("GET", "HEAD") and request.path.startswith(self.prefix):
            from django.http import Http404
            from django.views.static import serve
            try:
                response = serve(request, request.path[len(self.prefix):],
                                 document_root=self.root)
            except Http404:
                return self.get_response(request)
            response.setdefault("Cache-Control", CACHE_CONTROL)
            return response
        return self.get_response(request)
