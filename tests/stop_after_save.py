"""Run ``quikft`` with its arguments, but stop (exit 3) right after the first resumable state is saved:
a recovery interrupted mid-run, for the resume tests of a multi-process launch."""

import sys

from quikft.recovery.session import TrainingSession

real_save = TrainingSession.save


def save_then_stop(session, step):
    real_save(session, step)
    raise SystemExit(3)


TrainingSession.save = save_then_stop

from quikft.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
