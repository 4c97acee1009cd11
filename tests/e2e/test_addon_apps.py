"""Issue 9, acceptance 4, on the platform as `berth up` starts it (broker, job workers,
the real provisioner): a pushed Django project migrates in its release phase against
its PostgreSQL addon and serves rows from it; a pushed app with a `worker: celery -A
... worker` process uses its Redis addon as the broker and completes tasks the web
process queues."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from cli.localplatform import LocalPlatform
from tests.conftest import forget_apps, new_apps_dir
from tests.e2e.conftest import Berth, start_platform

pytest.importorskip("dbprovision.service", reason="the provisioner is not built yet")

DJANGO_FILES = {
    "manage.py": '''\
import os, sys
if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    from django.core.management import execute_from_command_line
    execute_from_command_line(sys.argv)
''',
    "mysite/__init__.py": "",
    "mysite/settings.py": '''\
SECRET_KEY = "only-for-local-runs"
DEBUG = True
ALLOWED_HOSTS = ["localhost"]
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.staticfiles", "notes"]
STATIC_URL = "static/"
MIDDLEWARE = []
ROOT_URLCONF = "mysite.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
''',
    "mysite/urls.py": '''\
from django.urls import path
from notes import views

urlpatterns = [path("", views.listing), path("add", views.add)]
''',
    "mysite/wsgi.py": '''\
import os
from django.core.wsgi import get_wsgi_application
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
application = get_wsgi_application()
''',
    "notes/__init__.py": "",
    "notes/models.py": '''\
from django.db import models


class Note(models.Model):
    body = models.TextField()
''',
    "notes/migrations/__init__.py": "",
    "notes/migrations/0001_initial.py": '''\
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Note",
            fields=[("id", models.BigAutoField(auto_created=True, primary_key=True,
                                               serialize=False, verbose_name="ID")),
                    ("body", models.TextField())],
        ),
    ]
''',
    "notes/views.py": '''\
from django.db import connection
from django.http import JsonResponse

from notes.models import Note


def listing(request):
    return JsonResponse({"vendor": connection.vendor,
                         "notes": list(Note.objects.order_by("id")
                                       .values_list("body", flat=True))})


def add(request):
    Note.objects.create(body=request.GET.get("body", "hello"))
    return listing(request)
''',
    "requirements.txt": "Django\ngunicorn\npsycopg2-binary\n",
    "Procfile": "release: python manage.py migrate --noinput\nweb: gunicorn mysite.wsgi\n",
}

CELERY_FILES = {
    "tasks.py": '''\
import os

from celery import Celery

queue = Celery("tasks", broker=os.environ["REDIS_URL"], backend=os.environ["REDIS_URL"])
queue.conf.broker_connection_retry_on_startup = True


@queue.task
def add(x, y):
    return x + y
''',
    "app.py": '''\
import json

from flask import Flask

from tasks import add, queue

app = Flask(__name__)


@app.get("/enqueue/<int:x>/<int:y>")
def enqueue(x, y):
    return add.delay(x, y).id


@app.get("/result/<task_id>")
def result(task_id):
    found = queue.AsyncResult(task_id)
    return json.dumps({"state": found.state,
                       "result": found.result if found.successful() else None})
''',
    "requirements.txt": "flask>=3\ngunicorn>=23\ncelery[redis]\n",
    "Procfile": "web: gunicorn app:app\nworker: celery -A tasks worker --loglevel=info "
                "--concurrency=1 --pool=solo\n",
}


@pytest.fixture(scope="module")
def platform(venv_cache: Path, berth_root: Path):
    apps = new_apps_dir(berth_root)
    data = berth_root / f"addon-apps-{uuid.uuid4().hex[:8]}"
    p = start_platform(data, venv_cache, apps, jobs=True)
    yield p
    p.stop()
    forget_apps(apps)


@pytest.fixture(scope="module")
def berth(platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory) -> Berth:
    return Berth(platform, tmp_path_factory.mktemp("cli-config"))


def write_app(dest: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(text)
    return dest


@pytest.mark.timeout(400)
def test_django_migrates_in_its_release_phase_and_serves_rows(berth: Berth, tmp_path: Path):
    src = write_app(tmp_path / "djnotes", DJANGO_FILES)
    berth("apps", "create", "djnotes")
    started = time.monotonic()
    berth("addons", "create", "postgres", "--plan", "shared", "-a", "djnotes")
    print(f"\n`berth addons create postgres --plan shared` (the module's first): "
          f"{time.monotonic() - started:.2f}s wall")
    out = berth("push", str(src), "-a", "djnotes", timeout=300).stdout
    print(out)
    assert "Running release command: python manage.py migrate" in out
    assert "Applying notes.0001_initial... OK" in out
    first = json.loads(berth.wait_for(
        lambda: (r := berth.get("djnotes", "/add?body=one")).status == 200 and r.text,
        60, "the Django app serving"))
    assert first["vendor"] == "postgresql"
    second = json.loads(berth.get("djnotes", "/add?body=two").text)
    assert second["notes"][-2:] == ["one", "two"]
    shown = berth("run", "-a", "djnotes", "--no-tty", "--",
                  "python manage.py showmigrations notes").stdout
    assert "[X] 0001_initial" in shown


@pytest.mark.timeout(400)
def test_a_celery_worker_uses_the_redis_addon_as_its_broker(berth: Berth, tmp_path: Path):
    src = write_app(tmp_path / "queued", CELERY_FILES)
    berth("apps", "create", "queued")
    # a server of its own: Celery's keys (celery, _kombu.*, celery-task-meta-*) are
    # not under the key prefix a shared plan's ACL user is given
    started = time.monotonic()
    berth("addons", "create", "redis", "--plan", "dedicated", "-a", "queued")
    print(f"\n`berth addons create redis --plan dedicated`: "
          f"{time.monotonic() - started:.2f}s wall")
    berth("push", str(src), "-a", "queued", timeout=300)
    berth("scale", "worker=1", "-a", "queued")
    berth.wait_for(lambda: any(i["proc"] == "worker" and i["state"] == "RUNNING"
                               for i in berth.json("ps", "-a", "queued")["instances"]),
                   90, "the celery worker running")
    ids = [berth.wait_for(lambda n=n: (r := berth.get("queued", f"/enqueue/{n}/{n}"))
                          .status == 200 and r.text, 60, "a task queued") for n in range(5)]
    deadline = time.monotonic() + 60
    results = {}
    while len(results) < len(ids) and time.monotonic() < deadline:
        for n, task in enumerate(ids):
            got = json.loads(berth.get("queued", f"/result/{task}").text)
            if got["state"] == "SUCCESS":
                results[n] = got["result"]
        time.sleep(0.3)
    assert results == {n: 2 * n for n in range(5)}, results
    assert "succeeded" in berth("logs", "-a", "queued", "--lines", "300").stdout
