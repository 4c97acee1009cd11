import pytest

from config import Invalid, Setting, SettingsError, Spec

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


def test_unknown_override_has_a_hint():
    with pytest.raises(SettingsError) as err:
        SPEC.load(environ={}, prot=81)
    assert "prot" in err.value.message and "port" in err.value.hint


def test_bad_type_names_source_value_and_what_to_write():
    with pytest.raises(SettingsError, match=r"demo.port from \$BERTH_DEMO_PORT must be an "
                                            r"integer, got 'eighty'") as err:
        SPEC.load(environ={"BERTH_DEMO_PORT": "eighty"})
    assert err.value.hint.startswith("write an integer, e.g. 80.")


def test_bad_yaml_is_reported(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("demo: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        SPEC.load(f, environ={})


def test_whole_floats_are_integers_and_integers_floats():
    spec = Spec("demo", [Setting("n", int, 1, "n"), Setting("t", float, 1.0, "t")])
    assert vars(spec.load(environ={}, n=5.0, t=2)) == {"n": 5, "t": 2.0}
    with pytest.raises(SettingsError, match="must be an integer"):
        spec.load(environ={}, n=5.5)
    with pytest.raises(SettingsError, match="must be a number"):
        spec.load(environ={}, t=True)


CHOSEN = Spec("demo", [
    Setting("mode", str, "auto", "auto, on or off.", choices=("auto", "on", "off")),
    Setting("port", int, 80, "Port.", min=1, max=65535),
    Setting("workers", int, 1, "Workers.", min=1),
    Setting("url", str, "", "A URL.", check=lambda v: None if not v or v.startswith("http://")
            else "is not an http:// URL"),
    Setting("name", str, "n", "Name.", check=lambda v: (_ for _ in ()).throw(
        Invalid("is reserved", "pick another name")) if v == "root" else None),
    Setting("word", str, "w", "Word.", check=lambda v: int(v)),    # ValueError's text
])


def test_choices_are_enforced_naming_source_value_and_choices(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("demo:\n  mode: maybe\n")
    with pytest.raises(SettingsError) as err:
        CHOSEN.load(f, environ={})
    assert err.value.message == (f"setting demo.mode from {f} must be one of auto, on, off, "
                                 "got 'maybe'")
    assert err.value.hint.startswith("choose one of auto, on, off.")


def test_choices_match_case_insensitively_and_store_the_declared_spelling(tmp_path):
    assert CHOSEN.load(environ={"BERTH_DEMO_MODE": " ON "}).mode == "on"
    f = tmp_path / "b.yaml"
    f.write_text("demo:\n  mode: off\n")      # YAML 1.1 reads a bare off as false
    assert CHOSEN.load(f, environ={}).mode == "off"


def test_bounds_are_enforced():
    with pytest.raises(SettingsError) as err:
        CHOSEN.load(environ={"BERTH_DEMO_PORT": "70000"})
    assert err.value.message == ("setting demo.port from $BERTH_DEMO_PORT must be from 1 "
                                 "to 65535, got '70000'")
    assert "from 1 to 65535" in err.value.hint
    with pytest.raises(SettingsError, match=r"demo.workers from the command line must be at "
                                            r"least 1, got 0"):
        CHOSEN.load(environ={}, workers=0)
    assert CHOSEN.load(environ={}, port=65535, workers=1).port == 65535


def test_checks_returning_raising_invalid_or_value_error():
    with pytest.raises(SettingsError) as err:
        CHOSEN.load(environ={"BERTH_DEMO_URL": "ftp://x"})
    assert err.value.message == ("setting demo.url from $BERTH_DEMO_URL is not an http:// "
                                 "URL, got 'ftp://x'")
    assert err.value.hint == "A URL."
    with pytest.raises(SettingsError) as err:
        CHOSEN.load(environ={}, name="root")
    assert "demo.name" in err.value.message and "is reserved" in err.value.message
    assert err.value.hint == "pick another name"
    with pytest.raises(SettingsError, match="demo.word from the command line invalid literal"):
        CHOSEN.load(environ={}, word="abc")
    assert CHOSEN.load(environ={}, url="http://h", name="me", word="12").url == "http://h"


def test_spec_checks_see_all_values():
    def ordered(s):
        if s.low > s.high:
            raise Invalid(f"low ({s.low}) is above high ({s.high})", "swap them")
    spec = Spec("demo", [Setting("low", int, 1, "Low."), Setting("high", int, 2, "High.")],
                checks=[ordered])
    with pytest.raises(SettingsError) as err:
        spec.load(environ={"BERTH_DEMO_LOW": "3"})
    assert err.value.message == "demo settings: low (3) is above high (2)"
    assert err.value.hint == "swap them"


def test_list_defaults_are_not_shared_between_loads():
    spec = Spec("demo", [Setting("items", list, [], "Items.")])
    spec.load(environ={}).items.append("x")
    assert spec.load(environ={}).items == []


def test_describe_lists_allowed_values():
    rows = {r["name"]: r for r in CHOSEN.describe()}
    assert rows["mode"]["allowed"] == "auto, on, off"
    assert rows["port"]["allowed"] == "1..65535"
    assert rows["workers"]["allowed"] == ">= 1"
    assert rows["port"]["env"] == "BERTH_DEMO_PORT" and rows["port"]["type"] == "int"
