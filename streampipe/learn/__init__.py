"""Online learning: model specs, per-device learners and their scores.

``DEFAULT_MODEL_SPEC`` lives here, apart from :mod:`streampipe.learn.spec`, so that
commands that never build a model (``replay``, ``sensors``) need not import River.
"""

DEFAULT_MODEL_SPEC = "preprocessing.StandardScaler | linear_model.LinearRegression"
