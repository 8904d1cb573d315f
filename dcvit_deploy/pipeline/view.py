"""The one reader of a run's state: what the manifest says was compressed, trained, exported,
built, measured, chosen and published, and the inputs the run recorded, as typed answers.

Every command reads the manifest through a :class:`RunView`; the runner alone writes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.pipeline.ids import UnitId
from dcvit_deploy.store.records import Artifact, Fidelity, LatencyStats, Verification, from_dict

if TYPE_CHECKING:
    from dcvit_deploy.config.options import CompressOptions
    from dcvit_deploy.store.records import TargetProfile
    from dcvit_deploy.store.rundir import RunDir


@dataclasses.dataclass(frozen=True)
class RunView:
    run: RunDir

    # ------------------------------------------------------------------ units

    def record(self, uid: UnitId) -> dict[str, Any] | None:
        """The unit's record as the manifest holds it (``None``: it never ran)."""
        return self.run.unit(str(uid))

    def result(self, uid: UnitId) -> dict[str, Any] | None:
        """The unit's result when its record is OK, else ``None``."""
        rec = self.record(uid) or {}
        return dict(rec.get("result") or {}) if rec.get("status") == "ok" else None

    def records(self) -> dict[UnitId, dict[str, Any]]:
        """Every unit's record, by id (in id order)."""
        found = {UnitId.parse(k): v for k, v in sorted(self.run.units().items())}
        return {k: v for k, v in found.items() if k is not None}

    def quantize_methods(self, profile: str) -> dict[str, str]:
        """The quantization method measured on ``profile`` (``auto``), per precision."""
        return {
            uid.precision: str(rec["result"]["method"])
            for uid, rec in self.records().items()
            if uid.kind == "quantize" and uid.profile == profile and rec.get("status") == "ok"
            and (rec.get("result") or {}).get("method_timing_ms")
        }  # fmt: skip

    def graph(self, uid: UnitId) -> tuple[Path | None, Verification | None]:
        """The ONNX graph and its verification recorded by an export or quantize unit."""
        res = self.result(uid)
        if res is None:
            return None, None
        return self.run.resolve(res["path"]), from_dict(Verification, res["verification"])

    def built(self, profile: str, name: str) -> tuple[Artifact | None, Verification | None, str]:
        """Artifact ``name`` on ``profile``, its verification and the failure reason recorded by
        its build unit."""
        rec = self.record(UnitId("build", profile=profile, name=name))
        if not rec:
            return None, None, ""
        if rec.get("status") != "ok":
            return None, None, str(rec.get("reason", rec.get("status")))
        result = rec["result"]
        artifact = from_dict(Artifact, result["artifact"])
        return (
            dataclasses.replace(artifact, path=str(self.run.resolve(artifact.path))),
            from_dict(Verification, result["verification"]),
            "",
        )

    def closeness(self, profile: str, name: str) -> Fidelity | None:
        """The fidelity the build unit measured for artifact ``name`` (``None``: not measured)."""
        close = (self.result(UnitId("build", profile=profile, name=name)) or {}).get("closeness")
        return from_dict(Fidelity, close) if close else None

    def measured(
        self, profile: str
    ) -> tuple[dict[str, list[LatencyStats]], dict[str, str], dict[str, str]]:
        """Latencies, measurement failures and the artifacts considered (name -> sha256)
        recorded by the profile unit of ``profile``."""
        res = self.result(UnitId("profile", profile=profile))
        if res is None:
            return {}, {}, {}
        lat = {
            name: [from_dict(LatencyStats, s) for s in stats]
            for name, stats in res.get("latency", {}).items()
        }
        return lat, dict(res.get("errors", {})), dict(res.get("artifacts", {}))

    # ------------------------------------------------------------------ recorded inputs

    @property
    def inputs(self) -> dict[str, Any]:
        return dict(self.run.manifest.get("inputs", {}))

    @property
    def identity(self) -> Any:
        return self.run.manifest.get("identity")

    @property
    def profiles(self) -> list[str]:
        """The profiles the run was measured with (the last one is the run's current)."""
        return list(self.inputs.get("profiles", []))

    def current_profile(self) -> str:
        """The profile the run was last measured with."""
        if not self.profiles:
            raise UserInputError(
                f"{self.run.root} has not been measured on any profile yet",
                "run `dcvit-deploy profile --out RUN` (or the whole `compress`) first",
            )
        return self.profiles[-1]

    def compress_options(self) -> CompressOptions:
        """The compression options the run was made with (checked when the manifest was read)."""
        from dcvit_deploy.config.options import CompressOptions
        from dcvit_deploy.model.images import DataOverrides

        raw = self.inputs.get("compress_options")
        if not raw:
            fix = "run `dcvit-deploy compress` first"
            raise UserInputError(f"{self.run.root} has no recorded compression options", fix)
        local = {"DataOverrides": DataOverrides}
        opts = from_dict(CompressOptions, raw, schema=None, localns=local)
        return dataclasses.replace(opts, device="auto")

    def profile_source(self, name: str) -> str:
        """What to load profile ``name`` from (a built-in name or a file)."""
        return str(self.inputs.get("profile_sources", {}).get(name, name))

    def precisions(self, profile: TargetProfile) -> tuple[str, ...]:
        """The precisions ``profile`` was last deployed with (else the profile's)."""
        recorded = self.inputs.get("precisions", {}).get(profile.name)
        return tuple(recorded or profile.precisions or (profile.precision,))
