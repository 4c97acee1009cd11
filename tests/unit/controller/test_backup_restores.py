"""An app's formation while an in-place restore has it at 0 is written down, so a
controller that died mid-restore scales the app back when it starts."""
from __future__ import annotations

from types import SimpleNamespace

from controller.backups import forget_formation, interrupted_restores, remember_formation
from controller.daemon import Controller


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
