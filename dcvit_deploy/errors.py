"""Error families.

``DcvitError`` and its subclasses are problems a user can fix (bad input, a missing optional
package, no GPU, an infeasible budget). The CLI prints them as one line -- the problem and the
fix -- without a traceback and exits with ``exit_code``. Anything else that escapes is a bug in
this project and keeps its traceback.
"""

from __future__ import annotations


class DcvitError(Exception):
    """A user-fixable problem: ``problem`` says what is wrong, ``fix`` how to fix it."""

    exit_code: int = 1

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem.rstrip(".")
        if self.fix:
            text += f"; fix: {self.fix}"
        return text


class UserInputError(DcvitError):
    """Bad option, file, folder or value given by the user."""


class SchemaError(UserInputError):
    """A value read from a file does not fit its record type; the problem names the field."""


class OptionError(UserInputError):
    """An option value is out of range or contradicts another option (found before any work)."""


class PathNotWritable(UserInputError):
    """An output location (run directory, Triton repository) cannot be created or written."""


class UnsupportedModelError(UserInputError):
    """The model's layout is not one DC-ViT surgery supports."""


class CheckpointMismatchError(UserInputError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""


class DataError(UserInputError):
    """The few-shot image folder is missing, empty or unreadable."""


class ProfileError(UserInputError):
    """A target profile file is missing or invalid."""


class EnvironmentProblem(DcvitError):
    """The machine lacks something a requested path needs (package, GPU, driver)."""


class BackendUnavailable(EnvironmentProblem):
    """A backend cannot run here; the message names the missing piece and the fix."""


class ExportError(DcvitError):
    """ONNX export, parsing or verification of one candidate failed."""


class BuildError(ExportError):
    """Building one candidate's artifact failed (parser or builder error); recorded per candidate
    as ``build_failed``. A subclass of :class:`ExportError` so per-candidate export handling
    still catches it."""


class TrainingDiverged(DcvitError):
    """A finetune's loss, or a score computed from its result, is not finite (NaN/Inf): the
    unit stops with the step and settings rather than scoring a broken model as perfect."""


class EngineMismatch(EnvironmentProblem):
    """A serialized engine was built by another TensorRT version or on another GPU."""


class RunDirError(UserInputError):
    """The run directory belongs to another run or is corrupt."""


class BudgetInfeasible(DcvitError):
    """No verified candidate meets the latency budget."""

    exit_code = 3


class RegressionDetected(DcvitError):
    """A benchmark comparison against a stored baseline found a regression."""

    exit_code = 4


class NeedsTraining(DcvitError):
    """A target's node chose a candidate that is not trained yet: the head trains it (with the
    other targets' picks) and sends the target again."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name} is chosen but not trained yet", "the head trains it")


class NotPublished(DcvitError):
    """A candidate was chosen but not published to Triton (the reports are written)."""

    exit_code = 5
