"""What kind of Python app a release is, and what the platform adds for it.

Found at prepare, from the release's files and its virtualenv:
- a Django project: `manage.py` at the top, Django installed, and a settings module
  (the app's DJANGO_SETTINGS_MODULE config var, else the default manage.py or a
  top-level package's wsgi.py `setdefault`s) that exists in the release;
- a Flask app: Flask installed in its virtualenv.
Unless the app turns injection off (config var BERTH_SETTINGS_INJECTION=off, or
`settings_injection: off` in berth.yaml), its processes get the settings layers of
settings_templates/ (see settings_templates/runtime/berth_settings/__init__.py):
- Django: DJANGO_SETTINGS_MODULE=berth_settings.django_settings, which loads the
  project's own module (BERTH_DJANGO_SETTINGS) and applies the layers; and at
  prepare, `python manage.py collectstatic --noinput` into the release's static dir
  `.berth/static` (in the app's jail, as its user), once per release and host;
- Flask: a one-line .pth in the virtualenv that wraps `Flask.make_config`.
Both find the layers through PYTHONPATH (settings_templates/runtime, read-only).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from messaging.manifest import Manifest
from runner.errors import BuildError
from runner.venv import Venv, Wrap, run_streaming
from settings_templates import DJANGO_SETTINGS_MODULE, FLASK_PTH_LINE, FLASK_PTH_NAME, RUNTIME_DIR

log = logging.getLogger(__name__)

SWITCH = "BERTH_SETTINGS_INJECTION"
PLATFORM_DIR = ".berth"                 # the platform's, in a release (slugcheck refuses it)
STATIC = f"{PLATFORM_DIR}/static"
STATIC_RECORD = f"{PLATFORM_DIR}/static.json"
SETTINGS_DEFAULT = re.compile(
    r"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([A-Za-z_][A-Za-z0-9_.]*)['"]""")
READ_LIMIT = 64 << 10
PROBE = ("from django.conf import settings; "
         "apps = getattr(settings, 'INSTALLED_APPS', ['django.contrib.staticfiles']); "
         "on = any(a == 'django.contrib.staticfiles' or "
         "a.startswith('django.contrib.staticfiles.') for a in apps); "
         "print('berth-staticfiles=' + str(int(on))); "
         "print('berth-static-url=' + str(settings.STATIC_URL or ''))")

LineSink = Callable[[str], None]


@dataclass(frozen=True)
class Detected:
    """What prepare found, and (for Django) where the static files were collected."""
    framework: str | None = None            # "django", "flask" or None
    settings_module: str | None = None      # Django: the project's own settings module
    injected: bool = False                  # the settings layers are on
    static_dir: Path | None = None          # collected static files (release dir)
    static_url: str | None = None           # their URL prefix

    def to_wire(self) -> dict[str, Any]:
        static = ({"dir": str(self.static_dir), "url": self.static_url}
                  if self.static_dir is not None else None)
        return {"framework": self.framework, "settings_module": self.settings_module,
                "injected": self.injected, "static": static}


def injection_wanted(env: dict[str, str], manifest: Manifest) -> bool:
    return manifest.settings_injection and env.get(SWITCH, "on").strip().lower() != "off"


