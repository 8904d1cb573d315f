"""The publish unit: the chosen artifact into a Triton model repository, as the served version
of one stable model.

The model name is ``--triton-model-name`` or derived from the base model (never from the
chosen candidate), so a new pick becomes version N+1 of the same model; the config carries the
runtime settings that were measured. With ``--triton-pareto`` every Pareto-optimal candidate is
also published, each as ``<model>_<candidate>``. Every version records the run's id as its
owner: a run never publishes over a model that serves another run's version (unless
``--triton-replace``), and a run-local repository (``RUN/triton``) loses only this run's
versions of earlier picks under other names, or of a run that now picks nothing (a user's
``--triton-repo`` is never cleaned). The files of the published versions (immutable) are the
unit's outputs; ``config.pbtxt`` is not, since another run may serve its own version through it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import NotPublished
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.unit import UnitOutput
from dcvit_deploy.pipeline.view import RunView
from dcvit_deploy.store.records import to_dict

if TYPE_CHECKING:
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.pipeline.units.compressing import Family
    from dcvit_deploy.store.records import CandidateOutcome, Selection, TargetProfile


def repository(ctx: JobContext) -> Path:
    return Path(ctx.dopts.triton_repo) if ctx.dopts.triton_repo else ctx.run.root / "triton"


def model_name(ctx: JobContext) -> str:
    from dcvit_deploy.triton import default_model_name

    return ctx.dopts.triton_model_name or default_model_name(ctx.copts.model)


def unpublish_stale(ctx: JobContext, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove the versions this run published into its own repository (models not in
    ``keep``); other runs' versions stay."""
    from dcvit_deploy.triton import unpublish

    repo = repository(ctx).resolve()
    if not repo.is_relative_to(ctx.run.root.resolve()):  # a user's repository is never cleaned
        return []
    return unpublish(repo, ctx.run.run_id, run_root=ctx.run.root, keep=keep)


class PublishUnit:
    """Publish the selection's choice (and, on request, the Pareto front)."""

    optional = True  # a pick that is not published is reported after the reports are written
    stateful = True  # it changes a repository others change too: no earlier record is reused

    def __init__(
        self,
        profile: TargetProfile,
        selection: Selection,
        outcomes: list[CandidateOutcome],
        family: Family,
    ) -> None:
        self.profile = profile
        self.selection = selection
        self.outcomes = {o.candidate: o for o in outcomes}
        self.family = family
        self.id = str(UnitId("publish", profile=profile.name))

    def _names(self, ctx: JobContext) -> list[tuple[str, str]]:
        """(model name, candidate) pairs to publish."""
        from dcvit_deploy.selection.decide import pareto_front

        base = model_name(ctx)
        assert self.selection.chosen is not None
        pairs = [(base, self.selection.chosen)]
        if ctx.dopts.triton_pareto:
            b = self.selection.budget
            front = pareto_front(list(self.outcomes.values()), b.batch_size, b.statistic)
            pairs += [
                (f"{base}_{o.candidate.replace('-', '_').replace('.', '_')}", o.candidate)
                for o in front
                if o.candidate != self.selection.chosen
            ]
        return pairs

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        repo = ctx.dopts.triton_repo
        return {
            "repository": repo and str(Path(repo).resolve()),  # None: the run's own, wherever
            "models": [
                [name, cand, self.outcomes[cand].artifact.sha256]  # type: ignore[union-attr]
                for name, cand in self._names(ctx)
            ],
            "profile": to_dict(self.profile),
            "replace": ctx.dopts.triton_replace,
        }

    def execute(self, ctx: JobContext) -> UnitOutput:
        from dcvit_deploy.triton import publish

        repo = repository(ctx)
        published = []
        files: list[Path] = []
        pairs = self._names(ctx)
        meta = {"run": str(ctx.run.root), "identity": RunView(ctx.run).identity}
        for name, cand in pairs:
            outcome = self.outcomes[cand]
            assert outcome.artifact is not None
            try:
                pub = publish(
                    repo,
                    name,
                    outcome.artifact,
                    replace(self.profile, precision=outcome.artifact.precision),  # as measured
                    latency=outcome.latency,
                    source_candidate=cand,
                    run_meta=meta,
                    owner=ctx.run.run_id,
                    replace=ctx.dopts.triton_replace,
                )
            except OSError as exc:  # a full disk, a read-only repository
                raise NotPublished(
                    f"writing {exc.filename or repo} failed: {exc.strerror or exc}",
                    "free space or fix permissions there, then rerun the same command",
                ) from exc
            published.append(
                {
                    "model": pub.model_name,
                    "candidate": cand,
                    "version": pub.version,
                    "created": pub.created,
                    "config": str(pub.config_path),
                    "notes": list(pub.notes),
                }
            )
            files += [p for p in (pub.model_dir / str(pub.version)).iterdir() if p.is_file()]
        removed = unpublish_stale(ctx, keep=tuple(n for n, _ in pairs))
        for n in removed:
            ctx.note(f"removed this run's stale versions of {n} from its Triton repository")
        return UnitOutput(result={"repository": str(repo), "models": published}, files=tuple(files))
