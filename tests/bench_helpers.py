"""What the benchmark tests share."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def assert_refused(
    benchmark: ModuleType,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """``benchmark.main(args)`` exits with a usage error naming ``message`` and never runs."""

    def must_not_run(cfg: object) -> NoReturn:
        raise AssertionError(f"the benchmark accepted {args} and started")

    monkeypatch.setattr(benchmark, "run", must_not_run)
    with pytest.raises(SystemExit) as exc:
        benchmark.main([*args, "--output", str(tmp_path / "out.json")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
