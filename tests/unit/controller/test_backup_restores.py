"""An app's formation while an in-place restore has it at 0 is written down, so a
controller that died mid-restore scales the app back when it starts."""
from __future__ import annotations

from types import SimpleNamespace

from controller.daemon import Controller
from controller.pauses import forget_formation, interrupted_restores, remember_formation


def test_a_restarted_controller_scales_back_what_a_restore_left_at_zero(tmp_path):
    remember_formation(tmp_path, "blog", {"web": 2, "worker": 1})
    remember_formation(tmp_path, "shop", {"web": 1})
    forget_formation(tmp_path, "shop")                   # that restore finished
    assert interrupted_restores(tmp_path) == {"blog": {"web": 2, "worker": 1}}
    scaled: list[tuple[str, dict[str, int], int]] = []
    fake = SimpleNamespace(data_dir=tmp_path, settings=SimpleNamespace(max_per_process_type=20),
                           store=SimpleNamespace(scale=lambda a, f, m: scaled.append((a, f, m))))
    Controller.resume_interrupted_restores(fake)         # type: ignore[arg-type]
    assert scaled == [("blog", {"web": 2, "worker": 1}, 20)]
    assert interrupted_restores(tmp_path) == {}
    assert interrupted_restores(tmp_path / "nothing-here") == {}


def test_retention_per_volume_first_matching_pattern_else_the_default(tmp_path):
    import pytest

    from config import SettingsError
    from controller.backups import Catalog
    from controller.settings import SPEC
    s = SPEC.load(None, environ={"BERTH_CONTROLLER_BACKUP_VOLUME_POLICIES":
                                 "addon-*=48h 14d min=5,app-blog=2h"})
    s.addons_dir = str(tmp_path)
    cat = Catalog.from_settings(s)
    assert str(cat.policy_for("addon-postgres-1a2b3c")) == "48h 14d min=5"
    assert str(cat.policy_for("app-blog")) == "2h min=1"
    assert str(cat.policy_for("app-shop")) == str(cat.policy) == "24h 7d 4w 12m min=3"
    for bad in ("addon-*", "=24h", "addon-*=24x"):
        with pytest.raises(SettingsError) as err:
            SPEC.load(None, environ={"BERTH_CONTROLLER_BACKUP_VOLUME_POLICIES": bad})
        assert "backup_volume_policies" in err.value.message and err.value.hint
