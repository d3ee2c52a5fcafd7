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
