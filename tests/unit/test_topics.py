import pytest

from pipeline.errors import ConfigError
from pipeline.topics import (
    format_position,
    frames_topic,
    line_of_topic,
    results_topic,
    validate_line_id,
)


@pytest.mark.parametrize("line", ["line-3", "a", "l_1", "x" * 64])
def test_line_id_valid(line: str) -> None:
    assert validate_line_id(line) == line


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("", "empty"),
        ("Line-3", "invalid"),
        ("line.3", "invalid"),
        ("line 3", "invalid"),
        ("../etc", "invalid"),
        ("x" * 65, "maximum is 64"),
    ],
)
def test_line_id_invalid(line: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_line_id(line)
    assert fragment in str(error.value)


def test_topic_names() -> None:
    assert frames_topic("line-3") == "frames.line-3"
    assert results_topic("line-3") == "results.line-3"


def test_line_of_topic() -> None:
    assert line_of_topic("frames.line-3") == "line-3"
    assert line_of_topic("results.l_2") == "l_2"
    with pytest.raises(ConfigError):
        line_of_topic("deadletter.frames")


def test_position_format() -> None:
    assert format_position("frames.line-3", 2, 1041) == "frames.line-3[2]@1041"
