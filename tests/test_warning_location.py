"""Tests for fastflow/warning_location.py: warnings point at the user's line, from any kind of ``__main__``."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from fastflow.warning_location import warn_at_caller

_SCRIPT = "from fastflow.warning_location import warn_at_caller\nwarn_at_caller('look here', UserWarning)\n"


def test_the_warning_names_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_at_caller("look here", UserWarning)  # this line
    assert len(caught) == 1 and caught[0].filename == __file__ and str(caught[0].message) == "look here"


@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_a_warning_from_a_main_without_a_source_file_is_shown_not_raised(how):
    """From `python -c`, `python -` or a REPL, the warning was an ImportError ('__main__' is not a built-in module:
    the source lookup asked __main__'s loader)."""
    args, stdin = ([sys.executable, "-c", _SCRIPT], None) if how == "-c" else ([sys.executable, "-"], _SCRIPT)
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "UserWarning: look here" in done.stderr


def test_a_warning_raised_under_the_toy_example_points_into_the_example(tmp_path):
    """fastflow/examples is user code shipped in the package: a warning from the layers under it pointed at
    `<frozen runpy>` (every frame inside fastflow was skipped)."""
    from fastflow.examples import toy
    from fastflow.models import TabularFlow

    model = TabularFlow(2, transforms=1, hidden=4)
    data = toy.toy_dataset("moons", 1, seed=0)  # one point: ActNorm warns on its single value per feature
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        toy.train_flow(model, data, steps=1, batch=1, lr=1e-3, seed=0)
    assert caught and {w.filename for w in caught} == {toy.__file__}, [(w.filename, str(w.message)) for w in caught]
