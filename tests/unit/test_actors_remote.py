"""The Ray-facing constructors, built in-process (no Ray needed to construct them)."""

from __future__ import annotations

import gc
from pathlib import Path

from helpers import RecordingWorker

from actors.coordinator import FlowPolicy, TenantPolicy
from cluster.actors_remote import CoordinatorActor


async def test_coordinator_actor_freezes_what_its_process_loaded_before_ingest(
    tmp_path: Path,
) -> None:
    gc.unfreeze()
    try:
        coordinator = CoordinatorActor(
            "sqlite",
            str(tmp_path),
            "normal",
            [RecordingWorker()],
            [FlowPolicy("acme", "ingest")],
            [TenantPolicy("acme")],
            4,
        )
        assert gc.get_freeze_count() > 0
        await coordinator.ledger.close()
    finally:
        gc.unfreeze()
