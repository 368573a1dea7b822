"""Server settings: defaults defined once, a config file, CVDEPLOY_SERVE_* variables and flags, in that order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cvdeploy.errors import InputError
from cvdeploy.serve.settings import ServeSettings


def test_defaults_file_environment_and_overrides_in_that_order(tmp_path: Path) -> None:
    assert ServeSettings.load(env={}).max_batch == ServeSettings().max_batch == 8
    (tmp_path / "s.toml").write_text("[serve]\nmax_batch = 4\nmax_queue = 32\nallowed_formats = ['jpeg']\n")
    (tmp_path / "s.yaml").write_text("max_batch: 3\nbody_timeout_s: 5\n")
    (tmp_path / "s.json").write_text('{"max_batch": 2, "threads": null}')
    assert ServeSettings.load(tmp_path / "s.toml", env={}).allowed_formats == ("jpeg",)
    assert ServeSettings.load(tmp_path / "s.yaml", env={}).body_timeout_s == 5.0
    s = ServeSettings.load(tmp_path / "s.toml", env={"CVDEPLOY_SERVE_MAX_BATCH": "6", "CVDEPLOY_SERVE_THREADS": "none", "OTHER": "x"})
    assert (s.max_batch, s.max_queue, s.threads) == (6, 32, None)  # the variable over the file, the file over the default
    s = ServeSettings.load(tmp_path / "s.json", env={"CVDEPLOY_SERVE_MAX_BATCH": "6"}, max_batch=1, max_queue=None)
    assert (s.max_batch, s.max_queue) == (1, 256)  # a given flag over everything; a flag not given (None) changes nothing


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"env": {"CVDEPLOY_SERVE_MAX_BACH": "4"}}, "CVDEPLOY_SERVE_MAX_BACH: no such server setting"),
    ({"env": {"CVDEPLOY_SERVE_AUTH": "x"}}, "no such server setting"),  # runtime objects are not settings
    ({"env": {}, "max_batch": 0}, "server setting max_batch: Input should be greater than or equal to 1"),
    ({"env": {}, "audit_sample": 2}, "server setting audit_sample"),
    ({"env": {"CVDEPLOY_SERVE_REQUEST_TIMEOUT_S": "soon"}}, "server setting request_timeout_s"),
])
def test_bad_settings_are_refused_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ServeSettings.load(**kwargs)


def test_bad_config_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "u.json").write_text('{"max_batch": 2, "turbo": true}')
    (tmp_path / "b.toml").write_text("max_batch = [")
    (tmp_path / "l.json").write_text("[1, 2]")
    for name, message in (("u.json", "unknown setting"), ("b.toml", "cannot be read"), ("l.json", "must be a mapping"),
                          ("none.json", "not found")):
        with pytest.raises(InputError, match=message):
            ServeSettings.load(tmp_path / name, env={})


def test_the_cli_reads_the_config_and_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text('{"max_batch": "many"}')
    p = subprocess.run([sys.executable, "-m", "cvdeploy", "serve", str(tmp_path), "--config", str(tmp_path / "s.json")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == (
        "error: server setting max_batch: Input should be a valid integer, unable to parse string as an integer (got 'many')")
