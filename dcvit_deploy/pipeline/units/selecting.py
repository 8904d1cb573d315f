"""The select unit: resolve the budget (``--latency-ms``, or ``--speedup`` relative to the
original measured in the same run), re-measure in more rounds the candidates within noise of
it, decide and confirm the choice in a fresh process (:mod:`dcvit_deploy.selection.decide`).

Measure first (``--train pick``) the outcomes are the structures'; ``pick`` trains, makes and
verifies each choice before its confirmation, which then measures the trained artifact (a pick
that cannot be trained or misses the fidelity floor is set aside and the search goes on);
:func:`~dcvit_deploy.selection.decide.must_compare` bounds what is trained to compare fidelities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.pipeline.unit import UnitOutput
from dcvit_deploy.store.atomic import fingerprint
from dcvit_deploy.store.records import (
    CandidateOutcome,
    LatencyBudget,
    LatencyStats,
    Selection,
    from_dict,
    to_dict,
)

if TYPE_CHECKING:
    from dcvit_deploy.config.options import DeployOptions
    from dcvit_deploy.pipeline.context import JobContext
    from dcvit_deploy.store.records import Statistic, TargetProfile

ORIGINAL = "original"
REMEASURE_PASSES = 2


def budget_batch(profile: TargetProfile, dopts: DeployOptions) -> int:
    batch = dopts.batch_size or profile.budget_batch_size
    if batch not in profile.batch_sizes:
        raise UserInputError(
            f"--batch-size {batch} is not one of profile {profile.name}'s batch sizes "
            f"{list(profile.batch_sizes)}",
            "pick one of them or edit the profile's batch_sizes",
        )
    return batch


def resolve_budget(
    profile: TargetProfile, dopts: DeployOptions, outcomes: Sequence[CandidateOutcome]
) -> LatencyBudget | None:
    """The budget: ``--latency-ms``, or ``--speedup S`` = the original's figure measured in this
    run (same batch size and statistic) / S, with the original's spread as its uncertainty."""
    from dcvit_deploy.selection.budget import relative_budget

    if not dopts.has_budget:
        return None
    batch = budget_batch(profile, dopts)
    statistic = cast("Statistic", dopts.statistic or profile.statistic)
    try:
        if dopts.speedup is None:
            assert dopts.latency_ms is not None
            return LatencyBudget(dopts.latency_ms, statistic, batch, dopts.margin)
        orig = next((o for o in outcomes if o.candidate == ORIGINAL), None)
        stats = orig.latency_at(batch) if orig is not None and orig.selectable else None
        if stats is None:
            raise no_original(orig)
        return relative_budget(dopts.speedup, stats, statistic=statistic, batch_size=batch,
                               margin=dopts.margin, reference_name=ORIGINAL)  # fmt: skip
    except ValueError as exc:
        fix = "see --latency-ms, --speedup"
        raise UserInputError(f"invalid latency budget: {exc}", fix) from exc


def no_original(orig: CandidateOutcome | None) -> UserInputError:
    """``--speedup`` without a measured original: the error names why it was not measured."""
    why = f"{orig.status}: {orig.error or 'not measured'}" if orig else "not in the family"
    return UserInputError(
        f"--speedup needs the original model measured in the same run, and it was not ({why})",
        "fix that failure (see the report) or use --latency-ms"
        if orig
        else "keep the original in the family (drop --no-original) or use --latency-ms",
    )


def budget_basis(budget: LatencyBudget | None) -> dict[str, Any]:
    """How the budget was derived, for the report."""
    if budget is None:
        return {}
    basis = (
        {"speedup": budget.speedup, "original_ms": budget.reference_ms} if budget.relative else {}
    )
    return {"kind": "relative" if budget.relative else "absolute", **basis, "ms": budget.ms}


