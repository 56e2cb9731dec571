"""The plugin's fix for nerfstudio's slow start keeps nerfstudio's behaviour: placeholders built while
the method table is assembled stay silent, and one a user asks for still prints its install notes."""

from __future__ import annotations

import pytest


def test_external_method_placeholders_behave_as_before(capsys, monkeypatch):
    import inspect

    import nerfstudio_plugin  # noqa: F401  (installs the fix, as ns-train's plugin discovery does)
    from nerfstudio.configs.external_methods import ExternalMethod, ExternalMethodDummyTrainerConfig

    method = ExternalMethod("Install notes for a test method.", configurations=[("test-method", "a test")])

    def get_external_methods():  # the name nerfstudio's table builder has
        return ExternalMethodDummyTrainerConfig(method_name="test-method", method=method)

    with monkeypatch.context() as patched:  # the 0.35-second stack walk is not taken any more
        patched.setattr(inspect, "stack", lambda *args, **kwargs: pytest.fail("inspect.stack() called"))
        assert get_external_methods().method_name == "test-method"
    assert "Install notes" not in capsys.readouterr().out

    with pytest.raises(SystemExit) as exited:  # chosen on the command line: notes, then exit
        ExternalMethodDummyTrainerConfig(method_name="test-method", method=method)
    assert exited.value.code == 0 and "Install notes" in capsys.readouterr().out
