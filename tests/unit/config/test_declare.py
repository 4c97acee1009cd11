import pytest

from config import Setting, SettingsError, Spec

SPEC = Spec("demo", [Setting("port", int, 80, "Port to listen on."),
                     Setting("debug", bool, False, "Debug mode."),
                     Setting("name", str, "x", "A name.")])


def test_defaults_file_env_overrides_in_that_order(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("demo:\n  port: 81\n  name: fromfile\n")
    s = SPEC.load(f, environ={"BERTH_DEMO_PORT": "82", "BERTH_DEMO_DEBUG": "yes"}, name="cli")
    assert (s.port, s.debug, s.name) == (82, True, "cli")


def test_unknown_key_names_setting_and_file(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("demo:\n  prot: 81\n")
    with pytest.raises(SettingsError) as err:
        SPEC.load(f, environ={})
    assert "demo.prot" in err.value.message and str(f) in err.value.message
    assert "port" in err.value.hint


def test_bad_type_names_source():
    with pytest.raises(SettingsError, match=r"demo.port from \$BERTH_DEMO_PORT must be a int"):
        SPEC.load(environ={"BERTH_DEMO_PORT": "eighty"})


def test_bad_yaml_is_reported(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("demo: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        SPEC.load(f, environ={})