def site_packages(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python3.*/site-packages"))
    return found[0] if found else None


def installed(venv: Path, package: str) -> bool:
    site = site_packages(venv)
    return site is not None and (site / package / "__init__.py").is_file()


def _read(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(READ_LIMIT)
    except OSError:
        return ""


def _module_exists(release_dir: Path, module: str) -> bool:
    base = release_dir.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def django_settings_module(release_dir: Path, env: dict[str, str]) -> str | None:
    """The project's own settings module, or None when there is none to be found."""
    own = env.get("DJANGO_SETTINGS_MODULE")
    if own and own != DJANGO_SETTINGS_MODULE:
        return own if _module_exists(release_dir, own) else None
    sources = [release_dir / "manage.py",
               *sorted(release_dir.glob("*/wsgi.py")), *sorted(release_dir.glob("*/asgi.py"))]
    for source in sources:
        m = SETTINGS_DEFAULT.search(_read(source))
        if m and _module_exists(release_dir, m.group(1)):
            return m.group(1)
    return None


def detect(release_dir: Path, venv: Path, env: dict[str, str],
           manifest: Manifest) -> Detected:
    wanted = injection_wanted(env, manifest)
    if (release_dir / "manage.py").is_file() and installed(venv, "django"):
        module = django_settings_module(release_dir, env)
        if module is not None:
            return Detected("django", module, wanted)
    if installed(venv, "flask"):
        return Detected("flask", None, wanted)
    return Detected()


def app_env(detected: Detected, release_dir: Path, manifest: Manifest,
            env: dict[str, str], host_dir: str = "") -> dict[str, str]:
    """What the app's processes get on top of its config, for the settings layers."""
    if not detected.injected or detected.framework is None:
        return {}
    runtime = str(RUNTIME_DIR)
    existing = env.get("PYTHONPATH", "")
    out = {"BERTH_FRAMEWORK": detected.framework,
           "PYTHONPATH": existing if existing.split(os.pathsep)[0] == runtime
           else os.pathsep.join(p for p in (runtime, existing) if p)}
    if host_dir:
        out["BERTH_SETTINGS_HOST_DIR"] = host_dir
    if detected.framework == "django":
        assert detected.settings_module is not None
        out.update({"DJANGO_SETTINGS_MODULE": DJANGO_SETTINGS_MODULE,
                    "BERTH_DJANGO_SETTINGS": detected.settings_module,
                    "BERTH_STATIC_ROOT": str(release_dir / STATIC)})
        if manifest.static_url:
            out["BERTH_STATIC_URL"] = manifest.static_url
        if manifest.static_dirs:
            out["BERTH_STATIC_DIRS"] = os.pathsep.join(
                str(release_dir / d) for d in manifest.static_dirs)
    return out


DEFAULT_STATIC_URL = "/static/"


def with_found_static(detected: Detected, release_dir: Path, manifest: Manifest) -> Detected:
    """An app that is not Django has no collectstatic: its static directory is the one
    berth.yaml declares (the first of `static_dirs`, under `static_url`), or a
    top-level `static/` (Flask's default for an app module at the top), served under
    /static/. It must be a real directory inside the release (no link)."""
    if manifest.static_dirs:
        candidate = manifest.static_dirs[0]
    elif (release_dir / "static").is_dir():
        candidate = "static"
    else:
        return detected
    path = release_dir / candidate
    try:
        inside = path.resolve().is_relative_to(release_dir.resolve())
    except OSError:
        return detected
    if not inside or path.is_symlink() or not path.is_dir():
        return detected
    url = manifest.static_url or DEFAULT_STATIC_URL
    return Detected(detected.framework, detected.settings_module, detected.injected,
                    path, url)


class Frameworks:
    """The prepare step after the virtualenv: detect, hook Flask, collect Django's
    static files. `locks_dir` is the runner's own (never a path an app could plant)."""

    def __init__(self, locks_dir: Path, host_dir: str = "") -> None:
        self.locks_dir = locks_dir
        self.host_dir = host_dir

    def prepare(self, release_dir: Path, venv: Venv, env: dict[str, str],
                manifest: Manifest, wrap: Wrap, owner: tuple[int, int] | None,
                data_dir: Path, sink: LineSink) -> tuple[Detected, dict[str, str]]:
        """(what was found, the env the app's processes get for it)."""
        detected = detect(release_dir, venv.path, env, manifest)
        if detected.framework != "django":
            detected = with_found_static(detected, release_dir, manifest)
        if detected.framework is None:
            return detected, {}
        name = ("Django project (settings " + str(detected.settings_module) + ")"
                if detected.framework == "django" else "Flask app")
        if not detected.injected:
            sink(f"-----> {name}: settings injection is off")
            return detected, {}
        sink(f"-----> {name}: Berth's settings layers are on "
             f"(`berth config set {SWITCH}=off` turns them off)")
        extra = app_env(detected, release_dir, manifest, env, self.host_dir)
        if detected.framework == "flask":
            self._hook_flask(venv, wrap, sink)
            return detected, extra
        run_env = {**env, **extra, "PATH": f"{venv.bin}:/usr/local/bin:/usr/bin:/bin",
                   "VIRTUAL_ENV": str(venv.path), "HOME": str(data_dir),
                   "BERTH_DATA_DIR": str(data_dir)}
        # the real key is made on success (controller); collectstatic needs one
        run_env.setdefault("SECRET_KEY", "berth-build-" + secrets.token_hex(16))
        static_dir, url = self._collect_static(release_dir, venv, run_env, wrap, owner, sink)
        detected = Detected(detected.framework, detected.settings_module, True,
                            static_dir, url)
        return detected, extra

    def _hook_flask(self, venv: Venv, wrap: Wrap, sink: LineSink) -> None:
        site = site_packages(venv.path)
        if site is None:
            return
        pth = site / FLASK_PTH_NAME
        if pth.is_file() and pth.read_text(errors="replace") == FLASK_PTH_LINE:
            return
        # written by the app's user: the venv is its own
        write = ["sh", "-c", 'printf %s "$1" > "$2"', "sh", FLASK_PTH_LINE, str(pth)]
        run_streaming(wrap(write, (venv.path,)), sink, "adding the Flask settings hook")

    def _collect_static(self, release_dir: Path, venv: Venv, env: dict[str, str],
                        wrap: Wrap, owner: tuple[int, int] | None,
                        sink: LineSink) -> tuple[Path | None, str | None]:
        """`manage.py collectstatic` into the release's static dir, once per release on
        this host (recorded in .berth/static.json); instances of one release starting
        together wait for the first."""
        static = release_dir / STATIC
        record = release_dir / STATIC_RECORD
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        lock_name = hashlib.sha256(f"static:{release_dir}".encode()).hexdigest()[:32]
        with open(self.locks_dir / f"{lock_name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if record.is_file():
                    known = json.loads(record.read_text())
                    if known.get("dir") is None:
                        return None, None
                    sink(f"-----> Static files already collected ({known['url']})")
                    return static, str(known["url"])
                python = str(venv.bin / "python")
                try:
                    probe: list[str] = []
                    run_streaming(wrap([python, "-c", PROBE], ()), probe.append,
                                  "reading STATIC_URL", cwd=release_dir, env=env)
                    if "berth-staticfiles=0" in probe:
                        self._make_static_dir(release_dir, owner)
                        record.write_text(json.dumps({"dir": None, "url": None}))
                        sink("-----> django.contrib.staticfiles is not installed: "
                             "no static files to collect")
                        return None, None
                    self._make_static_dir(release_dir, owner)
                    sink("-----> Running python manage.py collectstatic --noinput")
                    run_streaming(wrap([python, "manage.py", "collectstatic", "--noinput"],
                                       (static,)), sink, "collectstatic", cwd=release_dir,
                                  env=env)
                except BuildError as exc:
                    raise BuildError(
                        exc.message,
                        "run `python manage.py collectstatic --noinput` locally with DEBUG "
                        "off to see why; or turn Berth's settings off with `berth config "
                        f"set {SWITCH}=off`") from None
                url = next((line.split("=", 1)[1] for line in reversed(probe)
                            if line.startswith("berth-static-url=")), "")
                record.write_text(json.dumps({"dir": str(static), "url": url}))
                sink(f"-----> Static files collected: {url or '(no STATIC_URL)'} -> {STATIC}/")
                return static, url
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _make_static_dir(release_dir: Path, owner: tuple[int, int] | None) -> None:
        top = release_dir / PLATFORM_DIR
        for path in (top, release_dir / STATIC):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                pass
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode):
                raise BuildError(f"{path} is not a directory",
                                 f"{PLATFORM_DIR}/ is the platform's; push again without it")
            if owner is not None:
                os.chown(path, *owner, follow_symlinks=False)
