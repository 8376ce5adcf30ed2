"""Run ``quikft`` with its arguments, but stop (exit 3) right after the first resumable state is saved:
a recovery interrupted mid-run, for the resume tests of a multi-process launch."""

import sys

import quikft.recover as recover

real_save = recover._save_state


def save_then_stop(*args, **kwargs):
    real_save(*args, **kwargs)
    raise SystemExit(3)


recover._save_state = save_then_stop

from quikft.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
