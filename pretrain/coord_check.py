"""`python -m pretrain.coord_check` runs the coordinate check, which lives in the study package
(pretrain/study/coord_check.py); the same flags."""

from absl import app

from pretrain.study import coord_check

if __name__ == '__main__':
    coord_check.define_flags()
    app.run(coord_check.main)