class SelectUnit:
    """Decide under the budget for ``profile``; re-measure what is within noise; confirm."""

    optional = False

    def __init__(
        self,
        profile: TargetProfile,
        outcomes: list[CandidateOutcome],
        pick: Callable[[str], CandidateOutcome | str] | None = None,
        identities: dict[str, Any] | None = None,
    ) -> None:
        self.profile = profile
        self.outcomes = outcomes
        self.pick = pick  # measure-first: make a choice deployable (its outcome) or say why not
        self.identities = identities  # what a pick is trained from: changed, train again
        self.picked: dict[str, CandidateOutcome | str] = {}
        self.id = str(UnitId("select", profile=profile.name))

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        d = ctx.dopts
        art = [o.artifact and o.artifact.sha256 for o in self.outcomes]  # not where it lies
        outcomes = [{**to_dict(o), "artifact": a} for o, a in zip(self.outcomes, art, strict=True)]
        return {
            "outcomes": fingerprint(outcomes),
            "budget": [d.latency_ms, d.speedup, d.statistic, d.margin, d.batch_size],
            "prefer": d.prefer,
            "search": d.search,
            "confirm": d.confirm,
            "trains": self.identities,
        }

    def execute(self, ctx: JobContext) -> UnitOutput:
        budget = resolve_budget(self.profile, ctx.dopts, self.outcomes)
        if budget is None:
            return UnitOutput(result={"selection": None, "budget": {}})
        items, remeasured, budget = self._remeasure_within_noise(ctx, budget)
        selection, trained = self._decide(ctx, items, budget)
        files = []
        if trained is not None and selection.chosen is not None:
            got = self.picked[selection.chosen]
            assert isinstance(got, CandidateOutcome) and got.artifact is not None
            # gone or changed: decide (and train) again
            files = [
                Path(got.artifact.path),
                *ctx.run.family_dir.glob(f"{got.candidate}.trained.*"),
            ]
        return UnitOutput(
            result={
                "decided_on": self.inputs(ctx)["outcomes"],  # what `report` may render it with
                "selection": to_dict(selection),
                "budget": budget_basis(budget),
                "remeasured": {n: [to_dict(s) for s in st] for n, st in remeasured.items()},
                "trained": {selection.chosen: [to_dict(trained)]} if trained else {},
            },
            files=tuple(files),
        )

    def _remeasure_within_noise(
        self, ctx: JobContext, budget: LatencyBudget
    ) -> tuple[list[CandidateOutcome], dict[str, list[LatencyStats]], LatencyBudget]:
        """More interleaved rounds, up to :data:`REMEASURE_PASSES` times, for the candidates
        within noise of the budget that could change the choice; a relative budget's reference
        is re-measured alongside and the budget follows it."""
        from dcvit_deploy.backends import get_backend
        from dcvit_deploy.latency.rounds import measure_rounds
        from dcvit_deploy.selection.decide import needs_remeasure

        items = list(self.outcomes)
        if ctx.dopts.search == "bisect":
            return items, {}, budget
        remeasured: dict[str, list[LatencyStats]] = {}
        settings = self.profile.measure
        for _ in range(REMEASURE_PASSES):
            names = needs_remeasure(items, budget, prefer=ctx.dopts.prefer)
            if not names:
                break
            if budget.relative and budget.reference and budget.reference not in names:
                names = (*names, budget.reference)
            artifacts = {o.candidate: o.artifact for o in items if o.candidate in names}
            result = measure_rounds(
                get_backend(self.profile.backend),
                artifacts,  # type: ignore[arg-type]
                self.profile,
                [budget.batch_size],
                seed=ctx.copts.seed + 1,
                min_rounds=settings.max_rounds,
                max_rounds=settings.max_rounds,
            )
            note = f"re-measured in {result.rounds} rounds (within noise of the budget)"
            for name in artifacts:
                fresh = result.at(name, budget.batch_size)
                remeasured[name] = [dataclasses.replace(fresh, actions=(*fresh.actions, note))]
            items = merged(items, remeasured)
            if budget.relative:  # the original was re-measured: its figure moves the budget
                budget = resolve_budget(self.profile, ctx.dopts, items) or budget
        return items, remeasured, budget

    def _decide(
        self, ctx: JobContext, items: list[CandidateOutcome], budget: LatencyBudget
    ) -> tuple[Selection, LatencyStats | None]:
        """The confirmed selection and, measure-first, the chosen trained artifact's figure."""
        from dcvit_deploy.selection.decide import must_compare, select_confirmed

        prefer = ctx.dopts.prefer
        confirm = None
        if ctx.dopts.confirm:
            from dcvit_deploy.latency.confirm import FreshProcessConfirm

            artifacts = {o.candidate: o.artifact for o in items if o.artifact is not None}
            confirm = FreshProcessConfirm(
                artifacts, self.profile, budget.batch_size, anchor=budget.reference or None
            )
        search, pick = ctx.dopts.search, self.pick
        if pick is None:
            return select_confirmed(items, budget, confirm, prefer=prefer, search=search), None

        def ready(name: str) -> str | None:
            if name not in self.picked:
                self.picked[name] = pick(name)
            got = self.picked[name]
            if isinstance(got, str):
                return got
            if confirm is not None and got.artifact is not None:
                confirm.use(name, got.artifact)
            return None

        items = [dataclasses.replace(o, fidelity=None) for o in items]  # only trained ones compare
        for name in must_compare(items, budget, prefer):
            ready(name)
        items = [
            dataclasses.replace(o, fidelity=got.fidelity)
            if isinstance(got := self.picked.get(o.candidate), CandidateOutcome)
            else o
            for o in items
        ]
        sel = select_confirmed(items, budget, confirm, prefer=prefer, search=search, ready=ready)
        if sel.chosen is None:
            return sel, None
        return self._trained_figure(ctx, sel, budget, confirm)

    def _trained_figure(
        self, ctx: JobContext, sel: Selection, budget: LatencyBudget, confirm: Any
    ) -> tuple[Selection, LatencyStats]:
        """The chosen trained artifact's figure (its confirmation, or without one a measurement
        here), and a note comparing it with the structure's figure the decision was made on."""
        name = sel.chosen
        assert name is not None
        if confirm is not None:
            stats = confirm.latest[name]
        else:
            from dcvit_deploy.backends import get_backend
            from dcvit_deploy.latency.rounds import measure_rounds

            got = self.picked[name]
            assert isinstance(got, CandidateOutcome) and got.artifact is not None
            backend, batch = get_backend(self.profile.backend), budget.batch_size
            result = measure_rounds(backend, {name: got.artifact}, self.profile, [batch],
                                    seed=ctx.copts.seed + 2)  # fmt: skip
            stats = result.at(name, batch)
        figure, spread, _ = sel.figures[name]
        value, tspread = stats.stat(budget.statistic), stats.spread(budget.statistic)
        apart = abs(value - figure) > spread + tspread
        note = (
            f"{name} measured as the trained artifact: {budget.statistic} {value:.4g} ms "
            f"+- {tspread:.2g}, its structure {figure:.4g} ms +- {spread:.2g}: "
            + ("they differ beyond both spreads" if apart else "the same within noise")
        )
        return dataclasses.replace(sel, notes=(*sel.notes, note)), stats


def merged(
    outcomes: Sequence[CandidateOutcome], fresh: Mapping[str, Sequence[LatencyStats]]
) -> list[CandidateOutcome]:
    """``outcomes`` with the figures re-measured in ``fresh`` in place of theirs."""

    def one(o: CandidateOutcome) -> CandidateOutcome:
        new = {s.batch_size: s for s in fresh.get(o.candidate, ())}
        return dataclasses.replace(o, latency=tuple(new.get(s.batch_size, s) for s in o.latency))

    return [one(o) for o in outcomes]


def selection_of(result: dict[str, Any]) -> Selection | None:
    """The recorded selection; a reason an earlier version recorded as text stays that text."""
    sel = result.get("selection")
    if not sel:
        return None
    old = {
        n: {"kind": "recorded", "detail": r}
        for n, r in sel["reasons"].items()
        if isinstance(r, str)
    }
    return from_dict(Selection, {**sel, "reasons": {**sel["reasons"], **old}})


def remeasured_of(result: dict[str, Any], key: str = "remeasured") -> dict[str, list[LatencyStats]]:
    """The figures a select unit re-measured (``trained``: of its chosen trained artifact)."""
    return {n: [from_dict(LatencyStats, s) for s in st] for n, st in result.get(key, {}).items()}
