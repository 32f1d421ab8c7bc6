"""One vocabulary for the tools' commands: --encoder(s), --encoder-weights, --out; old names still parse."""

from __future__ import annotations

import argparse

import pytest

import repa.cache
import repa.fd
import repa.probe


def _parser(add) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser


def test_cache_takes_encoder_weights_and_the_old_weights_flag() -> None:
    p = _parser(repa.cache.add_arguments)
    new = p.parse_args(["--encoders", "a,b", "--encoder-weights", "a=/x.pth", "--out", "o"])
    old = p.parse_args(["--encoder", "a,b", "--weights", "a=/x.pth", "--out", "o"])
    both = p.parse_args(["--encoders", "a,b", "--encoder-weights", "a=/x.pth", "--weights", "b=/y.pth"])
    assert new.encoders == old.encoders == "a,b"
    assert new.weights == old.weights == ["a=/x.pth"]
    assert both.weights == ["a=/x.pth", "b=/y.pth"]
    assert p.parse_args([]).weights == []  # the alias adds no default of its own
    help_text = p.format_help()
    assert "--encoder-weights" in help_text and "--weights" not in help_text.replace("--encoder-weights", "")


@pytest.mark.parametrize("module", [repa.fd, repa.probe])
def test_fd_and_probe_take_encoder_weights_and_the_old_weights_flag(module) -> None:
    p = _parser(module.add_arguments)
    base = ["--samples", "s", "--ref", "r"] if module is repa.fd else ["--ckpt", "c", "--data", "d"]
    new = p.parse_args(base + ["--encoder", "dinov2-vit-b", "--encoder-weights", "/w.pth", "--out", "o"])
    old = p.parse_args(base + ["--encoder", "dinov2-vit-b", "--weights", "/w.pth", "--out", "o"])
    assert new.weights == old.weights == "/w.pth" and new.out == old.out == "o"
    assert p.parse_args(base + ["--encoder", "e"]).weights is None
    assert "--encoder-weights" in p.format_help()
