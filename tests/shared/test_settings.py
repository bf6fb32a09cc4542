"""Settings as the environment gives them: `~` in a directory setting is the home directory, as in a shell."""

from pathlib import Path

from shared.settings import ServiceSettings, Settings


def test_a_tilde_in_a_directory_setting_means_the_home_directory(monkeypatch):
    monkeypatch.setenv("SSB_HOME", "~/models-here")
    monkeypatch.setenv("SSB_DATA_DIR", "~/ssb-data")
    monkeypatch.setenv("SSB_ADAPTERS_DIR", "~/adapters")
    assert Settings().home == Path.home() / "models-here"
    service = ServiceSettings()
    assert (service.data_dir, service.adapters_dir) == (Path.home() / "ssb-data", Path.home() / "adapters")
    monkeypatch.setenv("SSB_DATA_DIR", "relative/data")
    assert ServiceSettings().data_dir == Path("relative/data")
