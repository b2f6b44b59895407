import pytest

from pipeline.cli import build_parser, main

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: faultline" in capsys.readouterr().out


def test_invalid_line_named(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["topics", "create", "--line", "Line 3", "--bootstrap-servers", "127.0.0.1:1"])
    assert code == 2
    error = capsys.readouterr().err
    assert "'Line 3' is invalid" in error


def test_invalid_setting_named(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAULTLINE_MAX_BATCH_FRAMES", "0")
    code = main(["query"])
    assert code == 2
    assert "FAULTLINE_MAX_BATCH_FRAMES='0'" in capsys.readouterr().err


def test_missing_source_named(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ingest.feed import folder_frames
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a folder of images"):
        list(folder_frames(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="has no .jpg"):
        list(folder_frames(tmp_path))
