"""``blocktrace serve`` argument parsing: export names, NAME=IMAGE, --listen forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktrace.cli.serve import build_config, parse_image_arg
from blocktrace.errors import UsageError
from blocktrace.listen import parse_listen
from blocktrace.service import DEFAULT_SOCKET


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("10809", ("127.0.0.1", 10809)),
        (":10809", ("127.0.0.1", 10809)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:10809", ("::1", 10809)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(spec: str, expected: tuple[str, int]) -> None:
    assert parse_listen(spec) == expected


@pytest.mark.parametrize("spec", ["", "host:", "host:port", "1:65536", "1:-1"])
def test_parse_listen_rejects(spec: str) -> None:
    with pytest.raises(UsageError, match="--listen"):
        parse_listen(spec)


@pytest.mark.parametrize("spec", ["[::1:10809", "::1]:10809", "[[::1]:1"])
def test_parse_listen_refuses_stray_brackets_for_every_option(spec: str) -> None:
    """One parser for NBD and QMP listeners: a stray bracket is an error for both (QMP's own
    copy used to strip it and bind whatever was left)."""
    for option in ("--listen", "--qmp-listen"):
        with pytest.raises(UsageError, match=f"{option} .*brackets"):
            parse_listen(spec, option)


def test_image_args(tmp_path: Path) -> None:
    assert parse_image_arg("dir/disk.img") == ("disk", "dir/disk.img")
    assert parse_image_arg("d=x/y.raw") == ("d", "x/y.raw")
    odd = tmp_path / "a=b.img"
    odd.write_bytes(b"")
    assert parse_image_arg(str(odd)) == ("a=b", str(odd))  # an existing path wins
    for bad in ("=x.img", "name="):
        with pytest.raises(UsageError):
            parse_image_arg(bad)


def test_build_config_defaults_and_duplicates() -> None:
    cfg = build_config(("a.img", "b=c.img"), None, (), False)
    assert cfg.images == [("a", "a.img"), ("b", "c.img")]
    assert cfg.socket == DEFAULT_SOCKET and cfg.listen == [] and cfg.socket_mode == 0o600
    tcp_only = build_config(("a.img",), None, (":10809",), True)
    assert tcp_only.socket is None and tcp_only.listen == [("127.0.0.1", 10809)]
    assert tcp_only.read_only
    with pytest.raises(UsageError, match="duplicate"):
        build_config(("x/a.img", "y/a.img"), None, (), False)
