"""What the plugin does to start nerfstudio's commands sooner keeps nerfstudio's behaviour: placeholders
built while the method table is assembled stay silent, one a user asks for still prints its install
notes, and Splatfacto's PSNR without torchmetrics is torchmetrics' PSNR."""

from __future__ import annotations

import pytest
import torch


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


def test_splatfacto_psnr_is_torchmetrics_psnr():
    from torchmetrics.image import PeakSignalNoiseRatio

    from nerfstudio_plugin.model import psnr_over_all_values

    generator = torch.Generator().manual_seed(0)
    for shape in ((24, 32, 3), (1, 3, 24, 32)):  # Splatfacto's training and evaluation calls
        target = torch.rand(shape, generator=generator)
        prediction = (target + 0.05 * torch.randn(shape, generator=generator)).clamp(0, 1)
        expected = PeakSignalNoiseRatio(data_range=1.0)(prediction, target)
        assert torch.allclose(psnr_over_all_values(prediction, target), expected, atol=1e-4)
